import json

from tools import benchmark


def test_cpu_smoke_writes_rows(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert benchmark.main(["--cpu_smoke", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 1 and rows[0]["model"] == "vim" and rows[0]["images_per_s"] > 0
    assert "img/s" in capsys.readouterr().out


def test_needs_a_gpu_without_cpu_smoke(capsys):
    import torch
    if torch.cuda.is_available():
        return
    assert benchmark.main(["--archs", "mamba_tiny"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_scan_timings_need_a_gpu(capsys):
    import pytest
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    for flags in (["--scan_only", "triton"], ["--scan_sweep"]):
        assert benchmark.main(flags) == 2
        assert "need a CUDA GPU" in capsys.readouterr().err


def test_cpu_smoke_with_the_conv_stem(tmp_path):
    out = tmp_path / "bench.json"
    assert benchmark.main(["--cpu_smoke", "--stem", "conv", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["stem"] == "conv" and row["tokens"] == 65 and row["images_per_s"] > 0

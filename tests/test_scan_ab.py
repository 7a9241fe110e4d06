"""tools/scan_ab.py: loading kernel files side by side, its settings and its refusals (CPU); the timed comparison
itself on a GPU."""
import json
import os
import types

import pytest
import torch

from tools import scan_ab

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL = os.path.join(ROOT, "models", "scan_triton.py")


def test_two_copies_load_side_by_side_with_a_setting():
    pytest.importorskip("triton")
    a, b = scan_ab.load(KERNEL), scan_ab.load(f"{KERNEL}:CHUNK=2,GROUP=1")
    assert a is not b and a._bwd_kernel is not b._bwd_kernel and callable(b._forward)
    assert (b.CHUNK, b.GROUP) == (2, 1) and a.CHUNK != 2 and a.GROUP != 1
    assert not hasattr(a, "selective_scan_triton")  # the op registrations are left out


@pytest.mark.parametrize("argv, message", [
    (["--shapes", "257"], "--shapes takes LENGTHxBATCH"),
    (["--shapes", "0x8"], "--shapes takes LENGTHxBATCH"),
    ([__file__], "is not a scan kernel file"),
    (["/nonexistent/kernel.py"], "cannot read /nonexistent/kernel.py"),
    ([f"{KERNEL}:CHUNK"], "settings are NAME=integer"),
    ([f"{KERNEL}:NOT_A_CONSTANT=1"], "settings are NAME=integer"),
    ([f"{KERNEL}:CHUNK=two"], "settings are NAME=integer"),
])
def test_bad_input_is_one_line(argv, message, capsys):
    pytest.importorskip("triton")
    if argv[0].startswith("--"):
        argv = [KERNEL] + argv
    assert scan_ab.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_without_a_gpu_it_says_so(capsys):
    pytest.importorskip("triton")
    assert scan_ab.main([KERNEL]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_a_failing_kernel_is_one_row_and_the_others_still_run(monkeypatch, capsys):
    """A kernel that raises (a compile error on the GPU's Triton, say) gets an error row per direction; the kernels
    after it are still timed, and the summary compares them with the first."""
    monkeypatch.setattr(scan_ab, "inputs", lambda batch, length: tuple(torch.ones(2) for _ in range(9)))
    monkeypatch.setattr(scan_ab, "_cuda_ms", lambda fn, n: 2.0 if fn.__name__ == "bwd" else 1.0)

    def broken(*args):
        raise RuntimeError("PassManager::run failed\nmore detail")
    good = types.SimpleNamespace(_forward=lambda *a: torch.ones(2), _backward=lambda *a: (torch.ones(2), None))
    bad = types.SimpleNamespace(_forward=broken, _backward=broken)
    rows = scan_ab.compare([("good", good), ("bad", bad), ("again", good)], [(5, 2)])
    assert [(r["kernel"], "error" in r) for r in rows] == [("good", False), ("good", False), ("bad", True),
                                                          ("bad", True), ("again", False), ("again", False)]
    assert rows[2]["error"] == "RuntimeError: PassManager::run failed"
    assert rows[4]["max_rel_diff_vs_first"] == 0.0
    out = capsys.readouterr().out
    assert out.count("failed: RuntimeError: PassManager::run failed") == 2
    lines = scan_ab.summary(rows)
    assert len(lines) == 3 and all(line.split()[-3:] == ["1.000", "2.000", "1.000x"] for line in lines[1:])


def test_summary_means_the_directions_against_the_first():
    rows = [dict(kernel=k, length=65, batch=8, reverse=rev, fwd_ms=f, bwd_ms=b, max_rel_diff_vs_first=None)
            for k, rev, f, b in [("a", False, 1.0, 3.0), ("a", True, 1.0, 5.0), ("b", False, 0.5, 1.5),
                                 ("b", True, 0.5, 2.5)]]
    lines = scan_ab.summary(rows)
    assert lines[1].split() == ["a", "65", "8", "1.000", "4.000", "1.000x"]
    assert lines[2].split() == ["b", "65", "8", "0.500", "2.000", "0.500x"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compares_on_gpu(tmp_path):
    out = tmp_path / "ab.json"
    assert scan_ab.main([KERNEL, f"{KERNEL}:CHUNK=2", "--shapes", "17x4", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["kernel"].endswith("CHUNK=2"), r["reverse"]) for r in rows] == [(False, False), (False, True),
                                                                            (True, False), (True, True)]
    assert all(r["fwd_ms"] > 0 and r["bwd_ms"] > 0 for r in rows)
    # bf16 outputs, and dB and dC are atomic sums in any order: one bf16 step apart at most
    assert rows[0]["max_rel_diff_vs_first"] is None and rows[2]["max_rel_diff_vs_first"] < 2e-2

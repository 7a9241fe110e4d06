import json

import pytest

from tools import benchmark


def test_cpu_smoke_writes_rows(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert benchmark.main(["--cpu_smoke", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 1 and rows[0]["model"] == "vim" and rows[0]["images_per_s"] > 0
    # training's default tokenizer: the conv stem at stride 2, 257 tokens
    assert (rows[0]["stem"], rows[0]["patch_size"], rows[0]["tokens"]) == ("conv", 2, 257)
    assert "img/s" in capsys.readouterr().out
    assert json.loads(out.read_text())["meta"]["cudnn_benchmark"] is True  # as training sets it


def test_no_cudnn_benchmark_turns_the_autotuner_off(tmp_path, monkeypatch):
    import torch
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)  # restored afterwards
    out = tmp_path / "bench.json"
    assert benchmark.main(["--cpu_smoke", "--no_cudnn_benchmark", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["meta"]["cudnn_benchmark"] is False


def test_needs_a_gpu_without_cpu_smoke(capsys):
    import torch
    if torch.cuda.is_available():
        return
    assert benchmark.main(["--archs", "mamba_tiny"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_scan_timings_need_a_gpu(capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    for flags in (["--scan_only", "triton"], ["--scan_sweep"]):
        assert benchmark.main(flags) == 2
        assert "need a CUDA GPU" in capsys.readouterr().err


def test_scan_lengths_reach_the_scan_timings(monkeypatch, capsys):
    """--scan_lengths sets the sequence lengths of --scan_sweep and --scan_only (each keeps its own default without
    it); a length below 1 is a one-line error, exit 2."""
    seen = []
    monkeypatch.setattr(benchmark.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(benchmark, "scan_sweep", lambda batches, **kw: seen.append(("sweep", kw)) or [])
    monkeypatch.setattr(benchmark, "scan_bench", lambda backends, batches, **kw: seen.append(("only", kw)) or [])
    assert benchmark.main(["--scan_sweep", "--scan_lengths", "257"]) == 0
    assert benchmark.main(["--scan_only", "triton", "--scan_lengths", "65", "129"]) == 0
    assert benchmark.main(["--scan_sweep"]) == 0
    assert seen == [("sweep", {"lengths": (257,)}), ("only", {"lengths": (65, 129)}), ("sweep", {})]
    assert benchmark.main(["--scan_sweep", "--scan_lengths", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--scan_lengths must be positive" in err


def test_stem_and_patch_sizes_default_as_in_training(tmp_path):
    """--stem conv without --patch_sizes is stride 2 (as the trainer's --stem conv); --patch_sizes 4 is stride 4;
    --stem patch is patch 4 (patch 8 in the CPU smoke, fewer tokens), or the given patch size."""
    out = tmp_path / "bench.json"
    cases = [(["--stem", "conv"], ("conv", 2, 257)), (["--stem", "conv", "--patch_sizes", "4"], ("conv", 4, 65)),
             (["--stem", "patch"], ("patch", 8, 17)), (["--stem", "patch", "--patch_sizes", "16"], ("patch", 16, 5))]
    for flags, want in cases:
        assert benchmark.main(["--cpu_smoke", *flags, "--json", str(out)]) == 0
        (row,) = json.loads(out.read_text())["rows"]
        assert (row["stem"], row["patch_size"], row["tokens"]) == want and row["images_per_s"] > 0, flags


def test_conv_stem_refuses_other_strides(capsys):
    assert benchmark.main(["--cpu_smoke", "--stem", "conv", "--patch_sizes", "4", "8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--stem conv takes --patch_sizes 2 or 4" in err


def test_launch_shapes_are_parsed_checked_and_applied(tmp_path, monkeypatch, capsys):
    pytest.importorskip("triton")
    import models.scan_triton as st
    for name in benchmark.LAUNCH_NAMES:
        monkeypatch.setattr(st, name, getattr(st, name))  # restored after the test
    out = tmp_path / "bench.json"
    assert benchmark.main(["--cpu_smoke", "--json", str(out), "--launch", "BWD_CONFIG_NARROW=32,2,1,step,decay",
                           "FWD_CONFIG=64,4,2", "BWD_CONFIG=64,1,1,step,super4"]) == 0
    assert st.BWD_CONFIG_NARROW == dict(BLOCK_D=32, BLOCK_L=2, num_warps=1, CACHE_STEP=True, CACHE_DECAY=True,
                                        DBC_PARTIALS=False, SUPER=1, PREFETCH=False)
    assert st.BWD_CONFIG == dict(BLOCK_D=64, BLOCK_L=1, num_warps=1, CACHE_STEP=True, CACHE_DECAY=False,
                                 DBC_PARTIALS=False, SUPER=4, PREFETCH=False)
    assert st.FWD_CONFIG == dict(BLOCK_D=64, BLOCK_L=4, num_warps=2)
    assert json.loads(out.read_text())["meta"]["launch"]["BWD_CONFIG_NARROW"]["CACHE_STEP"] is True
    assert benchmark.parse_launch(["BWD_CONFIG=64,1,1,prefetch"])["BWD_CONFIG"]["PREFETCH"] is True
    capsys.readouterr()
    for bad in ("BWD=32,2,1", "FWD_CONFIG=32,2", "FWD_CONFIG=32,3,1", "FWD_CONFIG=32,2,1,step", "BWD_CONFIG=a,2,1",
                "BWD_CONFIG=32,2,1,fast", "BWD_CONFIG=32,2,1,super0", "BWD_CONFIG=32,2,1,super2,super4",
                "FWD_CONFIG=32,2,1,super2", "BWD_CONFIG=32,2,1,prefetch", "BWD_CONFIG=32,1,1,prefetch,super2",
                "FWD_CONFIG=32,1,1,prefetch"):
        assert benchmark.main(["--cpu_smoke", "--launch", bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and bad in err


def test_scan_regs_compiles_for_a_gpu_without_one(tmp_path, capsys):
    """tools/scan_regs.py: the Triton kernels compiled for sm_90 here, registers and spills read from the cubin."""
    pytest.importorskip("triton")
    from tools import scan_regs
    out = tmp_path / "regs.json"
    assert scan_regs.main(["--launch", "FWD_CONFIG=16,2,1", "BWD_CONFIG_NARROW=16,2,1",
                           "BWD_CONFIG_NARROW=16,2,1,step,super2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["name"] for r in rows] == ["FWD_CONFIG", "BWD_CONFIG_NARROW", "BWD_CONFIG_NARROW"]  # both shapes kept
    assert rows[1]["SUPER"] == 1 and rows[2]["SUPER"] == 2 and rows[2]["CACHE_STEP"] is True and rows[2]["arch"] == 90
    assert all(0 < r["regs"] <= 255 and r["stack_bytes"] >= 0 for r in rows)
    assert capsys.readouterr().out.count("regs") == 3
    assert scan_regs.main(["--launch", "FWD_CONFIG=16,2,1,super2"]) == 2  # SUPER is the backward's
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "scan_regs.py: error: --launch" in err


def test_scan_regs_compiles_the_models_launch():
    """The compiled case is the launch the model makes: its (B, L, D) activations seen as (B, D, L) views have unit
    channel strides, which Triton's launcher turns into constants (they decide vectorisation and register layout)."""
    pytest.importorskip("triton")
    from tools import scan_regs
    import models.scan_triton as st
    for kind, kernel, cfg in (("fwd", st._fwd_kernel, st.FWD_CONFIG), ("bwd", st._bwd_kernel, st.BWD_CONFIG)):
        grid, args, meta = scan_regs.model_case(kind, cfg)
        strides = dict(zip(kernel.arg_names, args))
        assert grid == (768 // cfg["BLOCK_D"], scan_regs.MODEL_CASE["batch"])
        assert strides["s_ud"] == strides["s_td"] == strides["s_zd"] == strides["s_od"] == strides["s_Ad"] == 1
        assert strides["s_Bn"] == strides["s_Cn"] == 1 and strides["s_ul"] == 768
        assert meta["HAS_Z"] and meta["SOFTPLUS"] and meta["BLOCK_N"] == 16
    # compiled as Triton's launcher specialises that call: unit strides are constants, aligned pointers marked
    ttir = scan_regs.compile_kernel("fwd", st.FWD_CONFIG_NARROW, 90).asm["ttir"]
    signature = ttir[ttir.index("tt.func public @_fwd_kernel"):].split("\n")[0]
    assert "%s_ul:" in signature and "%s_ud:" not in signature and "%s_Ad:" not in signature
    assert "%u_ptr: !tt.ptr<bf16> {tt.divisibility = 16" in signature


def test_stem_only_times_both_tokenizers(tmp_path, capsys):
    out = tmp_path / "stem.json"
    assert benchmark.main(["--stem_only", "--cpu_smoke", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["stem_rows"]
    assert {(r["stem"], r["channels_last"]) for r in rows} == {(s, c) for s in ("patch", "conv") for c in (False, True)}
    assert all(r["ms"] > 0 and not r["compiled"] for r in rows)
    assert "conv  channels_last" in capsys.readouterr().out


def test_stem_only_needs_a_gpu_without_cpu_smoke(capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert benchmark.main(["--stem_only"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_cpu_smoke_keeps_the_flags_it_is_given(tmp_path):
    """--cpu_smoke picks tiny defaults only for what is not given: batch sizes, steps, warmup and depth pass on."""
    out = tmp_path / "bench.json"
    assert benchmark.main(["--cpu_smoke", "--batch_sizes", "4", "6", "--steps", "1", "--warmup", "0", "--depth", "1",
                           "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [(r["batch_size"], r["depth"], r["width"]) for r in data["rows"]] == [(4, 1, 16), (6, 1, 16)]
    assert (data["meta"]["steps"], data["meta"]["warmup"]) == (1, 0)


@pytest.mark.slow
def test_cpu_smoke_compiles_with_compile(tmp_path):
    """Patches of 8 and one layer: the CPU's reference scan is a loop over the tokens that the compiler unrolls."""
    out = tmp_path / "bench.json"
    assert benchmark.main(["--cpu_smoke", "--compile", "--stem", "patch", "--depth", "1", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["compiled"] is True and row["images_per_s"] > 0 and "error" not in row


def test_bad_numbers_and_unusable_scans_are_one_line_errors(capsys):
    import torch
    cases = [(["--steps", "0"], "--steps out of range"), (["--warmup", "-1"], "--warmup out of range"),
             (["--batch_sizes", "8", "0"], "--batch_sizes out of range"), (["--depth", "0"], "--depth out of range")]
    if not torch.cuda.is_available():
        cases.append((["--scan", "triton"], "--scan triton needs a CUDA device"))
    for flags, message in cases:
        assert benchmark.main(["--cpu_smoke", *flags]) == 2, flags
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (flags, err)


def test_gpu_rows_pair_each_variant_with_its_vit(tmp_path, monkeypatch, capsys):
    """The GPU table (a mocked GPU and mocked timings): every arch x patch size x batch gets a Vision Mamba row and,
    unless --no_vit, a ViT row of the same shape, the Mamba's images/s as a ratio to it."""
    monkeypatch.setattr(benchmark.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(benchmark.torch.cuda, "get_device_name", lambda *a: "mock GPU")
    calls = []

    def fake_row(kind, arch, width, depth, patch, batch, args, device):
        calls.append((kind, arch, width, depth, patch, batch))
        return dict(model=kind, arch=arch, tokens=(32 // patch) ** 2 + 1, batch_size=batch, peak_mem_gib=1.0,
                    images_per_s=1000.0 if kind == "vim" else 4000.0, scan=None if kind == "vit" else "ref")
    monkeypatch.setattr(benchmark, "run_row", fake_row)
    out = tmp_path / "bench.json"
    assert benchmark.main(["--archs", "mamba_small", "--batch_sizes", "128", "512", "--depth", "3",
                           "--json", str(out)]) == 0
    assert calls == [(k, "mamba_small", 384, 3, 2, b) for b in (128, 512) for k in ("vim", "vit")]
    rows = json.loads(out.read_text())["rows"]
    assert [r.get("ratio_to_vit") for r in rows] == [0.25, None, 0.25, None]
    assert "0.25" in capsys.readouterr().out
    calls.clear()
    assert benchmark.main(["--archs", "mamba_tiny", "mamba_small", "--batch_sizes", "64", "--stem", "patch",
                           "--patch_sizes", "4", "2", "--no_vit", "--json", str(out)]) == 0
    assert calls == [("vim", a, w, d, p, 64) for a, w, d in (("mamba_tiny", 192, 24), ("mamba_small", 384, 24))
                     for p in (4, 2)]
    assert all("ratio_to_vit" not in r for r in json.loads(out.read_text())["rows"])

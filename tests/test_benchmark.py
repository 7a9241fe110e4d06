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
    assert benchmark.main(["--scan_only", "triton"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_scan_lengths_and_chunks_reach_the_scan_timings(monkeypatch, capsys):
    """--scan_lengths and --chunks reach --scan_only's timings (its own lengths without them); a value below 1 is a
    one-line error, exit 2."""
    seen = []
    monkeypatch.setattr(benchmark.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(benchmark, "scan_bench", lambda backends, batches, **kw: seen.append((backends, kw)) or [])
    assert benchmark.main(["--scan_only", "triton", "--scan_lengths", "65", "129", "--chunks", "2", "3"]) == 0
    assert benchmark.main(["--scan_only"]) == 0
    assert seen == [(["triton"], {"lengths": (65, 129), "chunks": [2, 3]}), (["cuda", "triton"], {"chunks": None})]
    for flag in ("--scan_lengths", "--chunks"):
        assert benchmark.main(["--scan_only", "triton", flag, "0"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{flag} must be positive" in err


def test_scan_floors_count_exponentials_and_bytes():
    """One call's floors: B*D*L*N exponentials at 16 per clock per SM; 4 (forward) and 7 (backward) bf16 (B, L, D)
    tensors plus B and C through memory."""
    f = benchmark.scan_floors(batch=2, length=4, dim=8, state=2, sms=1, clock_hz=1e3, bytes_per_s=1e3)
    assert f["exp_ms"] == 2 * 8 * 4 * 2 / 16 / 1e3 * 1e3
    act, bc = 2 * 4 * 8 * 2, 2 * 4 * 2 * 2
    assert f["fwd_mem_ms"] == (4 * act + 2 * bc) and f["bwd_mem_ms"] == (7 * act + 6 * bc)


def test_triton_rows_per_chunk_length():
    pytest.importorskip("triton")
    rows = benchmark._backends(["cuda", "triton", "ref"], [2, 4])
    assert [(label, chunk) for label, _, chunk in rows] == [("cuda", None), ("triton/2", 2), ("triton/4", 4),
                                                           ("ref", None)]
    assert [label for label, _, _ in benchmark._backends(["triton"], None)] == ["triton"]


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


def test_scan_regs_compiles_for_a_gpu_without_one(tmp_path, capsys):
    """tools/scan_regs.py: the Triton kernels compiled for sm_90 here (pass 2 also as the scan pair's second backward
    runs it, adding dz), registers and spills read from the cubin; the configured chunk length is restored
    afterwards."""
    pytest.importorskip("triton")
    from tools import scan_regs
    import models.scan_triton as st
    chunk = st.CHUNK
    out = tmp_path / "regs.json"
    assert scan_regs.main(["--chunks", "1", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["kernel"], r["chunk"]) for r in rows] == [("fwd", None)] + [
        (kind, chunk) for chunk in (1, 2) for kind in ("pass1", "pass2", "pass2_dz_add")]
    assert all(0 < r["regs"] <= 255 and r["stack_bytes"] >= 0 and r["arch"] == 90 for r in rows)
    # each kernel's loop over the sequence (the backward's passes are two kernels); per step = loop / steps an iteration
    assert [len(r["loop_instructions"]) for r in rows] == [1] * 7
    for r in rows:
        steps = st.GROUP if r["kernel"] == "fwd" else r["chunk"]
        assert all(n > 50 for n in r["loop_instructions"])
        assert r["instructions_per_step"] == round(sum(r["loop_instructions"]) / steps, 1)
    out_text = capsys.readouterr().out
    assert out_text.count("regs") == 7 and out_text.count("a step") == 7 and st.CHUNK == chunk
    assert scan_regs.main(["--chunks", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--chunks must be positive" in err


def test_scan_regs_compiles_the_models_launch():
    """The compiled case is the launch the model makes: its (B, L, D) activations seen as (B, D, L) views have unit
    channel strides, which Triton's launcher turns into constants, and B and C are read as packed bf16 words."""
    pytest.importorskip("triton")
    from tools import scan_regs
    import models.scan_triton as st
    for kind, kernel in (("fwd", st._fwd_kernel), ("pass1", st._bwd_kernel), ("pass2", st._bwd_kernel),
                         ("pass2_dz_add", st._bwd_kernel)):
        grid, args, meta = scan_regs.model_case(kind)
        strides = dict(zip(kernel.arg_names, args))
        assert grid == (768 // 32, scan_regs.MODEL_CASE["batch"])
        assert strides["s_ud"] == strides["s_td"] == strides["s_zd"] == strides["s_od"] == 1
        assert strides["s_Bn"] == strides["s_Cn"] == 1 and strides["s_ul"] == 768
        assert meta["HAS_Z"] and meta["SOFTPLUS"] and meta["BLOCK_N"] == 16 and meta["PACKED"]
        assert meta.get("PASS") == {"fwd": None, "pass1": 1, "pass2": 2, "pass2_dz_add": 2}[kind]
        assert meta.get("DZ_ADD") == {"fwd": None, "pass1": False, "pass2": False, "pass2_dz_add": True}[kind]
        if kind == "pass2_dz_add":  # dz_out laid out as z, the model's (B, L, D) memory
            assert strides["s_dzd"] == 1 and strides["s_dzl"] == 768
    # compiled as Triton's launcher specialises that call: unit strides are constants, aligned pointers marked
    ttir = scan_regs.compile_kernel("fwd", 90).asm["ttir"]
    signature = ttir[ttir.index("tt.func public @_fwd_kernel"):].split("\n")[0]
    assert "%s_ul:" in signature and "%s_ud:" not in signature
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


def test_scan_timing_leaves_no_gradients_behind():
    """--scan_only times the scan's own forward and backward: every input's gradient is computed and handed back, none
    accumulated into .grad (autograd's extra work would be timed with it); the output gradient keeps the output's
    channels-contiguous layout, as the model's does."""
    from models.scan import selective_scan_ref
    inputs = benchmark._scan_inputs(2, 5, 8, 4, device="cpu")
    seen = []

    def scan(*args, **kw):
        out = selective_scan_ref(*args, **kw).to(args[0].dtype).transpose(1, 2).contiguous().transpose(1, 2)
        if out.requires_grad:  # (not in the timed forward, which runs without autograd)
            out.register_hook(lambda g: seen.append(g.stride()) or g)
        return out

    ms_fwd, ms = benchmark._time_scan(scan, inputs, reps=1, cuda=False)
    assert 0 < ms_fwd and 0 < ms
    assert all(x.requires_grad and x.grad is None for x in inputs)
    assert seen and all(stride[1] == 1 for stride in seen)  # (B, D, L) views of (B, L, D) memory


def test_profile_step_tells_the_scan_and_conv_kernels_by_name():
    """The profile's shares: our Triton kernels by their exact names, mamba-ssm's and causal-conv1d's by theirs, and
    never torch.compile's kernels, whose names can quote the custom op they feed (or our conv kernels as the scan's)."""
    from tools.profile_step import _kernel_of
    assert [_kernel_of(n) for n in ("_fwd_kernel", "_bwd_kernel", "void selective_scan_bwd_kernel<K>(P)")] == \
        ["selective scan"] * 3
    assert [_kernel_of(n) for n in ("_conv_fwd_kernel", "_conv_bwd_kernel", "void causal_conv1d_fwd_kernel<K>(P)")] == \
        ["conv"] * 3
    for name in ("triton_poi_fused_div_selective_scan_bwd_transpose_view_5", "triton_poi_fused_add_conv_pair_bwd_3",
                 "nvjet_sm90_tst_192x192_64x3_2x1_v_bz_coopB_NNN"):
        assert _kernel_of(name) is None, name

"""Tests of the first Triton selective scan (models/scan_triton_v1.py, --scan triton_v1) against the PyTorch reference.

CPU: the kernels run under Triton's interpreter. Triton reads TRITON_INTERPRET when a kernel is decorated, that is
when models.scan_triton_v1 is first imported, so setting it in this process would be too late if another test module
imported the kernels first, and it would leak into every later test module and subprocess. So the interpreted cases
all run in one child process (this file run as a script) that gets TRITON_INTERPRET=1 in its environment before it
imports anything; each case is then checked by its own test here. They are skipped where a GPU exists: there the gpu
tests run the same cases compiled.

GPU (@pytest.mark.gpu): the same small cases, then model-sized ones (B=64, D=768, N=16, L=65 and 257) in fp32 and bf16
against the reference and, when mamba-ssm is installed, against its CUDA kernel.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from models.scan import selective_scan_ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GRADS = ("du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias")


def _case(B, D, N, L, has_D=True, has_z=True, bias=True, softplus=True, layout="bld", seed=0, reverse=False):
    opts = "".join(flag for flag, on in (("D", has_D), ("z", has_z), ("b", bias), ("sp", softplus),
                                         ("rev", reverse)) if on) or "plain"
    return dict(id=f"B{B}-D{D}-N{N}-L{L}-{opts}-{layout}", B=B, D=D, N=N, L=L, has_D=has_D, has_z=has_z,
                bias=bias, softplus=softplus, layout=layout, seed=seed, reverse=reverse)


# Small cases (the interpreter costs ~60 ms per program and step): L = 1, a partial chunk, several chunks with a
# partial last one; several channel blocks and a partial one; N below and at 16; with and without each option;
# (B, L, D)-strided views (what the model passes) and contiguous (B, D, L) tensors.
CASES = [
    _case(2, 8, 4, 1),
    _case(2, 16, 8, 5, has_D=False, has_z=False, bias=False, softplus=False),
    _case(1, 24, 16, 17),
    _case(1, 8, 16, 17, layout="bdl", seed=1),
    _case(1, 12, 4, 65, has_z=False, seed=2),
    _case(1, 8, 16, 33, has_D=False, bias=False, seed=3),
    _case(1, 16, 2, 9, softplus=False, layout="bdl", seed=4),
    _case(1, 32, 16, 12, has_D=False, has_z=False, seed=5),
    _case(2, 24, 16, 17, seed=6, reverse=True),
    _case(1, 8, 4, 6, has_D=False, bias=False, layout="bdl", seed=7, reverse=True),
]
# Interpreter launch shapes: small tiles keep the interpreter fast and still give several channel blocks and chunks.
INTERPRETER_CONFIG = dict(FWD_CONFIG=dict(BLOCK_D=16, BLOCK_L=4, num_warps=1),
                          BWD_CONFIG=dict(BLOCK_D=16, BLOCK_L=4, num_warps=1, CACHE_STEP=False, CACHE_DECAY=False))
# The backward's variants (kept loads, kept exp(delta*A) tiles, the large-batch shape's one-step chunks, dB and dC
# stored per channel block instead of added atomically), each on cases with a partial chunk, a
# reverse scan and a missing z.
CACHED_CONFIGS = {"cache_step": dict(BLOCK_L=4, CACHE_STEP=True, CACHE_DECAY=False),  # chunks of several steps
                  "cache_decay": dict(BLOCK_L=4, CACHE_STEP=False, CACHE_DECAY=True),
                  "cache_both": dict(BLOCK_L=4, CACHE_STEP=True, CACHE_DECAY=True),
                  "wide_steps1": dict(BLOCK_D=64, BLOCK_L=1, CACHE_STEP=True, CACHE_DECAY=False),  # BWD_CONFIG's form
                  "partials": dict(BLOCK_D=16, BLOCK_L=2, CACHE_STEP=True, DBC_PARTIALS=True),  # dB, dC per block
                  # boundary states kept every SUPER chunks, a group's chunk starts recomputed (last group partial
                  # or of one chunk, with a partial last chunk or not)
                  "super3": dict(BLOCK_D=16, BLOCK_L=2, SUPER=3),
                  "super4_steps1": dict(BLOCK_D=64, BLOCK_L=1, CACHE_STEP=True, SUPER=4),
                  # one-step chunks with the next step's loads issued before the current step is computed
                  "prefetch": dict(BLOCK_D=16, BLOCK_L=1, PREFETCH=True),
                  "prefetch32": dict(BLOCK_D=32, BLOCK_L=1, PREFETCH=True)}  # the narrow shape in use
CACHED_CASES = [CASES[2], CASES[4], CASES[8]]
EXTRA_CASES = {"prefetch": [CASES[0]]}  # L = 1: the prefetching loops' first loads are their only ones


def variant_cases(variant):
    return CACHED_CASES + EXTRA_CASES.get(variant, [])


def make_inputs(case, device, dtype=torch.float32):
    """Inputs of one case. 'bld' layout: u, delta, z, dout are (B, L, D)-contiguous and B, C (B, L, N)-contiguous,
    passed as transposed (B, D, L) / (B, N, L) views, as the model does; 'bdl': contiguous (B, D, L) / (B, N, L)."""
    g = torch.Generator().manual_seed(case["seed"])
    Bsz, D, N, L = case["B"], case["D"], case["N"], case["L"]

    def seq(x):  # x: (B, L, channels) -> (B, channels, L) in the case's layout
        x = x.to(device=device, dtype=dtype)
        return x.transpose(1, 2) if case["layout"] == "bld" else x.transpose(1, 2).contiguous()

    if case["softplus"]:
        delta = seq(torch.randn(Bsz, L, D, generator=g) * 0.5 - 1.0)
    else:  # delta is used as is, so keep it positive
        delta = seq(torch.rand(Bsz, L, D, generator=g) * 0.5 + 0.05)
    return dict(
        u=seq(torch.randn(Bsz, L, D, generator=g)),
        delta=delta,
        A=-(torch.rand(D, N, generator=g) * 2.0 + 0.1).to(device),  # fp32 parameters, as in the model
        B=seq(torch.randn(Bsz, L, N, generator=g)),
        C=seq(torch.randn(Bsz, L, N, generator=g)),
        D=torch.randn(D, generator=g).to(device) if case["has_D"] else None,
        z=seq(torch.randn(Bsz, L, D, generator=g)) if case["has_z"] else None,
        delta_bias=(torch.randn(D, generator=g) * 0.5).to(device) if case["bias"] else None,
        dout=seq(torch.randn(Bsz, L, D, generator=g)),
    )


def run_scan(fn, inputs, softplus, reverse=False):
    """Output and gradients (None for absent inputs) of one scan function."""
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    leaves = {k: inputs[k].detach().clone().requires_grad_() for k in names if inputs[k] is not None}
    out = fn(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], D=leaves.get("D"),
             z=leaves.get("z"), delta_bias=leaves.get("delta_bias"), delta_softplus=softplus, reverse=reverse)
    grads = dict(zip(leaves, torch.autograd.grad(out, list(leaves.values()), inputs["dout"])))
    return dict(out=out, **{"d" + k: grads.get(k) for k in names})


def compare(got, want):
    """Max abs difference of each tensor relative to the reference's max abs value; absent tensors must match."""
    errors = {}
    for name in ("out",) + GRADS:
        a, b = got[name], want[name]
        assert (a is None) == (b is None), f"{name}: one of the two is None"
        if b is None:
            continue
        assert a.shape == b.shape and a.dtype == b.dtype, f"{name}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
        a, b = a.double(), b.double()
        assert torch.isfinite(a).all(), f"{name}: not finite"
        errors[name] = ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()
    return errors


def check_case(case, device, dtype, tol, bwd_flags=None):
    """bwd_flags: the backward's launch shape and switches to use instead of the configured ones (every launch shape;
    the configured switches are dropped, so a variant is tested as written whatever the defaults are)."""
    import models.scan_triton_v1 as st
    inputs = make_inputs(case, device, dtype)
    saved = {k: getattr(st, k) for k in ("BWD_CONFIG", "BWD_CONFIG_NARROW")}
    try:
        for name, cfg in saved.items():
            if bwd_flags is not None:
                cfg = dict({k: v for k, v in cfg.items() if k not in st.BWD_FLAGS}, **bwd_flags)
            setattr(st, name, cfg)
        got = run_scan(st.selective_scan_triton_v1, inputs, case["softplus"], case["reverse"])
    finally:
        for name, cfg in saved.items():
            setattr(st, name, cfg)
    want = run_scan(selective_scan_ref, inputs, case["softplus"], case["reverse"])
    errors = compare(got, want)
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errors})"
    # the output is stored like u: channels contiguous for the model's transposed views
    assert (got["out"].stride(1) == 1) == (inputs["u"].stride(1) == 1)


def check_model(compiled):
    """A small Vim: loss and every gradient with the Triton scan (optionally under torch.compile, where the scan is
    an opaque custom operator and the conv, SiLU and the rest are fused) equal the reference path's."""
    from models.vim import build_model
    torch.manual_seed(0)
    model = build_model("mamba_tiny", 10, embed_dim=16, depth=2, patch_size=8, drop_path=0.0)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    results = []
    for scan in ("ref", "triton_v1"):
        model.set_kernels(scan, False)
        model.zero_grad()
        run = torch.compile(model) if (compiled and scan == "triton_v1") else model
        loss = torch.nn.functional.cross_entropy(run(x), y)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_ref, g_ref), (loss_fast, g_fast) = results
    torch.testing.assert_close(loss_fast, loss_ref, rtol=1e-5, atol=1e-6)
    for n in g_ref:
        torch.testing.assert_close(g_fast[n], g_ref[n], rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")


# ---------------------------------------------------------------- CPU, under Triton's interpreter (child process)

def _child_main(out_path):
    """Runs every case under the interpreter (this process has TRITON_INTERPRET=1) and writes the results."""
    import traceback
    import models.scan_triton_v1 as st
    for name, cfg in INTERPRETER_CONFIG.items():
        setattr(st, name, cfg)
    results = {}
    checks = [(case["id"], lambda case=case: check_case(case, "cpu", torch.float32, tol=1e-4)) for case in CASES]
    checks += [("model_eager", lambda: check_model(compiled=False)), ("model_compiled", lambda: check_model(True))]
    for variant, flags in CACHED_CONFIGS.items():
        checks += [(f"{variant}-{case['id']}",
                    lambda case=case, flags=flags: check_case(case, "cpu", torch.float32, tol=1e-4, bwd_flags=flags))
                   for case in variant_cases(variant)]
    for name, check in checks:
        try:
            check()
            results[name] = None
        except Exception:  # reported by the check's test in the parent
            results[name] = traceback.format_exc()
    with open(out_path, "w") as f:
        json.dump(results, f)


@pytest.fixture(scope="module")
def interpreted_results(tmp_path_factory):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the gpu tests run these cases compiled")
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("scan_triton_v1") / "results.json"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get(
        "PYTHONPATH")])))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and out.exists(), f"interpreter run failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_interpreted_matches_reference(case, interpreted_results):
    failure = interpreted_results[case["id"]]
    assert failure is None, failure


@pytest.mark.parametrize("check", ["model_eager", "model_compiled"])
def test_interpreted_model_matches_reference(check, interpreted_results):
    failure = interpreted_results[check]
    assert failure is None, failure


CACHED_IDS = [f"{variant}-{case['id']}" for variant in CACHED_CONFIGS for case in variant_cases(variant)]


@pytest.mark.parametrize("check", CACHED_IDS)
def test_interpreted_cached_backward_matches_reference(check, interpreted_results):
    failure = interpreted_results[check]
    assert failure is None, failure


def test_prefetch_needs_one_step_chunks():
    """The prefetching backward is written for one-step chunks without groups: other shapes are refused."""
    pytest.importorskip("triton")
    import models.scan_triton_v1 as st
    x = make_inputs(_case(1, 8, 4, 6), "cpu")
    for cfg in (dict(BLOCK_D=16, BLOCK_L=2, num_warps=1, PREFETCH=True),
                dict(BLOCK_D=16, BLOCK_L=1, num_warps=1, SUPER=2, PREFETCH=True)):
        with pytest.raises(ValueError, match="PREFETCH needs BLOCK_L=1 and SUPER=1"):
            st._backward_launch(cfg, x["dout"], x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"],
                                x["delta_bias"], True, False)


def test_launch_shapes_follow_the_number_of_programs(monkeypatch):
    """Wide channel blocks only when the batch gives every SM enough programs; the interpreter takes FWD_CONFIG."""
    pytest.importorskip("triton")
    import types
    import models.scan_triton_v1 as st
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(
        multi_processor_count=132))

    def u(batch, dim, cuda=True):
        return types.SimpleNamespace(is_cuda=cuda, shape=(batch, dim, 65), device=None)
    wide, narrow = st.FWD_CONFIG, st.FWD_CONFIG_NARROW
    assert wide["BLOCK_D"] > narrow["BLOCK_D"]
    assert st._pick(wide, narrow, u(1024, 768)) is wide        # 12 blocks of 64 channels x 1024 = 93 per SM
    assert st._pick(wide, narrow, u(128, 768)) is narrow       # 12 per SM
    assert st._pick(wide, narrow, u(128, 768, cuda=False)) is wide


# ---------------------------------------------------------------- GPU, compiled

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
MODEL_CASES = [_case(64, 768, 16, L, seed=10 + L) for L in (65, 257)] + [_case(64, 768, 16, 65, seed=9, reverse=True)]
TOL = {torch.float32: 1e-3, torch.bfloat16: 2e-2}


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_gpu_small_cases(case):
    check_case(case, "cuda", torch.float32, tol=1e-4)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("variant", CACHED_CONFIGS)
@pytest.mark.parametrize("case", CACHED_CASES + MODEL_CASES[2:], ids=[c["id"] for c in CACHED_CASES + MODEL_CASES[2:]])
def test_gpu_cached_backward(case, variant):
    check_case(case, "cuda", torch.float32, tol=1e-4 if case["D"] < 768 else 1e-3, bwd_flags=CACHED_CONFIGS[variant])


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", MODEL_CASES, ids=[c["id"] for c in MODEL_CASES])
def test_gpu_model_shapes_match_reference(case, dtype):
    check_case(case, "cuda", dtype, tol=TOL[dtype])


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", MODEL_CASES, ids=[c["id"] for c in MODEL_CASES])
def test_gpu_model_shapes_match_mamba_ssm(case, dtype):
    pytest.importorskip("mamba_ssm.ops.selective_scan_interface")
    from models.scan import get_scan_fn
    from models.scan_triton_v1 import selective_scan_triton_v1 as selective_scan_triton
    inputs = make_inputs(case, "cuda", dtype)
    errors = compare(run_scan(selective_scan_triton, inputs, case["softplus"], case["reverse"]),
                     run_scan(get_scan_fn("cuda"), inputs, case["softplus"], case["reverse"]))
    bad = {k: v for k, v in errors.items() if not v <= TOL[dtype]}
    assert not bad, f"relative errors above {TOL[dtype]}: {bad} (all: {errors})"


if __name__ == "__main__":
    _child_main(sys.argv[1])

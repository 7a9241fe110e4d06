"""Tests of the mixer's Triton conv pair (models/conv_triton.py) against the PyTorch conv (models.bimamba.conv1d_silu).

CPU: the kernels run under Triton's interpreter in a child process (conftest.run_interpreted says why), each case
then checked by its own test here; skipped where a GPU exists. GPU (@pytest.mark.gpu): the same cases compiled, then
model-sized ones in fp32 and bf16.
The whole model with these kernels, eager and compiled, is checked in tests/test_scan_triton.py and tests/test_gpu.py.
"""
import sys

import pytest
import torch

from conftest import run_checks, run_interpreted
from models.bimamba import conv1d_silu

P = 10  # x_proj's outputs in the cases with the projections


def _names(case):
    """Outputs, then the gradients of x and the parameters, in run_case's order."""
    proj = case["proj"]
    return ("u_f", "u_b", *(("q_f", "q_b") if proj else ()), "dx", "dw_f", "db_f", "dw_b", "db_b",
            *(("dp_f", "dp_b") if proj else ()))


def _case(B, L, D, K=4, sliced=True, seed=0, proj=False):
    """proj: with the projections (x_proj's weights) p_f, p_b, so the op also returns u_f @ p_f.T and u_b @ p_b.T."""
    return dict(id=f"B{B}-L{L}-D{D}-K{K}-{'sliced' if sliced else 'contiguous'}{'-proj' if proj else ''}", B=B, L=L,
                D=D, K=K, sliced=sliced, seed=seed, proj=proj)


# L = 1 and below the conv's width, one partial tile, several tiles with a partial last one; a partial channel block
# and two blocks; widths 2-4; x as a view with strided rows (the first half of a wider tensor) and contiguous (as the
# model passes it)
CASES = [
    _case(2, 1, 8),
    _case(1, 3, 40, seed=1),
    _case(2, 17, 40, seed=2),
    _case(1, 33, 70, sliced=False, seed=3),
    _case(2, 20, 64, K=2, seed=4),
    _case(1, 18, 24, K=3, sliced=False, seed=5),
    _case(2, 17, 40, seed=9, proj=True),
    _case(1, 3, 70, sliced=False, seed=10, proj=True),
]
BF16_CASES = [CASES[2], CASES[3], CASES[6]]
MODEL_CASES = [_case(8, 257, 768, seed=6), _case(16, 65, 768, seed=7), _case(1, 257, 768, seed=8),
               _case(8, 257, 768, seed=11, proj=True)]


def run_case(case, device, dtype, fn):
    """Outputs and gradients of one case: fn(x, w_f, b_f, w_b, b_b[, p_f, p_b]) -> (u_f, u_b[, q_f, q_b]) or None
    for the reference (our PyTorch conv and a matrix product, in fp64)."""
    g = torch.Generator().manual_seed(case["seed"])
    B, L, D, K = case["B"], case["L"], case["D"], case["K"]
    xz = torch.randn(B, L, 2 * D, generator=g)
    params = [torch.randn(D, K, generator=g) * 0.5, torch.randn(D, generator=g) * 0.5,
              torch.randn(D, K, generator=g) * 0.5, torch.randn(D, generator=g) * 0.5]
    grads = [torch.randn(B, L, D, generator=g) for _ in range(2)]
    if case["proj"]:
        params += [torch.randn(P, D, generator=g) * 0.3 for _ in range(2)]
        grads += [torch.randn(B, L, P, generator=g) for _ in range(2)]
    ref = fn is None
    xz = xz.to(device, torch.float64 if ref else dtype).requires_grad_()
    params = [p.to(device, torch.float64 if ref else torch.float32).requires_grad_() for p in params]
    x = xz[..., :D] if case["sliced"] else xz[..., :D].detach().contiguous().requires_grad_()
    if ref:
        w_f, b_f, w_b, b_b = params[:4]
        out = conv1d_silu(x, w_f, b_f), conv1d_silu(x, w_b, b_b, reverse=True)
        if case["proj"]:
            out = (*out, out[0] @ params[4].t(), out[1] @ params[5].t())
    else:
        out = fn(x, *params)
    leaf = xz if case["sliced"] else x
    d = torch.autograd.grad(out, [leaf] + params, [gr.to(device, out[0].dtype) for gr in grads])
    dx = d[0][..., :D] if case["sliced"] else d[0]
    return dict(zip(_names(case), [t.detach() for t in (*out, dx, *d[1:])]))


def check_case(case, device, dtype, tol):
    from models.conv_triton import conv_pair_silu
    got = run_case(case, device, dtype, conv_pair_silu)
    want = run_case(case, device, dtype, None)
    errors = {}
    for n in _names(case):
        assert got[n].shape == want[n].shape, f"{n}: {got[n].shape} vs {want[n].shape}"
        assert got[n].dtype == (dtype if n in ("u_f", "u_b", "q_f", "q_b", "dx") else torch.float32), \
            f"{n}: {got[n].dtype}"
        errors[n] = ((got[n].double() - want[n]).abs().max() / want[n].abs().max().clamp_min(1e-6)).item()
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errors})"
    assert got["u_f"].is_contiguous() and got["u_b"].is_contiguous()


# ---------------------------------------------------------------- CPU, under Triton's interpreter (child process)

def _child_main(out_path):
    checks = [(c["id"], lambda c=c: check_case(c, "cpu", torch.float32, 1e-5)) for c in CASES]
    checks += [(f"bf16-{c['id']}", lambda c=c: check_case(c, "cpu", torch.bfloat16, 2e-2)) for c in BF16_CASES]
    run_checks(checks, out_path)


@pytest.fixture(scope="module")
def interpreted_results(tmp_path_factory):
    return run_interpreted(__file__, tmp_path_factory, timeout=600)


@pytest.mark.parametrize("check", [c["id"] for c in CASES] + [f"bf16-{c['id']}" for c in BF16_CASES])
def test_interpreted_matches_reference(check, interpreted_results):
    failure = interpreted_results[check]
    assert failure is None, failure


def test_bad_shapes_are_refused():
    pytest.importorskip("triton")
    from models.conv_triton import conv_pair_silu
    x, w, b = torch.zeros(2, 5, 8), torch.zeros(8, 4), torch.zeros(8)
    with pytest.raises(ValueError, match=r"weights must be \(8, K\)"):
        conv_pair_silu(x, w, b, torch.zeros(8, 3), b)
    with pytest.raises(ValueError, match=r"weights must be \(8, K\)"):
        conv_pair_silu(x, w, torch.zeros(7), w, b)
    with pytest.raises(ValueError, match="batch 65536 is above 65535"):
        conv_pair_silu(torch.zeros(65536, 1, 8), w, b, w, b)
    with pytest.raises(ValueError, match=r"projections must both be given, \(P, 8\) each"):
        conv_pair_silu(x, w, b, w, b, torch.zeros(3, 8), None)
    with pytest.raises(ValueError, match=r"projections must both be given, \(P, 8\) each"):
        conv_pair_silu(x, w, b, w, b, torch.zeros(3, 8), torch.zeros(3, 7))


# ---------------------------------------------------------------- GPU

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def full_fp32_matmuls(monkeypatch):
    """fp32 matrix products in full precision: training turns TF32 on for the whole process (training/engine.py), and
    TF32's 10-bit mantissa puts the projections' products ~3e-4 from the fp64 reference, above the fp32 tolerance."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_gpu_small_cases(case):
    check_case(case, "cuda", torch.float32, 1e-5)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", MODEL_CASES, ids=[c["id"] for c in MODEL_CASES])
def test_gpu_model_shapes(case, dtype):
    check_case(case, "cuda", dtype, 1e-5 if dtype == torch.float32 else 2e-2)


if __name__ == "__main__":
    _child_main(sys.argv[1])

"""models/scan.py: the pure-PyTorch selective scan against a naive float64 loop, and backend resolution."""
import itertools

import pytest
import torch

from models.scan import SCAN_CHOICES, get_scan_fn, resolve_scan, selective_scan_ref

BATCH, DIM, STATE, LENGTH = 2, 3, 4, 7


def naive_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The S6 recurrence written out one time step and one element at a time, in float64."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    bsz, dim, length = u.shape
    out = torch.zeros(bsz, dim, length, dtype=torch.float64)
    for b in range(bsz):
        for d in range(dim):
            h = [torch.zeros((), dtype=torch.float64) for _ in range(A.shape[1])]
            for t in range(length):
                dt = delta[b, d, t]
                if delta_bias is not None:
                    dt = dt + delta_bias[d].double()
                if delta_softplus:
                    dt = torch.log(1 + torch.exp(dt))
                y = torch.zeros((), dtype=torch.float64)
                for n in range(A.shape[1]):
                    h[n] = torch.exp(dt * A[d, n]) * h[n] + dt * B[b, n, t] * u[b, d, t]
                    y = y + C[b, n, t] * h[n]
                if D is not None:
                    y = y + D[d].double() * u[b, d, t]
                if z is not None:
                    zt = z[b, d, t].double()
                    y = y * zt / (1 + torch.exp(-zt))
                out[b, d, t] = y
    return out


def make_inputs(seed, with_D, with_z, with_bias, softplus):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g)
    u = rand(BATCH, DIM, LENGTH)
    # without softplus delta is used as is: keep it positive, as a step size is
    delta = rand(BATCH, DIM, LENGTH) if softplus else torch.rand(BATCH, DIM, LENGTH, generator=g) * 0.5 + 0.05
    A = -torch.exp(rand(DIM, STATE) * 0.5)
    B, C = rand(BATCH, STATE, LENGTH), rand(BATCH, STATE, LENGTH)
    kw = {}
    if with_D:
        kw["D"] = rand(DIM)
    if with_z:
        kw["z"] = rand(BATCH, DIM, LENGTH)
    if with_bias:
        kw["delta_bias"] = rand(DIM) * 0.3 if softplus else torch.rand(DIM, generator=g) * 0.2
    return (u, delta, A, B, C), kw


COMBOS = list(itertools.product([False, True], repeat=4))


@pytest.mark.parametrize("with_D,with_z,with_bias,softplus", COMBOS,
                         ids=[f"D{int(a)}-z{int(b)}-bias{int(c)}-sp{int(d)}" for a, b, c, d in COMBOS])
def test_ref_matches_naive_loop_outputs_and_gradients(with_D, with_z, with_bias, softplus):
    pos, kw = make_inputs(17, with_D, with_z, with_bias, softplus)
    names = ["u", "delta", "A", "B", "C"] + list(kw)
    ref_in = [t.clone().requires_grad_(True) for t in list(pos) + list(kw.values())]
    nv_in = [t.double().clone().requires_grad_(True) for t in list(pos) + list(kw.values())]

    out = selective_scan_ref(*ref_in[:5], **dict(zip(kw, ref_in[5:])), delta_softplus=softplus)
    expected = naive_scan(*nv_in[:5], **dict(zip(kw, nv_in[5:])), delta_softplus=softplus)
    assert out.shape == (BATCH, DIM, LENGTH)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)

    w = torch.randn(BATCH, DIM, LENGTH, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad((out * w).sum(), ref_in)
    expected_grads = torch.autograd.grad((expected * w.double()).sum(), nv_in)
    for name, g, eg in zip(names, grads, expected_grads):
        assert g is not None and g.shape == eg.shape, name
        assert eg.abs().max() > 0, f"the naive gradient of {name} is zero: the check would be vacuous"
        torch.testing.assert_close(g.double(), eg, rtol=1e-4, atol=1e-5, msg=lambda m: f"d out / d {name}: {m}")


def test_options_change_the_result():
    """Each option does something: a scan that ignored D, z, delta_bias or softplus would fail here."""
    (u, delta, A, B, C), kw = make_inputs(5, True, True, True, True)
    full = selective_scan_ref(u, delta, A, B, C, **kw, delta_softplus=True)
    for drop in ("D", "z", "delta_bias"):
        partial = {k: v for k, v in kw.items() if k != drop}
        assert not torch.allclose(full, selective_scan_ref(u, delta, A, B, C, **partial, delta_softplus=True)), drop
    assert not torch.allclose(full, selective_scan_ref(u, delta.abs(), A, B, C, **kw, delta_softplus=False))


@pytest.mark.parametrize("reverse", [False, True])
def test_out_scale_and_out_add_are_the_epilogue(reverse):
    """out_scale * scan + out_add, forward and reverse (out_add is in the tokens' order either way), and out_add's
    gradient is the output's."""
    (u, delta, A, B, C), kw = make_inputs(7, True, True, True, True)
    add = torch.randn(BATCH, DIM, LENGTH, generator=torch.Generator().manual_seed(1), requires_grad=True)
    plain = selective_scan_ref(u, delta, A, B, C, **kw, delta_softplus=True, reverse=reverse)
    out = selective_scan_ref(u, delta, A, B, C, **kw, delta_softplus=True, reverse=reverse, out_scale=0.5,
                             out_add=add)
    torch.testing.assert_close(out, 0.5 * plain + add)
    w = torch.randn(BATCH, DIM, LENGTH)
    (g,) = torch.autograd.grad((out * w).sum(), add)
    torch.testing.assert_close(g, w)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_output_dtype_follows_u(dtype):
    (u, delta, A, B, C), kw = make_inputs(11, True, True, True, True)
    out = selective_scan_ref(u.to(dtype), delta, A, B, C, **kw, delta_softplus=True)
    assert out.dtype == dtype
    expected = naive_scan(u.to(dtype), delta, A, B, C, **kw, delta_softplus=True)
    tol = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float64: 1e-5}[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


def test_bf16_inputs_everywhere_give_bf16_output_and_grads():
    (u, delta, A, B, C), kw = make_inputs(13, True, True, True, True)
    ins = [t.bfloat16().requires_grad_(True) for t in (u, delta, B, C)]
    out = selective_scan_ref(ins[0], ins[1], A, ins[2], ins[3], **kw, delta_softplus=True)
    assert out.dtype == torch.bfloat16
    grads = torch.autograd.grad(out.float().sum(), ins)
    for g, t in zip(grads, ins):
        assert g.dtype == torch.bfloat16 and torch.isfinite(g.float()).all()


def test_resolve_scan_on_cpu():
    assert resolve_scan("auto", "cpu") == "ref"
    assert resolve_scan("auto", torch.device("cpu")) == "ref"
    assert resolve_scan("ref", "cpu") == "ref"
    assert get_scan_fn("ref") is selective_scan_ref
    assert set(SCAN_CHOICES) == {"auto", "ref", "cuda", "triton"}


def test_triton_is_the_kernel_file_function():
    pytest.importorskip("triton")
    from models.scan_triton import selective_scan_triton
    assert get_scan_fn("triton") is selective_scan_triton


@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_resolve_scan_gpu_backend_on_cpu_is_a_clear_error(name):
    with pytest.raises(ValueError) as e:
        resolve_scan(name, "cpu")
    msg = str(e.value)
    assert f"--scan {name}" in msg and "CUDA" in msg and "cpu" in msg


@pytest.mark.parametrize("name", ["foo", "", "REF", "mamba"])
def test_resolve_scan_unknown_name(name):
    with pytest.raises(ValueError) as e:
        resolve_scan(name, "cpu")
    msg = str(e.value)
    assert repr(name) in msg
    for choice in SCAN_CHOICES:
        assert choice in msg


def test_get_scan_fn_unknown_backend():
    with pytest.raises(ValueError):
        get_scan_fn("auto")  # "auto" must be resolved first


def test_auto_prefers_triton_then_mamba_ssm_then_ref_on_cuda(monkeypatch):
    import models.scan as scan
    for triton, mamba, expected in ((True, True, "triton"), (False, True, "cuda"), (False, False, "ref")):
        monkeypatch.setattr(scan, "triton_scan_available", lambda t=triton: t)
        monkeypatch.setattr(scan, "mamba_ssm_available", lambda m=mamba: m)
        assert scan.resolve_scan("auto", "cuda") == expected

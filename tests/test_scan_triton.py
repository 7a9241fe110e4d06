"""Tests of the Triton selective scan (models/scan_triton.py) against the PyTorch reference (models/scan.py).

CPU: the kernels run under Triton's interpreter. Triton reads TRITON_INTERPRET when a kernel is decorated, that is
when models.scan_triton is first imported, so setting it in this process would be too late if another test module
imported the kernels first, and it would leak into every later test module and subprocess. So the interpreted cases
all run in one child process (this file run as a script) that gets TRITON_INTERPRET=1 in its environment before it
imports anything; each case is then checked by its own test here. They are skipped where a GPU exists: there the gpu
tests run the same cases compiled.

GPU (@pytest.mark.gpu): the same small cases, then model-sized ones (B=64, D=768, N=16, L=65 and 257, and a batch of 1)
in fp32 and bf16 against the reference and, when mamba-ssm is installed, against its CUDA kernel.

The scan pair (both directions as one op) is checked against two single scans composed as the mixer composes them,
on the CPU's small cases and, on a GPU, the same cases and the model's shapes.
"""
import os
import sys

import pytest
import torch

from conftest import ROOT, run_checks, run_interpreted
from models.scan import selective_scan_ref

GRADS = ("du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias", "dout_add")


def _case(B, D, N, L, has_D=True, has_z=True, bias=True, softplus=True, layout="bld", seed=0, reverse=False,
          add=False):
    """add: the output epilogue out_scale=0.5, out_add (as the mixer's second direction calls it)."""
    opts = "".join(flag for flag, on in (("D", has_D), ("z", has_z), ("b", bias), ("sp", softplus),
                                         ("rev", reverse), ("add", add)) if on) or "plain"
    return dict(id=f"B{B}-D{D}-N{N}-L{L}-{opts}-{layout}", B=B, D=D, N=N, L=L, has_D=has_D, has_z=has_z,
                bias=bias, softplus=softplus, layout=layout, seed=seed, reverse=reverse, add=add)


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
    _case(1, 24, 16, 17, seed=8, add=True),
    _case(2, 8, 4, 10, has_z=False, layout="bdl", seed=9, reverse=True, add=True),
]
# The backward's chunk lengths and the forward's group of steps loaded together (one B/C register holds 4 steps at
# 16 bf16 states, so 5 steps take two), other than the configured ones that run every case above: on cases with a
# partial last chunk or group, a reverse scan and a missing z, and at L = 1 and L = 12 (one chunk or group, and one
# longer than the sequence). bf16 inputs take the packed loads of B and C.
VARIANTS = {"chunk1": dict(CHUNK=1), "chunk2": dict(CHUNK=2), "chunk3": dict(CHUNK=3), "chunk5": dict(CHUNK=5),
            "group1": dict(GROUP=1), "group5": dict(GROUP=5)}
VARIANT_CASES = [CASES[2], CASES[4], CASES[8]]
# (B, L, N) B and C, even N: the packed loads; the last as the mixer's second direction calls it
BF16_CASES = [CASES[2], CASES[8], _case(2, 40, 16, 9, seed=11, reverse=True, add=True)]
SHORT_CASES = [CASES[0], CASES[7]]  # L = 1 and L = 12


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
        out_add=seq(torch.randn(Bsz, L, D, generator=g)) if case.get("add") else None,
    )


def run_scan(fn, inputs, softplus, reverse=False):
    """Output and gradients (None for absent inputs) of one scan function; with out_add, out_scale is 0.5."""
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "out_add")
    leaves = {k: inputs[k].detach().clone().requires_grad_() for k in names if inputs.get(k) is not None}
    epilogue = dict(out_scale=0.5, out_add=leaves["out_add"]) if "out_add" in leaves else {}
    out = fn(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], D=leaves.get("D"),
             z=leaves.get("z"), delta_bias=leaves.get("delta_bias"), delta_softplus=softplus, reverse=reverse,
             **epilogue)
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


def check_case(case, device, dtype, tol, variant=None):
    """variant: models.scan_triton's settings (CHUNK, GROUP) to use instead of the configured ones."""
    import models.scan_triton as st
    inputs = make_inputs(case, device, dtype)
    saved = {k: getattr(st, k) for k in (variant or {})}
    try:
        for k, v in (variant or {}).items():
            setattr(st, k, v)
        got = run_scan(st.selective_scan_triton, inputs, case["softplus"], case["reverse"])
    finally:
        for k, v in saved.items():
            setattr(st, k, v)
    want = run_scan(selective_scan_ref, inputs, case["softplus"], case["reverse"])
    errors = compare(got, want)
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errors})"
    # the output is stored like u: channels contiguous for the model's transposed views
    assert (got["out"].stride(1) == 1) == (inputs["u"].stride(1) == 1)


# The scan pair: batch 2, L not a power of two, one step, several channel blocks, with and without D and delta_bias,
# both layouts; the backward direction's inputs drawn with another seed.
PAIR_CASES = [
    _case(2, 40, 16, 17, seed=20),
    _case(2, 8, 4, 1, seed=21),
    _case(2, 24, 16, 9, has_D=False, bias=False, seed=22),
    _case(1, 16, 8, 6, has_D=False, layout="bdl", seed=23),
    _case(2, 8, 16, 13, bias=False, softplus=False, seed=24),
]
PAIR_BF16_CASES = [PAIR_CASES[0], PAIR_CASES[2]]  # (B, L, N) B and C, even N: the packed loads
PAIR_NAMES = ("u", "delta", "A", "B", "C", "D", "delta_bias")


def run_pair(pair, inputs_f, inputs_b, softplus):
    """Output and every input's gradient of the mixer's two scans over one z, as {"out", "dz", "f.du", ..., "b.du",
    ...} (None for absent inputs): by the scan pair (pair=True), or by two selective_scan_triton calls composed as the
    mixer composed them before the pair (the second reverse, both halved, the first's output added by the second).
    Also "dz.f": z's gradient through the forward direction alone (two calls only)."""
    from models.scan_triton import selective_scan_pair_triton, selective_scan_triton
    leaves = [{k: x[k].detach().clone().requires_grad_() for k in PAIR_NAMES if x[k] is not None}
              for x in (inputs_f, inputs_b)]
    z = inputs_f["z"].detach().clone().requires_grad_()
    args = [[lv.get(k) for k in PAIR_NAMES] for lv in leaves]
    extra = {}
    if pair:
        out = selective_scan_pair_triton(*args[0], *args[1], z, delta_softplus=softplus)
    else:
        out = None
        for (u, delta, A, B, C, D, bias), reverse in zip(args, (False, True)):
            out = selective_scan_triton(u, delta, A, B, C, D, z=z, delta_bias=bias, delta_softplus=softplus,
                                        reverse=reverse, out_scale=0.5, out_add=out)
            if not reverse:
                extra["dz.f"] = torch.autograd.grad(out, z, inputs_f["dout"], retain_graph=True)[0]
    flat = [x for lv in leaves for x in lv.values()] + [z]
    grads = iter(torch.autograd.grad(out, flat, inputs_f["dout"]))
    result = {f"{d}.d{k}": (next(grads) if k in lv else None) for d, lv in zip("fb", leaves) for k in PAIR_NAMES}
    return dict(result, out=out, dz=next(grads), **extra)


def check_pair(case, device, dtype, tol):
    """The scan pair's output and every gradient equal two single scans composed as the mixer composed them. The same
    kernels: in fp32 they differ only in the order of dB's and dC's atomic adds on a GPU and in z's gradient's add
    (compiled, fused with the multiply before it into one fma); in bf16 z's gradient is also rounded once, not twice.
    z's gradient is both directions' sum: further from either direction's alone than 10 * tol."""
    inputs_f = make_inputs(case, device, dtype)
    inputs_b = make_inputs(dict(case, seed=case["seed"] + 100), device, dtype)
    got = run_pair(True, inputs_f, inputs_b, case["softplus"])
    want = run_pair(False, inputs_f, inputs_b, case["softplus"])
    errors = {}
    for name, a in got.items():
        b = want[name]
        assert (a is None) == (b is None), f"{name}: one of the two is None"
        if b is not None:
            assert a.shape == b.shape and a.dtype == b.dtype, f"{name}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
            assert torch.isfinite(a).all(), f"{name}: not finite"
            errors[name] = _rel(a, b)
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errors})"
    assert got["out"].stride() == want["out"].stride()
    alone = {"forward": want["dz.f"], "backward": want["dz"] - want["dz.f"]}
    for direction, dz in alone.items():
        assert _rel(got["dz"], dz) > 10 * tol, f"z's gradient is the {direction} direction's alone"


def check_pair_ops():
    """torch.library's checks of the pair's two custom ops (schema, autograd registration, fake tensors against real
    ones, AOT dispatch): what torch.compile relies on, on a case without D and delta_bias (absent gradients)."""
    import models.scan_triton as st
    case = PAIR_CASES[2]
    inputs = [make_inputs(case, "cpu"), make_inputs(dict(case, seed=case["seed"] + 100), "cpu")]
    args = [None if x[k] is None else x[k].requires_grad_() for x in inputs for k in PAIR_NAMES]
    z = inputs[0]["z"].requires_grad_()
    torch.library.opcheck(st._pair_fwd_op, (*args, z, True))
    torch.library.opcheck(st._pair_bwd_op, (inputs[0]["dout"], *(None if a is None else a.detach() for a in args),
                                            z.detach(), True))


def _rel(a, b):
    """Max abs difference relative to b's max abs value."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


def check_model(compiled):
    """A small Vim: loss and every gradient with a Triton scan (optionally under torch.compile, where the scan is
    an opaque custom operator and the conv, SiLU and the rest are fused) equal the reference path's."""
    from models.vim import build_model
    torch.manual_seed(0)
    model = build_model("mamba_tiny", 10, embed_dim=16, depth=2, patch_size=8, drop_path=0.0)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    results = []
    for scan in ("ref", "triton"):
        model.set_kernels(scan, False)
        model.zero_grad()
        run = torch.compile(model) if (compiled and scan == "triton") else model
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
    checks = [(case["id"], lambda case=case: check_case(case, "cpu", torch.float32, tol=1e-4)) for case in CASES]
    # bf16 with B and C read two per 32-bit word, as the model's x_proj output is stored
    checks += [(f"bf16-{case['id']}", lambda case=case: check_case(case, "cpu", torch.bfloat16, tol=2e-2))
               for case in BF16_CASES]
    checks += [("model_eager", lambda: check_model(compiled=False)), ("model_compiled", lambda: check_model(True))]
    checks += [(f"pair-{case['id']}", lambda case=case: check_pair(case, "cpu", torch.float32, tol=1e-6))
               for case in PAIR_CASES]
    checks += [(f"pair-bf16-{case['id']}", lambda case=case: check_pair(case, "cpu", torch.bfloat16, tol=2e-2))
               for case in PAIR_BF16_CASES]
    checks += [("pair_ops", check_pair_ops)]
    for variant, settings in VARIANTS.items():
        checks += [(f"{variant}-{case['id']}",
                    lambda case=case, settings=settings: check_case(case, "cpu", torch.float32, 1e-4, settings))
                   for case in VARIANT_CASES + SHORT_CASES]
    run_checks(checks, out_path)


@pytest.fixture(scope="module")
def interpreted_results(tmp_path_factory):
    return run_interpreted(__file__, tmp_path_factory, timeout=900)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_interpreted_matches_reference(case, interpreted_results):
    failure = interpreted_results[case["id"]]
    assert failure is None, failure


@pytest.mark.parametrize("check", ["model_eager", "model_compiled"])
def test_interpreted_model_matches_reference(check, interpreted_results):
    failure = interpreted_results[check]
    assert failure is None, failure


@pytest.mark.parametrize("case", BF16_CASES, ids=[c["id"] for c in BF16_CASES])
def test_interpreted_bf16_matches_reference(case, interpreted_results):
    failure = interpreted_results[f"bf16-{case['id']}"]
    assert failure is None, failure


@pytest.mark.parametrize("case", PAIR_CASES, ids=[c["id"] for c in PAIR_CASES])
def test_interpreted_pair_matches_two_scans(case, interpreted_results):
    failure = interpreted_results[f"pair-{case['id']}"]
    assert failure is None, failure


@pytest.mark.parametrize("case", PAIR_BF16_CASES, ids=[c["id"] for c in PAIR_BF16_CASES])
def test_interpreted_pair_bf16_matches_two_scans(case, interpreted_results):
    failure = interpreted_results[f"pair-bf16-{case['id']}"]
    assert failure is None, failure


def test_interpreted_pair_ops_pass_torch_librarys_checks(interpreted_results):
    assert interpreted_results["pair_ops"] is None, interpreted_results["pair_ops"]


def test_backward_scratch_holds_every_chunk_start_but_the_first():
    """Pass 1 stores the state that starts each chunk but the first (per block of 32 channels and batch element: fp32
    for fp32 inputs, else bf16); pass 2 reads them back. One chunk (L <= CHUNK) stores nothing (a one-value
    placeholder)."""
    pytest.importorskip("triton")
    import models.scan_triton as st
    for dtype, n, L in [(torch.bfloat16, 16, 7), (torch.float32, 16, 13), (torch.float32, 4, 3),
                        (torch.float32, 16, 1)]:
        x = make_inputs(_case(2, 40, n, L), "cpu", dtype)
        grid, args, meta, _ = st._backward_launch(x["dout"], x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"],
                                                  x["z"], x["delta_bias"], True, False)
        ck = args[17]
        assert grid == (2, 2) and "PASS" not in meta and ck.dtype == dtype
        chunks = -(-L // meta["CHUNK"])
        assert ck.numel() == max((chunks - 1) * grid[0] * grid[1] * meta["BLOCK_N"] * 32, 1), (dtype, n, L)


def test_the_backward_ops_run_only_their_kernels_and_one_zero_fill(monkeypatch):
    """Inside the scan pair's and the conv pair's backward ops (opaque to torch.compile, so each torch op there is an
    eager launch a step) run only the Triton kernels, buffer allocations and views, and one zero fill for both
    directions' dB and dC: the sums, transposes, casts and products are in the autograd formulas, which torch.compile
    traces and fuses."""
    pytest.importorskip("triton")
    from torch.utils._python_dispatch import TorchDispatchMode
    import models.conv_triton as ct
    import models.scan_triton as st
    launches = []

    class Stub:  # the kernels, counted and not run
        def __getitem__(self, grid):
            return lambda *args, **meta: launches.append(meta.get("PASS"))

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(st, "_bwd_kernel", Stub())
    monkeypatch.setattr(ct, "_conv_bwd_kernel", Stub())
    allowed = {"empty", "transpose", "select", "unbind"}
    f, b = (make_inputs(_case(2, 40, 16, 7, seed=seed), "cpu", torch.bfloat16) for seed in (0, 1))
    names = ("u", "delta", "A", "B", "C", "D", "delta_bias")
    with Record() as record:
        st._pair_backward(f["dout"], *(f[k] for k in names), *(b[k] for k in names), f["z"], True)
    assert launches == [1, 2, 1, 2]
    assert record.ops.count("zeros") == 1 and set(record.ops) - allowed == {"zeros"}, record.ops
    x, w, bias = torch.randn(2, 7, 40, dtype=torch.bfloat16), torch.randn(40, 4), torch.randn(40)
    for e in (None, x.clone()):
        du_b, e_b = x.clone(), None if e is None else e.clone()
        with Record() as record:
            ct._conv_pair_backward(x, du_b, e, e_b, x, w, bias, w, bias)
        assert set(record.ops) <= allowed, record.ops
    assert len(launches) == 6


def test_the_pairs_second_backward_adds_into_the_firsts_dz():
    """Given dz_out (the scan pair's second backward), pass 2 stores z's gradient into that buffer, adding to it
    (DZ_ADD), and allocates none of its own; without it, a new buffer and no add. A dz_out unlike z is refused."""
    pytest.importorskip("triton")
    import models.scan_triton as st
    x = make_inputs(_case(2, 40, 16, 7), "cpu", torch.bfloat16)
    ins = (x["dout"], x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], True, False)
    _, args, meta, buffers = st._backward_launch(*ins)
    assert meta["DZ_ADD"] is False and args[11] is buffers[2] and buffers[2].shape == x["z"].shape
    dz = torch.empty_like(x["z"])
    _, args, meta, buffers = st._backward_launch(*ins, dz_out=dz)
    assert meta["DZ_ADD"] is True and args[11] is dz and buffers[2] is dz
    assert args[-3:] == dz.stride()
    for bad in (dz.float(), dz[..., :6]):
        with pytest.raises(ValueError, match="dz_out must be"):
            st._backward_launch(*ins, dz_out=bad)


def test_the_pair_checks_each_direction():
    pytest.importorskip("triton")
    from models.scan_triton import selective_scan_pair_triton
    f, b = (make_inputs(_case(1, 8, 4, 6, seed=s), "cpu") for s in (0, 1))
    args_f, args_b = ([x[k] for k in PAIR_NAMES] for x in (f, b))
    with pytest.raises(ValueError, match="B and C must be"):
        selective_scan_pair_triton(*args_f, *args_b[:3], args_b[3][..., :5], *args_b[4:], f["z"])
    with pytest.raises(ValueError, match="D and delta_bias must be"):
        selective_scan_pair_triton(*args_f[:5], f["D"][:4], *args_f[6:], *args_b, f["z"])
    with pytest.raises(ValueError, match="u, delta, z and out_add must all be"):
        selective_scan_pair_triton(*args_f, *args_b, f["z"][..., :5])
    with pytest.raises(ValueError, match="needs z"):
        selective_scan_pair_triton(*args_f, *args_b, None)


VARIANT_IDS = [f"{variant}-{case['id']}" for variant in VARIANTS for case in VARIANT_CASES + SHORT_CASES]


@pytest.mark.parametrize("check", VARIANT_IDS)
def test_interpreted_variants_match_reference(check, interpreted_results):
    failure = interpreted_results[check]
    assert failure is None, failure


def test_packed_loads_only_where_they_read_the_right_values():
    """B and C are read two bf16 per 32-bit word only when each step's values are contiguous and the words aligned,
    with an even number of states."""
    pytest.importorskip("triton")
    import models.scan_triton as st
    x = torch.zeros(2, 9, 24 + 32, dtype=torch.bfloat16)  # x_proj's output: dt, B, C side by side
    B, C = x[..., 24:40].transpose(1, 2), x[..., 40:].transpose(1, 2)
    assert st._packed(B, C)
    assert not st._packed(B.float(), C.float())
    assert not st._packed(B.contiguous(), C.contiguous())           # (B, N, L): a step's values are L apart
    assert not st._packed(x[..., 25:41].transpose(1, 2), C)         # a word would straddle two values
    assert not st._packed(x[..., 24:39].transpose(1, 2), x[..., 39:54].transpose(1, 2))  # 15 states


def test_kernels_unpack_no_nested_tuples():
    """The Triton that comes with torch 2.11 fails to build a kernel's cache key (at its first launch in a process)
    with "TypeError: unhashable type: 'list'" when the kernel assigns to a nested tuple such as ``(a, b), c = x``;
    Triton 3.8 accepts it. So no kernel (the scan's, the mixer's convs') may use one."""
    import ast
    nested = []
    for name in ("scan_triton.py", "conv_triton.py"):
        tree = ast.parse(open(os.path.join(ROOT, "models", name)).read())
        nested += [f"{name} line {node.lineno}" for node in ast.walk(tree) if isinstance(node, (ast.Assign, ast.For))
                   for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
                   if isinstance(target, ast.Tuple) and any(isinstance(e, (ast.Tuple, ast.List)) for e in target.elts)]
    assert not nested, nested


def test_compiled_kernels_use_one_instruction_math_and_do_not_spill():
    """On a GPU the softplus and sigmoids take the special-function unit's single instructions (Triton's exact log
    and division are ~30-instruction sequences per step), and the backward keeps its chunk in registers: compiled for
    sm_90 here (the interpreter runs the exact forms, so only this sees the GPU's math and shared memory: the forward
    and both passes of the backward read B_t and C_t back from it). The backward's pass 1 runs as a kernel of
    its own so that it is not held to pass 2's registers: it takes at most half as many. Pass 2 as the scan pair's
    second backward runs it (adding its dz into the first's) does not spill either."""
    pytest.importorskip("triton")
    from tools import scan_regs
    regs = {}
    for kind in ("fwd", "pass1", "pass2", "pass2_dz_add"):
        compiled = scan_regs.compile_kernel(kind, 90)
        ptx = compiled.asm["ptx"]
        assert "div.full" not in ptx and "div.rn" not in ptx and "div.approx" in ptx, kind
        assert ("lg2.approx" in ptx) and "ex2.approx.f32" not in ptx, kind  # each exp2 flushes denormals: 1 MUFU
        regs[kind], stack = scan_regs.resource_usage(compiled)
        assert regs[kind] <= 255 and stack == 0, (kind, regs[kind], stack)
        if kind.startswith("pass2"):  # dB_t's and dC_t's sums over the lanes through shared memory (16 states)
            assert "ld.shared.v4.f32" in ptx
        # B_t (and C_t) through shared memory, read back by broadcast loads: no warp shuffles left
        assert "bcbuf" in ptx and "st.shared.v2.f32" in ptx and "ld.shared.v4.f32" in ptx, kind
        assert "shfl.sync" not in ptx, kind
    assert regs["pass1"] * 2 <= regs["pass2"], regs


def _run_warp(asm, inputs, memory, size):
    """Runs the inline PTX asm (the few instructions the scan's shared-memory code uses) for the 32 lanes of a warp in
    lockstep: inputs[lane] maps operand numbers ($1, $2, ...) to values (integers for bit patterns); memory maps byte
    addresses to 32-bit values and persists between calls. Checks that every access is aligned, inside [0, size) and
    free of bank conflicts: 4-byte banks, 32 of them, and a wavefront serves 32 lanes of 4-byte accesses, 16 of 8-byte
    and 8 of 16-byte ones; two lanes of one wavefront conflict when they touch different words of one bank (lanes
    reading the same word are served by one broadcast). -> each lane's {output number: value}."""
    import re
    regs = [dict(("$%d" % k, v) for k, v in inputs[lane].items()) for lane in range(32)]

    def address(lane, text, width):
        base, off = re.fullmatch(r"\[(\$?\w+)\+(\d+)\]", text).groups()
        a = regs[lane][base] + int(off)
        assert a % width == 0 and 0 <= a and a + width <= size, (text, a)
        return a

    def no_conflicts(addrs, width, line):
        group = 128 // width  # lanes a wavefront serves
        for i in range(0, 32, group):
            banks = {}
            for a in addrs[i:i + group]:
                for word in range(a // 4, (a + width) // 4):
                    banks.setdefault(word % 32, set()).add(word)
            assert all(len(words) == 1 for words in banks.values()), f"bank conflict: {line}"

    def value(r, a):
        return int(a, 0) if re.fullmatch(r"-?(0x[0-9a-fA-F]+|\d+)", a) else r[a]

    for line in [ln.strip() for ln in asm.replace("{ ", "\n").replace("; ", ";\n").splitlines()]:
        op, _, rest = line.rstrip(";").partition(" ")
        args = [a.strip() for a in re.split(r",(?![^{]*})", rest)] if rest else []
        if op in ("mov.u32", "add.u32", "add.f32"):
            for r in regs:
                r[args[0]] = sum(value(r, a) for a in args[1:])
        elif op in ("shl.b32", "and.b32"):  # on 32-bit patterns
            for r in regs:
                x, y = (value(r, a) for a in args[1:])
                r[args[0]] = (x << y if op == "shl.b32" else x & y) & 0xFFFFFFFF
        elif op.startswith(("st.shared", "ld.shared")):
            width = 16 if ".v4." in op else 8 if ".v2." in op else 4
            where, what = (args[0], args[1]) if op.startswith("st") else (args[1], args[0])
            addrs = [address(lane, where, width) for lane in range(32)]
            no_conflicts(addrs, width, line)
            names = what.strip("{}").split(", ")
            for lane, a in enumerate(addrs):
                for i, name in enumerate(names):
                    if op.startswith("st"):
                        memory[a + 4 * i] = regs[lane][name]
                    else:
                        regs[lane][name] = memory[a + 4 * i]
        else:
            assert op in ("", "{", "}", ".reg", "bar.warp.sync"), line
    return [{int(k[1:]): v for k, v in r.items() if re.fullmatch(r"\$\d+", k) and k not in
             ("$%d" % j for j in inputs[lane])} for lane, r in enumerate(regs)]


def test_shared_memory_code_sums_over_lanes_and_keeps_states_without_bank_conflicts():
    """Pass 2's shared-memory code is inline PTX, which the interpreter cannot run; a small model of a warp runs it
    here. The sums over the lanes: lane j ends with the sum over the lanes of its j-th input. The chunk's states: each
    lane gets back the 16 states it stored, for every step of the longest chunk. No access has a bank conflict."""
    import models.scan_triton as st
    g = torch.Generator().manual_seed(0)
    values = torch.randn(32, 32, generator=g, dtype=torch.float64)  # [lane, input]
    row = st.SMEM_ROW_BYTES.value
    inputs = [{**{k + 1: values[lane, k].item() for k in range(32)}, 33: 4 * lane, 34: row * lane}
              for lane in range(32)]
    out = _run_warp(st.SMEM_SUM_ASM.value, inputs, {}, 32 * row)
    torch.testing.assert_close(torch.tensor([o[0] for o in out], dtype=torch.float64), values.sum(0))

    states = torch.randn(st.MAX_CHUNK, 32, 16, generator=g, dtype=torch.float64)  # [step, lane, state]
    memory, size, hrow = {}, st.MAX_CHUNK * 32 * st.HROW.value, st.HROW.value
    for k in range(st.MAX_CHUNK):
        _run_warp(st.STORE_ROW_ASM.value, [{1: lane * hrow + k * 32 * hrow, **{n + 2: states[k, lane, n].item()
                                                                                for n in range(16)}}
                                           for lane in range(32)], memory, size)
    for k in range(st.MAX_CHUNK):
        out = _run_warp(st.LOAD_ROW_ASM.value, [{16: lane * hrow + k * 32 * hrow} for lane in range(32)], memory,
                        size)
        got = torch.tensor([[o[n] for n in range(16)] for o in out], dtype=torch.float64)
        torch.testing.assert_close(got, states[k])


def test_shared_memory_code_passes_b_and_c_to_every_lane_without_bank_conflicts():
    """B_t and C_t through shared memory (the forward's and both backward passes'), run by the model of a warp: each
    lane holds one packed word of B and one of C of a group of 4 steps (lane l: word l mod 8 of step l div 8, two bf16
    states each, as _spread loads them) and stores them, unpacked to fp32; then every lane reads each step's values of
    B and of C with the same loads. They must be the bf16 values of that step, states 0..15 in order, bit for bit; no
    access has a bank conflict (the loads are broadcasts) and all are aligned and inside the 512-byte buffer."""
    import models.scan_triton as st
    g = torch.Generator().manual_seed(1)
    steps, size = st.BC_STEPS.value, 2 * st.BC_BYTES.value
    values = torch.randn(2, steps, 16, generator=g).bfloat16()  # [B or C, step, state]
    words = values.view(torch.int32)  # [B or C, step, word]: word j holds state 2j in its low half (little-endian)
    assert words.shape == (2, steps, 8)

    def word(x, lane):
        return words[x, lane // 8, lane % 8].item() & 0xFFFFFFFF

    def as_float(bits):
        return torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)

    for asm, n in ((st.BC_STORE_ASM, 2), (st.B_STORE_ASM, 1)):
        memory = {}  # (the kernels' addresses: _store_bc's bc + 8 * lane, _shared_step's bc + k * 64, + BC_BYTES for C)
        _run_warp(asm.value, [{**{x + 1: word(x, lane) for x in range(n)}, n + 1: 8 * lane} for lane in range(32)],
                  memory, size)
        for x in range(n):
            for k in range(steps):
                out = _run_warp(st.LOAD_ROW_ASM.value, [{16: x * st.BC_BYTES.value + 64 * k}] * 32, memory, size)
                got = [as_float([o[i] for i in range(16)]) for o in out]
                for lane in range(32):
                    assert torch.equal(got[lane], values[x, k].float()), (n, x, k, lane)


def test_too_many_states_is_refused():
    pytest.importorskip("triton")
    from models.scan_triton import selective_scan_triton
    x = make_inputs(_case(1, 8, 33, 4), "cpu")
    with pytest.raises(ValueError, match="at most 32 states"):
        selective_scan_triton(x["u"], x["delta"], x["A"], x["B"], x["C"])


def test_an_epilogue_addend_of_another_shape_is_refused():
    pytest.importorskip("triton")
    from models.scan_triton import selective_scan_triton
    x = make_inputs(_case(1, 8, 4, 6), "cpu")
    with pytest.raises(ValueError, match="out_add must all be"):
        selective_scan_triton(x["u"], x["delta"], x["A"], x["B"], x["C"], out_scale=0.5, out_add=x["u"][..., :5])


# ---------------------------------------------------------------- GPU, compiled

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
MODEL_CASES = [_case(64, 768, 16, L, seed=10 + L) for L in (65, 257)] + [_case(64, 768, 16, 65, seed=9, reverse=True),
                                                                         _case(1, 768, 16, 257, seed=8, reverse=True)]
TOL = {torch.float32: 1e-3, torch.bfloat16: 2e-2}


# bf16 adds (B, L, N) B and C at 16 states: the packed loads and B_t/C_t through shared memory, here at partial groups
# and chunks, a partial channel block, L = 1 and 12, reverse and the epilogue (the model's shapes are below)
GPU_SMALL_CASES = ([(c, torch.float32, 1e-4) for c in CASES]
                   + [(c, torch.bfloat16, 2e-2) for c in CASES + BF16_CASES[2:]])


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("case,dtype,tol", GPU_SMALL_CASES,
                         ids=[f"{c['id']}-{str(d)[6:]}" for c, d, _ in GPU_SMALL_CASES])
def test_gpu_small_cases(case, dtype, tol):
    check_case(case, "cuda", dtype, tol=tol)


GPU_VARIANT_CASES = VARIANT_CASES + MODEL_CASES[2:]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", GPU_VARIANT_CASES, ids=[c["id"] for c in GPU_VARIANT_CASES])
def test_gpu_variants(case, variant):
    check_case(case, "cuda", torch.float32, tol=1e-4 if case["D"] < 768 else 1e-3, variant=VARIANTS[variant])


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", MODEL_CASES, ids=[c["id"] for c in MODEL_CASES])
def test_gpu_model_shapes_match_reference(case, dtype):
    check_case(case, "cuda", dtype, tol=TOL[dtype])


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("case", PAIR_CASES, ids=[c["id"] for c in PAIR_CASES])
def test_gpu_pair_matches_two_scans(case):
    check_pair(case, "cuda", torch.float32, tol=1e-6)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("case", PAIR_BF16_CASES, ids=[c["id"] for c in PAIR_BF16_CASES])
def test_gpu_pair_bf16_matches_two_scans(case):
    check_pair(case, "cuda", torch.bfloat16, tol=2e-2)


PAIR_MODEL_CASES = [_case(64, 768, 16, L, seed=30 + L) for L in (65, 257)]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", PAIR_MODEL_CASES, ids=[c["id"] for c in PAIR_MODEL_CASES])
def test_gpu_pair_model_shapes_match_two_scans(case, dtype):
    check_pair(case, "cuda", dtype, tol={torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype])


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", MODEL_CASES, ids=[c["id"] for c in MODEL_CASES])
def test_gpu_model_shapes_match_mamba_ssm(case, dtype):
    pytest.importorskip("mamba_ssm.ops.selective_scan_interface")
    from models.scan import get_scan_fn
    from models.scan_triton import selective_scan_triton
    inputs = make_inputs(case, "cuda", dtype)
    errors = compare(run_scan(selective_scan_triton, inputs, case["softplus"], case["reverse"]),
                     run_scan(get_scan_fn("cuda"), inputs, case["softplus"], case["reverse"]))
    bad = {k: v for k, v in errors.items() if not v <= TOL[dtype]}
    assert not bad, f"relative errors above {TOL[dtype]}: {bad} (all: {errors})"


if __name__ == "__main__":
    _child_main(sys.argv[1])

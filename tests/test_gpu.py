"""GPU tests: every fast path computes the same model as the PyTorch reference. Skipped without CUDA."""
import importlib.util

import pytest
import torch

from models.scan import get_scan_fn, selective_scan_ref
from models.vim import build_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
HAS_MAMBA = importlib.util.find_spec("mamba_ssm") is not None
HAS_CONV = importlib.util.find_spec("causal_conv1d") is not None
BACKENDS = [pytest.param("cuda", marks=pytest.mark.skipif(not HAS_MAMBA, reason="mamba-ssm not installed")),
            "triton"]
# Per-dtype tolerances: bf16 inputs carry ~3 significant digits; the scan itself runs in fp32 everywhere.
TOL = {torch.float32: dict(rtol=1e-3, atol=1e-3), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


def scan_inputs(dtype, batch=16, dim=256, state=16, length=65, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    u = r(batch, dim, length).to(dtype)
    delta = (0.5 * r(batch, dim, length)).to(dtype)
    z = r(batch, dim, length).to(dtype)
    A = -torch.exp(0.5 * r(dim, state))
    B, C = r(batch, state, length).to(dtype), r(batch, state, length).to(dtype)
    D, bias = r(dim), 0.1 * r(dim)
    return [t.requires_grad_() for t in (u, delta, A, B, C, D, z, bias)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length", [65, 257])
def test_scan_matches_reference(backend, dtype, length):
    inputs = scan_inputs(dtype, length=length)
    fast = get_scan_fn(backend)
    outs, grads = [], []
    for fn in (selective_scan_ref, fast):
        u, delta, A, B, C, D, z, bias = inputs
        out = fn(u, delta, A, B, C, D, z=z, delta_bias=bias, delta_softplus=True)
        g = torch.autograd.grad(out.float().square().mean(), inputs)
        outs.append(out.float())
        grads.append(g)
    torch.testing.assert_close(outs[1], outs[0], **TOL[dtype])
    for name, a, b in zip("u delta A B C D z bias".split(), grads[1], grads[0]):
        scale = b.float().abs().max().clamp(min=1e-6)
        err = (a.float() - b.float()).abs().max() / scale
        assert err < TOL[dtype]["rtol"] * 10, f"d{name}: max error {err:.2e} of the largest gradient"


@pytest.mark.parametrize("backend,compiled", [
    pytest.param("cuda", False, marks=pytest.mark.skipif(not HAS_MAMBA, reason="mamba-ssm not installed")),
    ("triton", False), ("triton", True)])
@pytest.mark.parametrize("amp", [False, True])
def test_model_fast_path_matches_reference(backend, compiled, amp):
    """Same weights, same batch: loss and every gradient of the kernel path (eager, or under torch.compile)
    equal the reference path's."""
    torch.manual_seed(0)
    model = build_model("mamba_tiny", 10, depth=4, drop_path=0.0).cuda()
    x = torch.randn(32, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (32,), device="cuda")
    results = []
    for scan, conv in (("ref", False), (backend, HAS_CONV and backend == "cuda")):
        model.set_kernels(scan, conv)
        model.zero_grad()
        run = torch.compile(model) if compiled and scan != "ref" else model
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(run(x), y)
        loss.backward()
        results.append((loss.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters()}))
    (loss_ref, g_ref), (loss_fast, g_fast) = results
    tol = TOL[torch.bfloat16 if amp else torch.float32]
    torch.testing.assert_close(loss_fast, loss_ref, **tol)
    for n in g_ref:
        scale = g_ref[n].abs().max().clamp(min=1e-8)
        err = (g_fast[n] - g_ref[n]).abs().max() / scale
        assert err < tol["rtol"] * 10, f"{n}: max gradient error {err:.2e} of its largest value"


@pytest.mark.parametrize("extra", [["--no_compile"], ["--model_ema"], ["--cuda_graphs", "--model_ema"]],
                         ids=["eager", "compiled_ema", "cuda_graphs_ema"])
def test_cli_trains_on_gpu(tmp_path, extra, monkeypatch):
    from tests.conftest import make_cifar
    import train_mamba_baseline
    modes, real_compile = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: modes.append(kw.get("mode")) or real_compile(model, **kw))
    data = make_cifar(str(tmp_path / "d"), n_train=256, n_test=64)
    args = ["--arch", "mamba_tiny", "--depth", "2", "--epochs", "2", "--warmup_epochs", "1", "--batch_size", "64",
            "--data_dir", data, "--save_dir", str(tmp_path / "c"), "--log_dir", str(tmp_path / "l"), "--no_progress"]
    assert train_mamba_baseline.main(args + ["--run_id", "gpu"] + extra) == 0
    log = (tmp_path / "l" / "mamba_tiny_cifar10_baseline_gpu.log").read_text()
    from models.scan import resolve_scan
    assert "scan kernel: " + resolve_scan("auto", "cuda") in log and "bf16 autocast" in log
    graphs, compiled = "--cuda_graphs" in extra, "--no_compile" not in extra  # compiling is the default on a GPU
    assert ("torch.compile" in log) == compiled and ("(CUDA graphs)" in log) == graphs
    assert modes == (["reduce-overhead" if graphs else None] if compiled else [])
    assert "without CUDA graphs" not in log  # they were used, not skipped
    # one more epoch from the last checkpoint (a compiled model saves and resumes plain weights)
    args[args.index("--epochs") + 1] = "3"
    assert train_mamba_baseline.main(args + ["--run_id", "gpu2", "--resume", "auto"] + extra) == 0
    ckpt = torch.load(tmp_path / "c" / "mamba_tiny_cifar10_last.pth", map_location="cpu", weights_only=False)
    assert ckpt["position"]["epoch"] == 3 and not any(k.startswith("_orig_mod") for k in ckpt["model"])


@pytest.mark.parametrize("amp", [True, False], ids=["bf16", "fp32"])
def test_cuda_graph_steps_equal_compiled_steps(monkeypatch, amp):
    """The same three training steps (same weights, same batches, augmentation and drop path off), compiled with and
    without CUDA graphs, in bf16 autocast (as training runs on a GPU) and in fp32: equal losses and weights, so
    replayed graphs read each new batch and the optimizer's in-place updates (no stale inputs or outputs)."""
    import copy
    from models.scan import resolve_scan
    from torch._dynamo.utils import counters
    monkeypatch.setitem(counters, "inductor", type(counters["inductor"])())  # count this test's skips only
    from training.optim import build_optimizer
    from training.step import TrainStep
    torch.manual_seed(0)
    base = build_model("mamba_tiny", 10, depth=2, drop_path=0.0).cuda()
    # the scan kernel training uses: compiled, the reference scan's 64-step loop becomes one huge fused kernel that
    # took ptxas over 5 minutes on an H200
    base.set_kernels(resolve_scan("auto", torch.device("cuda")))
    g = torch.Generator(device="cpu").manual_seed(1)
    batches = [(torch.randint(0, 256, (64, 3, 32, 32), generator=g, dtype=torch.uint8).cuda(),
                torch.randint(0, 10, (64,), generator=g).cuda()) for _ in range(3)]
    runs = []
    for mode in (None, "reduce-overhead"):
        torch._dynamo.reset()
        model = copy.deepcopy(base)
        opt = build_optimizer(model, 1e-3, 0.05, torch.device("cuda"))
        step = TrainStep(model, opt, num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3, use_randaugment=False,
                         use_crop=False, use_flip=False, mixup_alpha=0.0, cutmix_alpha=0.0, amp=amp,
                         train_model=torch.compile(model, mode=mode), cuda_graphs=mode == "reduce-overhead")
        losses = [step([b], 1e-3)[0].item() for b in batches + batches]  # twice: the graphs are recorded, then replayed
        runs.append((losses, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (loss_a, w_a), (loss_b, w_b) = runs
    from training.engine import cuda_graph_skips
    assert cuda_graph_skips() == 0  # the second run replayed CUDA graphs rather than falling back
    assert len(set(loss_b)) == len(loss_b)  # every step saw its own batch and weights
    # Compare each tensor's whole update, not its elements: AdamW turns a gradient difference near zero into a
    # full-size step (its first steps move every weight by about lr, whatever the gradient's size), and the two runs'
    # gradients differ by rounding even in fp32 (cuDNN picks each run's convolution algorithms, the scan adds dB and
    # dC atomically in any order). A graph that missed an optimizer update or replayed a stale batch is off by about
    # its whole update. In bf16, matrix multiplies captured in a graph may also take other cuBLAS kernels.
    tol = dict(rtol=1e-2, atol=1e-3) if amp else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss_b, loss_a, **tol)
    w0 = dict(base.named_parameters())
    for n in w_a:
        update = (w_a[n] - w0[n].detach()).norm()
        assert (w_b[n] - w_a[n]).norm() <= (0.1 if amp else 0.02) * update + 1e-6, \
            (n, (w_b[n] - w_a[n]).norm().item(), update.item())


def test_out_of_memory_is_one_line(tmp_path, capsys):
    """A real CUDA out-of-memory error (mamba_tiny at batch 4,096 and 257 tokens needs ~225 GiB, going by 28 GiB at
    512): one stderr line with the batch and the GPU's memory, exit 2, no traceback."""
    from tests.conftest import make_cifar
    import train_mamba_baseline
    data = make_cifar(str(tmp_path / "d"), n_train=4100, n_test=64)  # 5 batches of 820
    args = ["--arch", "mamba_tiny", "--epochs", "1", "--warmup_epochs", "0", "--batch_size", "4096", "--no_compile",
            "--data_dir", data, "--save_dir", str(tmp_path / "c"), "--log_dir", str(tmp_path / "l"), "--no_progress"]
    try:
        assert train_mamba_baseline.main(args) == 2
    finally:
        torch.cuda.empty_cache()
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and err.count("\n") == 1
    assert "ran out of memory (" in err and " GiB at the peak) at --batch_size 4096" in err and "257 tokens" in err


def test_evaluate_on_gpu_reproduces_the_trainers_last_test(tmp_path):
    """evaluate.py on the GPU (bf16 autocast, the Triton scan, the timed passes) re-measures the trainer's last test
    top-1 of a checkpoint trained on the GPU, and reports its speed."""
    import json
    from tests.conftest import make_cifar
    import evaluate
    import train_mamba_baseline
    data = make_cifar(str(tmp_path / "d"), n_train=256, n_test=64)
    args = ["--arch", "mamba_tiny", "--depth", "2", "--epochs", "2", "--warmup_epochs", "0", "--batch_size", "64",
            "--no_compile", "--data_dir", data, "--save_dir", str(tmp_path / "c"), "--log_dir", str(tmp_path / "l"),
            "--no_progress"]
    assert train_mamba_baseline.main(args) == 0
    path = str(tmp_path / "c" / "mamba_tiny_cifar10_last.pth")
    out = tmp_path / "e.json"
    assert evaluate.main([path, "--data_dir", data, "--batch_size", "32", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    last = torch.load(path, weights_only=True)["position"]["history"][-1]
    assert abs(res["top1"] - last["test_acc"]) <= 100 / 64 + 1e-9  # at most one image apart (bf16 rounding)
    assert res["images_per_s"] > 0 and res["latency_ms"] > 0 and res["epoch"] == 2

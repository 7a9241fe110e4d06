"""End-to-end runs of train_mamba_baseline.main on tiny models and generated data (CPU, a few seconds each):
logs, metrics, checkpoints, subsets, augmentation switches, gradient accumulation, seeds, CIFAR-100, resume."""
import json
import os
import pickle
import re
import shutil

import numpy as np
import pytest
import torch

import train_mamba_baseline
import training.data as data_mod
from conftest import tiny_args
from models.vim import build_model
from training.config import parse_config
from training.optim import build_optimizer

FAST = ["--no_use_randaugment"]
PLAIN = ["--no_use_randaugment", "--no_use_mixup", "--no_use_cutmix", "--no_use_crop", "--no_use_flip",
         "--label_smoothing", "0", "--drop_path", "0"]
RECORD_KEYS = {"epoch", "lr", "train_loss", "test_loss", "test_acc", "test_acc5", "best_acc", "epoch_time",
               "images_per_s"}
TIMES = ("epoch_time", "images_per_s")


@pytest.fixture(autouse=True)
def quiet_process_state():
    """One intra-op thread: tiny tensors run far faster, above all on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Run:
    """One finished invocation: its argv and where it wrote."""

    def __init__(self, base, argv, arch="mamba_tiny", dataset="cifar10"):
        self.base, self.argv = base, argv
        self.save_dir, self.log_dir = base / "ckpt", base / "logs"
        self.stem = f"{arch}_{dataset}"
        self.log_path = self.log_dir / f"{arch}_{dataset}_baseline_test.log"
        self.jsonl_path = self.log_dir / f"{arch}_{dataset}_baseline_test.jsonl"

    def ckpt_path(self, kind):
        return self.save_dir / f"{self.stem}_{kind}.pth"

    def ckpt(self, kind="last"):
        return torch.load(self.ckpt_path(kind), map_location="cpu", weights_only=True)

    def records(self):
        return [json.loads(line) for line in self.jsonl_path.read_text().splitlines()]

    def log(self):
        return self.log_path.read_text()


def run(base, data_dir, *extra, dataset="cifar10", expect=0):
    argv = tiny_args(base, data_dir, *(["--dataset", dataset] if dataset != "cifar10" else []), *extra)
    rc = train_mamba_baseline.main(argv)
    assert rc == expect
    return Run(base, argv, dataset=dataset)


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def without_times(records):
    return [{k: v for k, v in r.items() if k not in TIMES} for r in records]


@pytest.mark.parametrize("device,deterministic,expected", [
    ("cpu", False, False), ("cuda", False, True), ("cuda", True, False)])
def test_compile_default_follows_the_device(device, deterministic, expected):
    from training.engine import default_compile
    assert default_compile(torch.device(device), deterministic) is expected


@pytest.mark.parametrize("deterministic", [False, True])
def test_backend_flags_follow_deterministic(deterministic):
    """cuDNN's autotuner is on for training unless --deterministic asks for repeatable kernels."""
    from training.engine import set_backend_flags
    saved = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    try:
        set_backend_flags(deterministic)
        assert torch.backends.cudnn.benchmark is (not deterministic)
        assert torch.are_deterministic_algorithms_enabled() is deterministic
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.backends.cudnn.benchmark = saved[1]


def test_cuda_graphs_are_refused_with_several_processes(tmp_path, monkeypatch):
    """CUDA graphs are tested in one process only (tests/test_gpu.py); under torchrun the run stops at once."""
    import training.engine as engine
    monkeypatch.setattr(engine.ddp, "init_distributed", lambda backend: (0, 2, 0))
    monkeypatch.setattr(engine, "resolve_device", lambda cfg, local_rank: torch.device("cuda", 0))
    cfg = parse_config(tiny_args(tmp_path, str(tmp_path / "data"), "--cuda_graphs"))
    with pytest.raises(engine.UsageError, match=r"--cuda_graphs needs .* single process \(this run: 2 processes\)"):
        engine.Run(cfg)
    assert not os.path.exists(tmp_path / "logs") and not os.path.exists(tmp_path / "ckpt")


def test_skipped_cuda_graphs_are_counted(monkeypatch):
    """torch.compile's own count of graphs it ran without CUDA graphs is what the run warns about: each skip that
    inductor reports (through the function it calls when it skips) adds one."""
    from torch._dynamo.utils import counters
    from torch._inductor.cudagraph_utils import log_cudagraph_skip_and_bump_counter
    from training.engine import cuda_graph_skips
    monkeypatch.setitem(counters, "inductor", type(counters["inductor"])())
    assert cuda_graph_skips() == 0
    for _ in range(2):
        log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to a test")
    assert cuda_graph_skips() == 2


def test_a_run_warns_once_when_cuda_graphs_were_skipped(tmp_path, cifar10_dir, monkeypatch):
    """--cuda_graphs whose graphs torch.compile ran without CUDA graphs: one warning line after the first epoch.
    (The CPU refuses --cuda_graphs, so the flag is switched on after setup, with the compiled step left eager.)"""
    import training.engine as engine
    from conftest import after_setup
    monkeypatch.setattr(engine, "cuda_graph_skips", lambda: 3)
    after_setup(monkeypatch, lambda r: setattr(r.cfg, "cuda_graphs", True))
    r = run(tmp_path, cifar10_dir, *FAST, "--epochs", "2", "--warmup_epochs", "1", "--train_subset", "8",
            "--test_subset", "8")
    assert r.log().count("warning: --cuda_graphs: torch.compile ran 3 graph(s) without CUDA graphs") == 1


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_a_cuda_graph_step_marks_its_start(cuda_graphs, monkeypatch):
    """With CUDA graphs every optimizer step tells torch a new iteration begins (the last step's graph outputs may
    then be overwritten); without them nothing is called."""
    from training.step import TrainStep
    calls = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: calls.append(1))
    model = build_model("mamba_tiny", 10, embed_dim=16, depth=1, patch_size=8)
    step = TrainStep(model, build_optimizer(model, 1e-3, 0.05, torch.device("cpu")), num_classes=10, mean=(0.5,) * 3,
                     std=(0.25,) * 3, cuda_graphs=cuda_graphs)
    batch = (torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (4,)))
    for _ in range(2):
        step([batch], 1e-3)
    assert len(calls) == (2 if cuda_graphs else 0)


def test_smoke_run_logs_metrics_and_checkpoints(tmp_path, cifar10_dir):
    r = run(tmp_path, cifar10_dir, *FAST, "--epochs", "4", "--warmup_epochs", "1", "--save_freq", "2",
            "--train_subset", "16", "--test_subset", "12")
    # the .log
    log = r.log()
    assert re.search(r"config: .*arch=mamba_tiny .*dataset=cifar10 .*epochs=4", log)
    params = sum(p.numel() for p in build_model("mamba_tiny", 10, embed_dim=16, depth=2, patch_size=8).parameters())
    assert f"{params:,} parameters" in log
    assert re.search(r"device: cpu", log) and "scan kernel: ref | conv kernel: PyTorch" in log
    assert "torch.compile" not in log and "compile=False" in log                # the default on the CPU: off
    assert "16 train / 12 test images" in log and "2 steps/epoch" in log      # the subsets took effect
    epoch_lines = re.findall(r"^.*epoch +(\d+)/4 \|.*$", log, flags=re.M)
    assert epoch_lines == ["1", "2", "3", "4"]
    lines = re.findall(r"^.*epoch +\d+/4 \|.*$", log, flags=re.M)                # time left from epoch 2 on
    assert ["| left " in x for x in lines] == [False, True, True, False]
    # the .jsonl
    recs = r.records()
    assert [x["epoch"] for x in recs] == [1, 2, 3, 4]
    best = 0.0
    for x in recs:
        assert RECORD_KEYS <= set(x)
        assert x["test_acc5"] is None                                          # CIFAR-10: no top-5
        for k in RECORD_KEYS - {"test_acc5", "epoch"}:
            assert isinstance(x[k], float) and np.isfinite(x[k]), k
        assert 0 <= x["test_acc"] <= 100 and x["lr"] > 0 and x["epoch_time"] > 0 and x["images_per_s"] > 0
        assert x["test_acc"] * 12 / 100 == pytest.approx(round(x["test_acc"] * 12 / 100))  # of 12 test images
        best = max(best, x["test_acc"])
        assert x["best_acc"] == best
    # the checkpoints: last, best, every --save_freq epochs
    names = sorted(n for n in os.listdir(r.save_dir) if n.endswith(".pth"))
    assert names == ["mamba_tiny_cifar10_best.pth", "mamba_tiny_cifar10_epoch2.pth", "mamba_tiny_cifar10_epoch4.pth",
                     "mamba_tiny_cifar10_last.pth"]
    assert not [n for n in os.listdir(r.save_dir) if ".tmp" in n]

    ck = r.ckpt("last")
    assert ck["format"] == "vim-cifar-checkpoint/1"
    fresh = build_model("mamba_tiny", 10, embed_dim=16, depth=2, patch_size=8)
    fresh.load_state_dict(ck["model"])                                         # strict: every name, every shape
    opt = build_optimizer(fresh, 1e-3, 0.05, torch.device("cpu"))
    opt.load_state_dict(ck["optimizer"])
    states = list(opt.state.values())
    assert len(states) == len(list(fresh.parameters()))
    assert all(float(s["step"]) == 8 and "exp_avg" in s and "exp_avg_sq" in s for s in states)
    pos = ck["position"]
    assert (pos["epoch"], pos["step_in_epoch"], pos["global_step"]) == (4, 0, 8)
    assert pos["best_acc"] == best and pos["history"] == recs
    assert isinstance(ck["rng"]["torch"], torch.Tensor) and "numpy" in ck["rng"] and "python" in ck["rng"]
    assert ck["config"] == dict(vars(parse_config(r.argv)), compile=False)  # the run resolves --compile's default
    # the other checkpoints are snapshots of their epoch
    assert r.ckpt("epoch2")["position"]["epoch"] == 2 and r.ckpt("epoch2")["position"]["history"] == recs[:2]
    assert_same_weights(r.ckpt("epoch4")["model"], ck["model"])
    best_ck = r.ckpt("best")
    assert best_ck["position"]["best_acc"] == best
    assert recs[best_ck["position"]["epoch"] - 1]["test_acc"] == best
    # the last checkpoint's weights give the logged test accuracy
    fresh.eval()
    data = data_mod.load_cifar("cifar10", cifar10_dir, download=False)["test"]
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in data_mod.MEAN_STD["cifar10"])
    with torch.no_grad():
        logits = fresh((data[0][:12].float() / 255 - mean) / std)
    acc = 100 * (logits.argmax(1) == data[1][:12]).float().mean().item()
    assert acc == pytest.approx(recs[-1]["test_acc"])


def test_every_checkpoint_of_a_run_loads_with_weights_only(tmp_path, cifar10_dir):
    r = run(tmp_path, cifar10_dir, *FAST, "--epochs", "2", "--warmup_epochs", "0", "--save_freq", "1",
            "--train_subset", "8", "--test_subset", "8")
    for kind in ("last", "best", "epoch1", "epoch2"):
        ck = r.ckpt(kind)  # weights_only=True: plain data only
        assert ck["format"] == "vim-cifar-checkpoint/1", kind


def test_train_subset_and_test_subset(tmp_path, cifar10_dir):
    r = run(tmp_path, cifar10_dir, *PLAIN, "--epochs", "1", "--warmup_epochs", "0", "--train_subset", "24",
            "--test_subset", "5")
    assert "24 train / 5 test images" in r.log()
    assert r.ckpt()["position"]["global_step"] == 3                           # 24 images / batch 8
    acc = r.records()[0]["test_acc"]
    assert round(acc * 5 / 100, 6) == round(acc * 5 / 100)                   # a multiple of 1/5


def write_same_train_and_test(data_dir, n=16, seed=0):
    """CIFAR-10 files whose test set is the training set, in the same order."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, n).tolist()
    folder = os.path.join(data_dir, "cifar-10-batches-py")
    os.makedirs(folder)
    per = n // 4
    for i in range(1, 6):
        part = slice((i - 1) * per, i * per) if i <= 4 else slice(n, n)
        with open(os.path.join(folder, f"data_batch_{i}"), "wb") as f:
            pickle.dump({b"data": data[part], b"labels": labels[part]}, f)
    with open(os.path.join(folder, "test_batch"), "wb") as f:
        pickle.dump({b"data": data, b"labels": labels}, f)
    return data_dir


def test_with_everything_off_the_train_loss_is_plain_cross_entropy(tmp_path):
    """No augmentation, no mixing, no smoothing, no drop path and a learning rate too small to move the weights:
    the train loss over the training set equals the test loss (plain cross-entropy) on the same images."""
    d = write_same_train_and_test(str(tmp_path / "data"))
    frozen = ["--lr", "1e-30", "--warmup_lr", "0", "--min_lr", "0", "--weight_decay", "0", "--warmup_epochs", "0",
              "--epochs", "1"]
    r = run(tmp_path / "plain", d, *PLAIN, *frozen)
    rec = r.records()[0]
    assert rec["train_loss"] == pytest.approx(rec["test_loss"], rel=1e-5)
    # label smoothing changes the training loss (and only it)
    s = run(tmp_path / "smooth", d, *PLAIN, *frozen, "--label_smoothing", "0.3").records()[0]
    assert s["test_loss"] == pytest.approx(rec["test_loss"], rel=1e-6)
    assert abs(s["train_loss"] - rec["train_loss"]) > 1e-3


SWITCHES = {
    "mixup": ["--use_mixup"],
    "cutmix": ["--use_cutmix"],
    "randaugment": ["--use_randaugment"],
    "crop": ["--use_crop"],
    "flip": ["--use_flip"],
    "label_smoothing": ["--label_smoothing", "0.1"],
    "drop_path": ["--drop_path", "0.5"],
}


def test_each_augmentation_switch_changes_the_run(tmp_path, cifar10_dir):
    common = ["--epochs", "1", "--warmup_epochs", "0", "--train_subset", "16", "--test_subset", "8"]
    base = run(tmp_path / "base", cifar10_dir, *PLAIN, *common).records()[0]["train_loss"]
    again = run(tmp_path / "again", cifar10_dir, *PLAIN, *common).records()[0]["train_loss"]
    assert again == base
    for name, flags in SWITCHES.items():  # the later flag wins over PLAIN's
        loss = run(tmp_path / name, cifar10_dir, *PLAIN, *common, *flags).records()[0]["train_loss"]
        assert loss != base, f"turning {name} on did not change the run"


def test_mixup_needs_soft_targets_and_alpha(tmp_path, cifar10_dir):
    """With --mixup_alpha 0 --cutmix_alpha 0 the switches are on but do nothing: the same run as with them off."""
    common = [*PLAIN, "--epochs", "1", "--warmup_epochs", "0", "--train_subset", "16", "--test_subset", "8"]
    off = run(tmp_path / "off", cifar10_dir, *common)
    zero = run(tmp_path / "zero", cifar10_dir, *common, "--use_mixup", "--use_cutmix", "--mixup_alpha", "0",
               "--cutmix_alpha", "0")
    assert zero.records()[0]["train_loss"] == off.records()[0]["train_loss"]
    assert_same_weights(zero.ckpt()["model"], off.ckpt()["model"])


def test_accum_steps(tmp_path, cifar10_dir):
    common = [*PLAIN, "--epochs", "1", "--warmup_epochs", "0", "--train_subset", "16", "--test_subset", "8"]
    one = run(tmp_path / "accum1", cifar10_dir, *common, "--batch_size", "4")
    two = run(tmp_path / "accum2", cifar10_dir, *common, "--batch_size", "4", "--accum_steps", "2")
    big = run(tmp_path / "batch8", cifar10_dir, *common, "--batch_size", "8")
    assert one.ckpt()["position"]["global_step"] == 4
    assert two.ckpt()["position"]["global_step"] == 2                          # half the optimizer steps
    assert big.ckpt()["position"]["global_step"] == 2
    assert "global batch 8 = 4 x 2 accum" in two.log() and "2 steps/epoch" in two.log()
    assert "global batch 4 = 4 x 1 accum" in one.log()
    # 2 micro-batches of 4 are one batch of 8: the same images, the same mean gradient, the same update
    # (no randomness is left in PLAIN); only float rounding differs
    w2, w8 = two.ckpt()["model"], big.ckpt()["model"]
    w1 = one.ckpt()["model"]
    gap_same = max((w2[k] - w8[k]).abs().max().item() for k in w2)
    gap_other = max((w1[k] - w8[k]).abs().max().item() for k in w1)
    assert gap_same < 1e-5 < gap_other
    assert two.records()[0]["train_loss"] == pytest.approx(big.records()[0]["train_loss"], rel=1e-5)


def test_seed_reproducibility(tmp_path, cifar10_dir):
    """The full default recipe (RandAugment, Mixup, CutMix, smoothing, drop path): same seed, same weights."""
    common = ["--epochs", "1", "--warmup_epochs", "0", "--train_subset", "16", "--test_subset", "8",
              "--seed", "5"]
    a = run(tmp_path / "a", cifar10_dir, *common)
    b = run(tmp_path / "b", cifar10_dir, *common)
    assert_same_weights(a.ckpt()["model"], b.ckpt()["model"])
    assert without_times(a.records()) == without_times(b.records())
    c = run(tmp_path / "c", cifar10_dir, *common[:-1], "6")
    assert not torch.equal(a.ckpt()["model"]["head.weight"], c.ckpt()["model"]["head.weight"])


def test_cifar100_run(tmp_path, cifar100_dir):
    r = run(tmp_path, cifar100_dir, *FAST, "--epochs", "1", "--warmup_epochs", "0", "--train_subset", "16",
            dataset="cifar100")
    assert r.log_path.exists() and r.ckpt_path("last").exists()
    rec = r.records()[0]
    assert rec["test_acc5"] is not None and rec["test_acc"] <= rec["test_acc5"] <= 100
    assert " top5 " in r.log()
    ck = r.ckpt()
    assert ck["model"]["head.weight"].shape == (100, 16) and ck["config"]["num_classes"] == 100
    assert "16 train / 16 test images" in r.log()


def test_resume_equals_an_uninterrupted_run(tmp_path, cifar10_dir):
    """2 epochs straight == epoch 1, then --resume auto from its checkpoint: same weights, EMA weights, optimizer
    state and metrics (except timings). The full default recipe, so every random draw must line up."""
    common = ["--epochs", "2", "--warmup_epochs", "1", "--train_subset", "16", "--test_subset", "8",
              "--model_ema", "--model_ema_decay", "0.9"]
    full = run(tmp_path / "full", cifar10_dir, *common, "--save_freq", "1")
    part = tmp_path / "part"
    (part / "ckpt").mkdir(parents=True)
    shutil.copy(full.ckpt_path("epoch1"), part / "ckpt" / "mamba_tiny_cifar10_last.pth")
    resumed = run(part, cifar10_dir, *common, "--resume", "auto")
    assert "resumed from" in resumed.log()
    a, b = full.ckpt(), resumed.ckpt()
    assert_same_weights(a["model"], b["model"])
    assert_same_weights(a["model_ema"], b["model_ema"])
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        for name in sa[k]:
            assert torch.equal(torch.as_tensor(sa[k][name]), torch.as_tensor(sb[k][name])), (k, name)
    assert without_times(resumed.records()) == without_times(full.records())
    pa, pb = dict(a["position"]), dict(b["position"])
    assert without_times(pa.pop("history")) == without_times(pb.pop("history"))
    assert pa == pb
    # and a finished run is not resumed again
    again = run(part, cifar10_dir, *common, "--resume", "auto", expect=2)
    assert again.ckpt()["position"]["epoch"] == 2


def test_resume_explicit_path_of_another_model_is_refused(tmp_path, cifar10_dir, capsys):
    r = run(tmp_path / "a", cifar10_dir, *PLAIN, "--epochs", "2", "--warmup_epochs", "0", "--save_freq", "1",
            "--train_subset", "8", "--test_subset", "8")
    capsys.readouterr()
    argv = tiny_args(tmp_path / "b", cifar10_dir, *PLAIN, "--epochs", "2", "--warmup_epochs", "0",
                     "--resume", str(r.ckpt_path("epoch1")), "--embed_dim", "24")
    assert train_mamba_baseline.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("train_mamba_baseline.py: error: ") and "embed_dim" in err


def test_missing_data_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    def fail(dataset, data_dir):
        raise OSError("no network here")

    monkeypatch.setattr(data_mod, "_download", fail)
    argv = tiny_args(tmp_path, str(tmp_path / "nothing"), "--epochs", "1", "--warmup_epochs", "0")
    assert train_mamba_baseline.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("train_mamba_baseline.py: error: cifar10 not found")
    assert "cifar-10-python.tar.gz" in err


def test_a_compiler_failure_is_one_line_that_names_no_compile(tmp_path, cifar10_dir, monkeypatch, capsys):
    """torch.compile failing on the machine (here: a compiled model whose first call fails as inductor does without
    a working C compiler) is one line, exit 2, naming --no_compile; the same command with it then trains."""
    from torch._inductor.exc import InductorError

    class Broken(torch.nn.Module):
        def forward(self, x):
            raise InductorError(RuntimeError("CalledProcessError: gcc: not found"), None)

    with monkeypatch.context() as m:
        m.setattr(torch, "compile", lambda model, **kw: Broken())
        argv = tiny_args(tmp_path, cifar10_dir, *PLAIN, "--epochs", "1", "--warmup_epochs", "0", "--train_subset", "8",
                         "--test_subset", "8")
        assert train_mamba_baseline.main(argv + ["--compile"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gcc: not found" in err and "--no_compile" in err
    assert train_mamba_baseline.main(argv + ["--no_compile", "--resume", "auto"]) == 0


def test_conv_stem_runs_and_a_checkpoint_keeps_its_stem(tmp_path, cifar10_dir, capsys):
    """--stem conv trains with its stem's weights; a checkpoint of one stem is refused by a run that asks for the
    other (one line, exit 2) and resumed as it was made when --stem is left at auto (with the checkpoint's patch
    size, also when it is not the conv stem's default); a checkpoint from before --stem existed resumes as the
    patch stem."""
    def args(name, *extra):
        argv = tiny_args(tmp_path / name, cifar10_dir, *PLAIN, "--epochs", "2", "--warmup_epochs", "0",
                         "--save_freq", "1", "--train_subset", "8", "--test_subset", "8", *extra)
        i = argv.index("--patch_size")
        return argv[:i] + argv[i + 2:]  # the stem sets the tokens

    assert train_mamba_baseline.main(args("conv", "--stem", "conv")) == 0
    conv = Run(tmp_path / "conv", [])
    assert "257 tokens (conv stem, stride 2)" in conv.log()
    ck = conv.ckpt()
    assert ck["config"]["stem"] == "conv" and "patch_embed.proj.3.weight" in ck["model"]

    capsys.readouterr()
    assert train_mamba_baseline.main(args("patch", "--stem", "patch", "--resume", str(conv.ckpt_path("epoch1")))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "stem 'conv' (this run: 'patch')" in err

    assert train_mamba_baseline.main(args("patch1", "--stem", "patch", "--epochs", "1")) == 0
    patch_ckpt = Run(tmp_path / "patch1", []).ckpt_path("epoch1")
    assert train_mamba_baseline.main(args("auto", "--resume", str(patch_ckpt))) == 0
    auto = Run(tmp_path / "auto", [])
    assert auto.ckpt()["config"]["stem"] == "patch" and auto.ckpt()["position"]["epoch"] == 2
    assert "65 tokens (patch 4)" in auto.log()

    assert train_mamba_baseline.main(args("old", "--stem", "patch", "--epochs", "1")) == 0  # made old:
    old = Run(tmp_path / "old", []).ckpt_path("epoch1")
    ck = torch.load(old, map_location="cpu", weights_only=True)
    del ck["config"]["stem"]
    ck["config"]["epochs"] = 2
    torch.save(ck, old)
    assert train_mamba_baseline.main(args("resumed", "--resume", str(old))) == 0
    assert Run(tmp_path / "resumed", []).ckpt()["position"]["epoch"] == 2


def test_conv_stem_strides_resume_as_made(tmp_path, cifar10_dir, capsys):
    """--stem conv --patch_size 4: 64 tokens + the class token, logged and saved; resuming it with --patch_size 2 is
    refused in one line naming the patch size; with --patch_size left out (whose default for the conv stem is now 2)
    the run goes on at stride 4, as a run made before that default does."""
    def args(epochs, patch, *extra):
        argv = tiny_args(tmp_path / "c4", cifar10_dir, *PLAIN, "--epochs", epochs, "--warmup_epochs", "0",
                         "--train_subset", "8", "--test_subset", "8", "--stem", "conv", *extra)
        i = argv.index("--patch_size")
        return argv[:i] + (["--patch_size", patch] if patch else []) + argv[i + 2:]

    assert train_mamba_baseline.main(args("1", "4")) == 0
    run = Run(tmp_path / "c4", [])
    assert "65 tokens (conv stem, stride 4)" in run.log()
    ck = run.ckpt()
    assert (ck["config"]["stem"], ck["config"]["patch_size"]) == ("conv", 4)
    assert ck["model"]["pos_embed"].shape[1] == 65

    capsys.readouterr()
    assert train_mamba_baseline.main(args("2", "2", "--resume", "auto")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "patch_size 4 (this run: 2)" in err
    assert train_mamba_baseline.main(args("2", None, "--resume", "auto")) == 0
    assert run.ckpt()["position"]["epoch"] == 2 and run.ckpt()["config"]["patch_size"] == 4
    assert "65 tokens (conv stem, stride 4)" in run.log()


def test_a_first_evaluation_at_zero_percent_still_writes_best(tmp_path, cifar10_dir, monkeypatch):
    """A run whose every evaluation scores 0.00% (a diverged or tiny run) still ends with a _best.pth: the first
    evaluation is the best so far, whatever it scores (issue 23)."""
    from training import engine
    monkeypatch.setattr(engine.Run, "evaluate", lambda self, model=None, data=None: (2.3, 0.0, 0.0))
    r = run(tmp_path, cifar10_dir, *PLAIN, "--epochs", "2", "--warmup_epochs", "0", "--train_subset", "8",
            "--test_subset", "8")
    best = r.ckpt("best")["position"]
    assert (best["best_acc"], best["best_epoch"], best["epoch"]) == (0.0, 1, 1)
    assert "best top-1 0.00% at epoch 1" in r.log()

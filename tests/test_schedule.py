"""training/optim.lr_at (linear warmup, then cosine) and the learning rate the engine really steps with."""
import json
import math
import signal

import pytest
from torch.optim.optimizer import register_optimizer_step_pre_hook

import train_mamba_baseline
from conftest import tiny_args
from training.optim import lr_at

KW = dict(base_lr=1e-3, total_steps=100, warmup_steps=10, warmup_lr=1e-6, min_lr=1e-5)


def test_warmup_is_linear_from_warmup_lr_to_base():
    assert lr_at(0, **KW) == pytest.approx(1e-6)
    values = [lr_at(s, **KW) for s in range(11)]
    steps = [b - a for a, b in zip(values, values[1:])]
    assert steps == pytest.approx([(1e-3 - 1e-6) / 10] * 10)
    assert lr_at(5, **KW) == pytest.approx((1e-6 + 1e-3) / 2)


def test_peak_at_the_end_of_warmup():
    assert lr_at(10, **KW) == pytest.approx(1e-3)
    assert max(lr_at(s, **KW) for s in range(101)) == pytest.approx(1e-3)
    assert lr_at(9, **KW) < lr_at(10, **KW) > lr_at(11, **KW)


def test_cosine_down_to_min_lr():
    assert lr_at(100, **KW) == pytest.approx(1e-5)
    assert lr_at(55, **KW) == pytest.approx((1e-3 + 1e-5) / 2)           # half-way through the cosine
    s = 10 + 90 // 3
    expected = 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * (s - 10) / 90))
    assert lr_at(s, **KW) == pytest.approx(expected)
    assert lr_at(150, **KW) == pytest.approx(1e-5)                       # past the end: stays at min_lr


def test_monotone_decreasing_after_warmup():
    values = [lr_at(s, **KW) for s in range(10, 101)]
    assert all(b < a for a, b in zip(values, values[1:]))
    assert all(1e-5 <= v <= 1e-3 for v in values)


def test_no_warmup():
    kw = {**KW, "warmup_steps": 0}
    assert lr_at(0, **kw) == pytest.approx(1e-3)
    assert lr_at(50, **kw) == pytest.approx((1e-3 + 1e-5) / 2)
    assert lr_at(100, **kw) == pytest.approx(1e-5)
    values = [lr_at(s, **kw) for s in range(101)]
    assert all(b < a for a, b in zip(values, values[1:]))


def test_other_endpoints():
    kw = dict(base_lr=0.5, total_steps=20, warmup_steps=4, warmup_lr=0.0, min_lr=0.0)
    assert lr_at(0, **kw) == 0.0
    assert lr_at(2, **kw) == pytest.approx(0.25)
    assert lr_at(4, **kw) == pytest.approx(0.5)
    assert lr_at(20, **kw) == pytest.approx(0.0, abs=1e-12)


@pytest.fixture
def keep_signal_handlers():
    """The engine installs SIGINT/SIGTERM handlers for its run; give pytest its own back afterwards."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def test_engine_steps_with_lr_at_of_the_global_step(tmp_path, cifar10_dir, keep_signal_handlers):
    """40 images, batch 8: 5 steps per epoch, 3 epochs, 1.5 warmup epochs (8 steps, rounded)."""
    seen = []

    def record(optimizer, args, kwargs):
        seen.append([g["lr"] for g in optimizer.param_groups])

    handle = register_optimizer_step_pre_hook(record)
    try:
        rc = train_mamba_baseline.main(tiny_args(
            tmp_path, cifar10_dir, "--epochs", "3", "--warmup_epochs", "1.5", "--lr", "0.01", "--warmup_lr",
            "0.001", "--min_lr", "0.0001", "--no_use_randaugment", "--no_use_mixup", "--no_use_cutmix"))
    finally:
        handle.remove()
    assert rc == 0
    sched = dict(base_lr=0.01, total_steps=15, warmup_steps=8, warmup_lr=0.001, min_lr=0.0001)
    assert len(seen) == 15
    for step, lrs in enumerate(seen):
        assert len(set(lrs)) == 1, "every parameter group gets the same lr"
        assert lrs[0] == pytest.approx(lr_at(step, **sched), rel=1e-12), step
    records = [json.loads(line) for line in open(tmp_path / "logs" / "mamba_tiny_cifar10_baseline_test.jsonl")]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    for r in records:  # the record's lr is the lr of the epoch's last step
        assert r["lr"] == pytest.approx(lr_at(5 * r["epoch"] - 1, **sched), rel=1e-12)
    log = open(tmp_path / "logs" / "mamba_tiny_cifar10_baseline_test.log").read()
    assert "5 steps/epoch" in log and "8 warmup steps" in log

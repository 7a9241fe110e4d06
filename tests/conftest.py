"""Shared test helpers: generated CIFAR files in the standard layout, tiny run configurations."""
import os
import sys

import pytest

# Tiny models on a small CPU: one thread per process is much faster than several fighting over two cores
# (subprocesses the tests start inherit it too).
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))
from fake_cifar import make_cifar  # noqa: E402  (shared with tools/chaos_test.py)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors run far faster on one intra-op thread, above all on a busy 2-core machine (a test that
    changes the thread count gets it back)."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# A model small enough for CPU tests: width 16, 2 layers, patch 8 (16 patches + cls token).
TINY = ["--arch", "mamba_tiny", "--embed_dim", "16", "--depth", "2", "--patch_size", "8", "--device", "cpu",
        "--batch_size", "8", "--eval_batch_size", "16", "--no_progress"]


@pytest.fixture
def cifar10_dir(tmp_path):
    return make_cifar(str(tmp_path / "data"), "cifar10", n_train=40, n_test=16)


@pytest.fixture
def cifar100_dir(tmp_path):
    return make_cifar(str(tmp_path / "data100"), "cifar100", n_train=40, n_test=16)


def tiny_args(tmp_path, data_dir, *extra):
    return TINY + ["--data_dir", data_dir, "--save_dir", str(tmp_path / "ckpt"), "--log_dir",
                   str(tmp_path / "logs"), "--run_id", "test", *extra]


def after_setup(monkeypatch, fn):
    """Run fn(run) right after engine.Run.setup (the model, EMA, optimizer and train step exist)."""
    from training import engine
    real_setup = engine.Run.setup

    def setup(self):
        real_setup(self)
        fn(self)

    monkeypatch.setattr(engine.Run, "setup", setup)

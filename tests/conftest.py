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


def run_checks(checks, out_path):
    """In the interpreted child process of a Triton kernel test file: run each (name, check) and write {name: None, or
    the failure's traceback} as JSON, for that file's tests in the parent to report one by one."""
    import json
    import traceback
    results = {}
    for name, check in checks:
        try:
            check()
            results[name] = None
        except Exception:
            results[name] = traceback.format_exc()
    with open(out_path, "w") as f:
        json.dump(results, f)


def run_interpreted(test_file, tmp_path_factory, timeout):
    """Runs test_file as a script (its __main__ calls run_checks) in a child process with TRITON_INTERPRET=1 set
    before anything is imported: Triton reads it when a kernel is decorated, so setting it here would be too late if
    another test module had imported the kernels, and it would leak into later tests and subprocesses. -> the child's
    results. Skipped where a GPU exists (the gpu tests run the same cases compiled) or Triton is missing."""
    import json
    import subprocess
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the gpu tests run these cases compiled")
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp(os.path.splitext(os.path.basename(test_file))[0]) / "results.json"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get(
        "PYTHONPATH")])))
    proc = subprocess.run([sys.executable, os.path.abspath(test_file), str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0 and out.exists(), f"interpreter run failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(out.read_text())

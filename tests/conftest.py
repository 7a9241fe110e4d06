"""Shared test helpers: generated CIFAR files in the standard layout, tiny run configurations."""
import os
import pickle
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)



def make_cifar(data_dir, dataset="cifar10", n_train=64, n_test=32, seed=0):
    """Writes random images in the pickled layout the CIFAR authors distribute; the label is encoded in the
    image's mean colour so that a model can learn something. -> data_dir."""
    rng = np.random.default_rng(seed)
    num_classes = 10 if dataset == "cifar10" else 100

    def batch(n):
        labels = rng.integers(0, num_classes, n)
        data = rng.integers(0, 256, (n, 3, 32, 32)).astype(np.uint8)
        data[:, 0] = (data[:, 0] // 2 + (labels * 127 // (num_classes - 1))[:, None, None]).astype(np.uint8)
        return data.reshape(n, -1), labels

    if dataset == "cifar10":
        folder = os.path.join(data_dir, "cifar-10-batches-py")
        files = {f"data_batch_{i}": n_train // 5 for i in range(1, 6)} | {"test_batch": n_test}
        label_key = b"labels"
    else:
        folder = os.path.join(data_dir, "cifar-100-python")
        files = {"train": n_train, "test": n_test}
        label_key = b"fine_labels"
    os.makedirs(folder, exist_ok=True)
    for name, n in files.items():
        data, labels = batch(n)
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({b"data": data, label_key: labels.tolist(), b"batch_label": name.encode()}, f)
    return data_dir


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

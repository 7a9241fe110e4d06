"""Tiny generated CIFAR-10/100 files in the layout the CIFAR authors distribute (for tests and tools/chaos_test.py).

    from fake_cifar import make_cifar          # with tools/ on sys.path
    make_cifar("/tmp/data", "cifar10", n_train=80, n_test=16)
"""
import os
import pickle

import numpy as np


def make_cifar(data_dir, dataset="cifar10", n_train=64, n_test=32, seed=0):
    """Writes random images in the pickled layout the CIFAR authors distribute; the label is encoded in the
    image's mean colour so that a model can learn something. -> data_dir.

    CIFAR-10 splits the training images over data_batch_1..5 (n_train // 5 each)."""
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


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data_dir")
    p.add_argument("--dataset", default="cifar10", choices=("cifar10", "cifar100"))
    p.add_argument("--n_train", type=int, default=64)
    p.add_argument("--n_test", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(make_cifar(a.data_dir, a.dataset, a.n_train, a.n_test, a.seed))

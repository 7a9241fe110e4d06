"""CIFAR-10/100 from the standard python pickles, held as uint8 tensors on the training device.

Layout read (the one the CIFAR authors distribute):
    <data_dir>/cifar-10-batches-py/data_batch_1..5, test_batch       (b"data", b"labels")
    <data_dir>/cifar-100-python/train, test                          (b"data", b"fine_labels")
The pickles are read directly (no md5 check) with an unpickler that only builds numpy arrays and plain
containers, so a hostile file cannot run code.
"""
import hashlib
import io
import os
import pickle
import socket

import numpy as np
import torch

MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
LAYOUT = {
    "cifar10": dict(folder="cifar-10-batches-py", label_key="labels", num_classes=10,
                    train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"], meta="batches.meta",
                    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    "cifar100": dict(folder="cifar-100-python", label_key="fine_labels", num_classes=100,
                     train=["train"], test=["test"], meta="meta",
                     url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
}


class DataError(Exception):
    """Missing or malformed data files: reported as one line, exit code 2."""


class _ArrayUnpickler(pickle.Unpickler):
    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_pickle(path, label_key, num_classes):
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
        batch = {(k.decode() if isinstance(k, bytes) else k): v for k, v in batch.items()}
        data = np.asarray(batch["data"], dtype=np.uint8)
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except Exception as e:  # truncated, not a pickle, wrong keys: all the same to the user
        raise DataError(f"{path} is not a readable CIFAR batch ({type(e).__name__}: {e}); "
                        "replace it with the original file") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise DataError(f"{path} has data of shape {data.shape} and {len(labels)} labels; expected (N, 3072) "
                        "and N labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path} has labels outside 0..{num_classes - 1}")
    return data.reshape(-1, 3, 32, 32), labels


def _download(dataset, data_dir):
    """torchvision's downloader (it checks the archive's md5); a 30 s socket timeout keeps offline runs short."""
    import torchvision
    cls = torchvision.datasets.CIFAR10 if dataset == "cifar10" else torchvision.datasets.CIFAR100
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)
    try:
        cls(root=data_dir, train=True, download=True)
    finally:
        socket.setdefaulttimeout(old)


def _missing(dataset, data_dir):
    lay = LAYOUT[dataset]
    return [f for f in lay["train"] + lay["test"] if not os.path.isfile(os.path.join(data_dir, lay["folder"], f))]


def load_cifar(dataset, data_dir, download=True):
    """-> dict(train=(x, y), test=(x, y)) with x uint8 (N, 3, 32, 32) and y int64 (N,), on the CPU."""
    lay = LAYOUT[dataset]
    missing, where = _missing(dataset, data_dir), f"{data_dir}/{lay['folder']}/"
    # the label names (batches.meta, meta) are not read, but they too show that a copy was begun here
    begun = len(missing) < len(lay["train"] + lay["test"]) or os.path.isfile(os.path.join(where, lay["meta"]))
    if missing and begun:
        # a partial copy (an interrupted extraction, a lost file): downloading over it would hide what happened
        raise DataError(f"the {dataset} copy under {where} is incomplete: missing {', '.join(missing)}; nothing "
                        f"was downloaded over it: restore those files, or remove the folder to have the run download "
                        f"{lay['url']} again")
    if missing and download:
        try:
            _download(dataset, data_dir)
        except Exception as e:
            reason = f"{type(e).__name__}: {e}".splitlines()[0][:200]
            raise DataError(f"{dataset} not found under {where} and the download failed "
                            f"({reason}); download {lay['url']} and extract it into {data_dir}/") from None
    missing = _missing(dataset, data_dir)
    if missing:
        raise DataError(f"{dataset} files missing under {data_dir}/{lay['folder']}/: {', '.join(missing)}; "
                        f"download {lay['url']} and extract it into {data_dir}/")
    out = {}
    for split in ("train", "test"):
        parts = [_read_pickle(os.path.join(data_dir, lay["folder"], f), lay["label_key"], lay["num_classes"])
                 for f in lay[split]]
        out[split] = (torch.from_numpy(np.concatenate([p[0] for p in parts])),
                      torch.from_numpy(np.concatenate([p[1] for p in parts])))
    return out


def validation_split(labels, val_size, num_classes, split_seed):
    """labels (N,) -> (train indices, validation indices), each sorted: val_size / num_classes images of every
    class held out, chosen by split_seed alone (a generator of its own: the same on every rank, whatever --seed).
    Raises ValueError when the split would leave nothing, or no image of some class, to train on."""
    n, per_class = len(labels), val_size // num_classes
    if val_size >= n:
        raise ValueError(f"--val_size {val_size} leaves nothing to train on: the training set has {n} images")
    counts = torch.bincount(labels, minlength=num_classes)
    short = (counts <= per_class).nonzero().flatten().tolist()
    if short:
        raise ValueError(f"--val_size {val_size} holds out {per_class} image(s) of each class, but class {short[0]} "
                         f"has {counts[short[0]]} in the training set: none would be left to train on")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    held = torch.cat([order[labels[order] == c][:per_class] for c in range(num_classes)]).sort().values
    keep = torch.ones(n, dtype=torch.bool)
    keep[held] = False
    return keep.nonzero().flatten(), held


def split_hash(indices):
    """A short name for a set of held-out indices: a checkpoint's split is recognised by it."""
    return hashlib.sha256(indices.to(torch.int64).numpy().tobytes()).hexdigest()[:12]


def epoch_permutation(num_examples, seed, epoch):
    """The order of one epoch: a pure function of (seed, epoch), so a resumed run sees the same batches."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_examples, generator=g)


class DeviceData:
    """One split held on the device as uint8; yields index batches of a shard of each epoch.

    Under DDP each rank takes every world_size-th example of the epoch's permutation, after trimming the
    permutation to whole global batches, so all ranks run the same number of steps.
    """

    def __init__(self, images, labels, device):
        self.images = images.to(device)
        self.labels = labels.to(device)

    def __len__(self):
        return len(self.labels)

    def steps_per_epoch(self, batch_size, world_size=1):
        return len(self) // (batch_size * world_size)

    def train_batches(self, batch_size, seed, epoch, start_step=0, rank=0, world_size=1):
        """Yields (images uint8 (B, 3, 32, 32), labels (B,)) for steps start_step.. of the epoch (drop last)."""
        steps = self.steps_per_epoch(batch_size, world_size)
        perm = epoch_permutation(len(self), seed, epoch)[: steps * batch_size * world_size]
        perm = perm[rank::world_size].to(self.labels.device)
        for s in range(start_step, steps):
            idx = perm[s * batch_size:(s + 1) * batch_size]
            yield self.images[idx], self.labels[idx]

    def eval_batches(self, batch_size, rank=0, world_size=1):
        """Every example once, in order; each rank takes a contiguous slice."""
        n = len(self)
        lo, hi = n * rank // world_size, n * (rank + 1) // world_size
        for i in range(lo, hi, batch_size):
            j = min(i + batch_size, hi)
            yield self.images[i:j], self.labels[i:j]

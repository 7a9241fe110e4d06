"""Checkpoints: plain data written atomically, read with ``weights_only=True``, checked before use.

A checkpoint holds the model, the EMA of its weights (``model_ema``, None without --model_ema), the optimizer,
the position in the run (epoch, step within it, global step), best accuracy, the per-epoch history, RNG states,
the resolved configuration and the validation split (``split``: val_size, split_seed and a hash of the held-out
indices; None without --val_size). It never holds code.
"""
import errno
import fcntl
import os
import random

import numpy as np
import torch

FORMAT = "vim-cifar-checkpoint/1"
# Settings that change what the weights mean: a checkpoint made with others cannot continue this run.
MODEL_KEYS = ("arch", "dataset", "num_classes", "embed_dim", "depth", "patch_size", "input_size", "stem")
SAVED_DEFAULTS = {"stem": "patch"}  # what a checkpoint from before a MODEL_KEYS entry existed was made with


class CheckpointError(Exception):
    """A checkpoint that cannot be used, or cannot be written: reported as one line, exit code 2."""


def checkpoint_paths(save_dir, arch, dataset):
    stem = os.path.join(save_dir, f"{arch}_{dataset}")
    return {"last": f"{stem}_last.pth", "best": f"{stem}_best.pth", "epoch": stem + "_epoch{}.pth"}


def save_checkpoint(state, path):
    """Write to a temporary file, flush it to disk, then rename over ``path``: a reader (or a crash) sees
    the old file or the new one, never half of one. On failure (disk full...) the old file is untouched."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    except OSError as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        why = "the disk is full" if e.errno == errno.ENOSPC else e.strerror or str(e)
        raise CheckpointError(f"could not write {path}: {why}; the previous checkpoint is unchanged") from None


def load_checkpoint(path):
    """-> the checkpoint dict (tensors on the CPU). Raises CheckpointError for anything unusable."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is corrupt, truncated or not a checkpoint of this project ({first})") \
            from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint of this project (no '{FORMAT}' format tag)")
    broken = [k for k in ("model", "optimizer", "position", "rng", "config") if not isinstance(ckpt.get(k), dict)]
    if ckpt.get("model_ema") is not None and not isinstance(ckpt["model_ema"], dict):  # None: made without EMA
        broken.append("model_ema")
    if broken:
        raise CheckpointError(f"{path} is a damaged checkpoint (missing or malformed: {', '.join(broken)})")
    return ckpt


def check_compatible(ckpt, cfg, path):
    """Refuse a checkpoint whose model or data set differs from this run's, naming every difference."""
    saved = ckpt["config"]
    diffs = [f"{k} {saved.get(k, SAVED_DEFAULTS.get(k))!r} (this run: {getattr(cfg, k)!r})"
             for k in MODEL_KEYS if saved.get(k, SAVED_DEFAULTS.get(k)) != getattr(cfg, k)]
    if diffs:
        raise CheckpointError(f"{path} was made for a different run: " + "; ".join(diffs))


def _describe_split(split):
    if not split:
        return "none (--val_size 0)"
    return f"--val_size {split['val_size']} --split_seed {split['split_seed']} (held out: {split['held_out']})"


def check_split(ckpt, split, path):
    """Refuse to resume a run on another validation split: its best epoch was chosen on the one it was made with,
    and held-out images would have been trained on."""
    saved = ckpt.get("split")  # absent: a checkpoint from before --val_size, made without a split
    if saved != split:
        raise CheckpointError(f"{path} was made with validation split {_describe_split(saved)}, this run asks for "
                              f"{_describe_split(split)}; resume with the checkpoint's --val_size, --split_seed and "
                              "training set")


def rng_state():
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
    }


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


class RunLock:
    """An exclusive lock on save_dir for the life of the process; the OS drops it if the process dies."""

    def __init__(self, save_dir):
        self.path = os.path.join(save_dir, ".lock")
        self.file = None

    def __enter__(self):
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise CheckpointError(f"another run ({holder}) is writing {os.path.dirname(self.path)}; "
                                  "use another --save_dir or stop that run") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()}")
        self.file.flush()
        # A run killed in the middle of save_checkpoint leaves its half-written "<name>.pth.tmp<pid>" behind;
        # we hold the lock, so no live writer owns one: remove them (each is as large as a checkpoint).
        save_dir = os.path.dirname(self.path)
        for name in os.listdir(save_dir):
            if ".pth.tmp" in name:
                try:
                    os.remove(os.path.join(save_dir, name))
                except OSError:
                    pass
        return self

    def __exit__(self, *exc):
        self.file.close()

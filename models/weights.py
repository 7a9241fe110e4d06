"""A trained model from a file: the trainer's checkpoints and the weights-only files exported from them.

    from models import load_model
    model = load_model("checkpoint/mamba_baseline/cifar10/mamba_small_cifar10_best.pth")   # or an exported file
    model = load_model(path, ema=True)   # the EMA weights of a --model_ema run

Nothing here imports the training code. Two kinds of file are read, both with ``torch.load(weights_only=True)``:

* a training checkpoint (``"format": "vim-cifar-checkpoint/1"``, training/checkpoint.py): the weights under
  ``"model"`` (and ``"model_ema"``, None without --model_ema), the run's configuration under ``"config"`` and
  the input normalisation under ``"normalisation"`` (``{"mean", "std"}``; absent in older checkpoints);
* an exported file (``"format": "vim-cifar-weights/1"``, ``evaluate.py CKPT --export OUT``):
  ``{"format", "model": fp32 state dict, "config": {...}, "epoch", "weights": "model" | "ema"}``, where
  ``config`` holds every ``VimConfig`` field (the tokenizer: ``stem``, ``patch_size``, ``img_size``) and
  ``arch``, ``dataset`` and the input normalisation ``mean`` / ``std``. The state dict uses the official Vim
  parameter names (models/pretrained.py), so the trainer's ``--pretrained`` takes the file too.
"""
import dataclasses
import os
import zipfile

import torch

from models.vim import VARIANTS, VimConfig, VisionMamba

CHECKPOINT_FORMAT = "vim-cifar-checkpoint/1"  # training/checkpoint.py's FORMAT (not imported: no training code)
EXPORT_FORMAT = "vim-cifar-weights/1"
DATASET_CLASSES = {"cifar10": 10, "cifar100": 100}


class WeightsError(Exception):
    """A file that holds no usable model: one line that names the problem."""


def _read(path):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"no checkpoint at {path}")
    try:
        # memory-mapped: the optimizer state of a training checkpoint is never read into memory
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise WeightsError(f"{path} is corrupt, truncated or not a checkpoint of this project ({first})") from None
    fmt = obj.get("format") if isinstance(obj, dict) else None
    if fmt not in (CHECKPOINT_FORMAT, EXPORT_FORMAT):
        raise WeightsError(f"{path} is not a checkpoint of this project (no '{CHECKPOINT_FORMAT}' or "
                           f"'{EXPORT_FORMAT}' format tag)")
    if not isinstance(obj.get("model"), dict) or not isinstance(obj.get("config"), dict):
        raise WeightsError(f"{path} is a damaged checkpoint (missing or malformed: model or config)")
    return obj


def _model_config(train_config, state_dict):
    """A training run's configuration -> its VimConfig. d_state, d_conv, expand and in_chans are not options of the
    trainer (a --pretrained run takes the official file's): they are read from the tensor shapes."""
    c = train_config
    if c.get("arch") not in VARIANTS:
        raise WeightsError(f"unknown architecture {c.get('arch')!r} in the checkpoint's config")
    variant = VARIANTS[c["arch"]]
    embed_dim = c.get("embed_dim") or variant["embed_dim"]
    try:
        a_log, conv, in_proj = (state_dict[f"layers.0.mixer.{k}"] for k in ("A_log", "conv1d.weight", "in_proj.weight"))
        tokenizer = state_dict.get("patch_embed.proj.weight", state_dict.get("patch_embed.proj.0.weight"))
        shape = dict(d_state=a_log.shape[1], d_conv=conv.shape[-1], expand=in_proj.shape[0] // (2 * embed_dim),
                     in_chans=tokenizer.shape[1])
    except (KeyError, AttributeError, IndexError):
        raise WeightsError("the checkpoint's weights are not a VisionMamba's (no layers.0.mixer or patch_embed)") \
            from None
    return VimConfig(img_size=c["input_size"], patch_size=c["patch_size"], num_classes=c["num_classes"],
                     embed_dim=embed_dim, depth=c.get("depth") or variant["depth"], drop_path=c.get("drop_path", 0.0),
                     stem=c.get("stem", "patch"), **shape)


def read_weights(path, ema=False):
    """-> (state_dict, info) of a training checkpoint or an exported file; ``ema``: the EMA weights.

    info: dict(vim=VimConfig, arch, dataset, num_classes, mean, std (None when the file does not record them),
    epoch (epochs trained), weights ("model" or "ema"), kind ("checkpoint" or "export"), config (the training
    run's configuration, or the exported one), history (a checkpoint's per-epoch records, else None),
    step_in_epoch (steps into the next epoch of a checkpoint saved mid-epoch, else 0)).
    Raises WeightsError."""
    path = os.fspath(path)
    obj = _read(path)
    config = obj["config"]
    if obj["format"] == EXPORT_FORMAT:
        if ema:
            raise WeightsError(f"{path} is an exported file: it holds one set of weights ({obj.get('weights')}), "
                               "leave out --ema")
        fields = {f.name for f in dataclasses.fields(VimConfig)}
        try:
            vim = VimConfig(**{k: v for k, v in config.items() if k in fields})
        except TypeError as e:
            raise WeightsError(f"{path} holds a malformed config ({e})") from None
        sd, epoch, weights, kind = obj["model"], obj.get("epoch"), obj.get("weights", "model"), "export"
        history, steps = None, 0
    else:
        if ema and obj.get("model_ema") is None:
            raise WeightsError(f"{path} holds no EMA weights (the run was trained without --model_ema)")
        sd = obj["model_ema"] if ema else obj["model"]
        position = obj.get("position") or {}
        epoch, weights, kind = position.get("epoch"), "ema" if ema else "model", "checkpoint"
        history, steps = position.get("history"), position.get("step_in_epoch", 0)
        try:
            vim = _model_config(config, sd)
        except KeyError as e:
            raise WeightsError(f"{path} has a config without {e}") from None
    dataset = config.get("dataset")
    # an exported file's config names its normalisation; a checkpoint has it beside (older ones: not at all)
    norm = config if kind == "export" else obj.get("normalisation") or {}
    if DATASET_CLASSES.get(dataset) != vim.num_classes:
        raise WeightsError(f"{path} is for data set {dataset!r} but has {vim.num_classes} classes")
    info = dict(vim=vim, arch=config.get("arch"), dataset=dataset, num_classes=vim.num_classes,
                mean=norm.get("mean"), std=norm.get("std"), epoch=epoch, weights=weights, kind=kind, config=config,
                history=history, step_in_epoch=steps)
    return sd, info


def build_from(state_dict, vim, path="the checkpoint"):
    """-> VisionMamba(vim) holding state_dict, in eval mode on the CPU. Raises WeightsError when they do not fit."""
    try:
        model = VisionMamba(vim)
        model.load_state_dict(state_dict)
    except (RuntimeError, ValueError) as e:
        why = " ".join(str(e).split())[:300]
        raise WeightsError(f"{path} holds weights that do not fit its own configuration ({why})") from None
    return model.eval()


def load_model(path, ema=False):
    """The VisionMamba stored at ``path`` (a training checkpoint or an exported file), with its weights (the EMA's
    with ``ema``) and configuration (``model.cfg``), in eval mode on the CPU. Its data set and input normalisation
    are in ``read_weights(path)[1]``. Raises WeightsError."""
    sd, info = read_weights(path, ema)
    return build_from(sd, info["vim"], os.fspath(path))


def export_weights(path, out, ema=False, normalisation=None):
    """Write the weights-only file of the checkpoint at ``path`` to ``out``: fp32 state dict + configuration, no
    optimizer, RNG or history. ``normalisation(info) -> (mean, std)`` gives the input normalisation of a checkpoint
    that does not record it (from before the trainer did). -> the number of bytes written. Raises WeightsError."""
    sd, info = read_weights(path, ema)
    build_from(sd, info["vim"], os.fspath(path))  # refuse to export weights that do not rebuild
    mean, std = info["mean"], info["std"]
    if (mean is None or std is None) and normalisation is not None:
        mean, std = normalisation(info)
    if mean is None or std is None:
        raise WeightsError(f"{path} records no input normalisation (mean, std) to export")
    config = dict(dataclasses.asdict(info["vim"]), arch=info["arch"], dataset=info["dataset"],
                  mean=[float(m) for m in mean], std=[float(s) for s in std])
    state = {"format": EXPORT_FORMAT, "model": {k: v.detach().float().contiguous().clone() for k, v in sd.items()},
             "config": config, "epoch": info["epoch"], "weights": info["weights"]}
    tmp = f"{out}.tmp{os.getpid()}"
    try:
        torch.save(state, tmp)
        os.replace(tmp, out)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise WeightsError(f"could not write {out}: {e.strerror or e}") from None
    return os.path.getsize(out)

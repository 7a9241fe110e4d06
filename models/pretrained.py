"""Fine-tuning from ImageNet-pretrained Vim checkpoints (hustvl/Vim's releases).

The releases (``vim_t_midclstok_76p1acc.pth``, ``vim_s_midclstok_80p5acc.pth``, ``vim_b_midclstok_81p9acc.pth``:
widths 192 / 384 / 768, depth 24, patch 16 at 224x224, so 196 patch tokens + 1 class token in the middle)
are what hustvl/Vim's ``main.py`` saves: a dict whose ``"model"`` entry is the state dict, next to
``"optimizer"``, ``"lr_scheduler"``, ``"epoch"``, ``"model_ema"``, ``"scaler"`` and ``"args"`` (an
``argparse.Namespace``). Our ``VisionMamba`` uses the same parameter names, so the state dict maps 1:1:

    patch_embed.proj.{weight,bias}   cls_token (1, 1, D)   pos_embed (1, M + 1, D)   norm_f.weight
    layers.{i}.norm.weight           (mamba-ssm's RMSNorm: a weight, no bias)
    layers.{i}.mixer.{in_proj.weight, conv1d.{weight,bias}, x_proj.weight, dt_proj.{weight,bias}, A_log, D,
                      conv1d_b.{weight,bias}, x_proj_b.weight, dt_proj_b.{weight,bias}, A_b_log, D_b,
                      out_proj.weight}
    head.{weight,bias}               (ImageNet's 1000 classes: dropped here, as no CIFAR model has 1000)

The official mixer and blocks register no buffers, so nothing else is expected in the state dict. Keys that
official variants we cannot run would add (``layers.{i}.mixer.gamma`` for layer scale, ``rope.*`` for RoPE,
``cls_token_head``/``cls_token_tail`` for two class tokens) are reported as unexpected, never skipped.

What is tolerated, precisely:
  * the containers ``{"model": sd, ...}``, ``{"state_dict": sd, ...}`` or a bare state dict; with
    ``"model"`` present it wins (``"model_ema"`` is never used); other top-level entries are ignored;
  * a ``module.`` (DDP) or ``_orig_mod.`` (torch.compile) prefix, removed when every key carries it;
  * floating-point tensors of any precision (copied into the model's dtype);
  * ``head.*`` of any shape (kept when its shape is the model's, else dropped: the model keeps its own freshly
    initialised head);
  * a different position grid (``pos_embed`` is resized, see ``interpolate_pos_embed``).
Anything else (another width / depth / d_state / expand / d_conv / patch size / channel count, a missing
or unexpected key, a shape that differs, a non-float or non-finite tensor) raises ``PretrainedError``.

This project's own exported files (``evaluate.py CKPT --export OUT``, models/weights.py) are taken too: the same
names under ``"model"``, and their ``"config"`` names the tokenizer (``stem``: Vim's patch embedding, or the conv
stem ``patch_embed.proj.{0,3}.weight``, whose stride no shape tells) and the input normalisation. A head whose
shape is the model's (the same class count) is kept; any other head is dropped.

Files are read with ``torch.load(weights_only=True)``: only tensors, plain containers and, because the
official trainer stores its arguments as one, ``argparse.Namespace`` are built. Any other pickled global
(a class, or a function such as ``os.system`` in a booby-trapped file) is refused before it is called,
and the error names it.
"""
import argparse
import math
import os
import re
import zipfile

import torch
import torch.nn.functional as F

from models.weights import EXPORT_FORMAT

# The only non-torch global we let torch.load build: hustvl/Vim's main.py saves ``"args": args``.
SAFE_GLOBALS = (argparse.Namespace,)
CONTAINER_KEYS = ("model", "state_dict")  # checked in this order; the first one present is the state dict
STRIPPED_PREFIXES = ("module.", "_orig_mod.")
# Standard square input sizes of the releases, used to recognise the stride-8 ("+", "_ft_") checkpoints.
_RELEASE_SIZES = (224, 384)
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.")
_CONFIG_FIELDS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "d_state", "d_conv", "expand", "stem")


class PretrainedError(Exception):
    """A pretrained checkpoint that cannot be used for this model: one line that names the problem."""


# ---------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------

def _first_line(e):
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _torch_load(path, mmap):
    with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def _refused_globals(path, error):
    """The pickled globals a weights-only load refused: from a static scan of a zip checkpoint, else from
    the error message (legacy, non-zip files). Never unpickles anything."""
    names = []
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        pass
    if not names:
        names = re.findall(r"GLOBAL ([\w.]+)", str(error))
    return sorted(set(names))


def _few(names, n=5):
    names = list(names)
    shown = ", ".join(names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def read_vim_checkpoint(path, mmap=True):
    return read_pretrained(path, mmap)[0]


def read_pretrained(path, mmap=True):
    """-> (the state dict (a plain dict of CPU tensors, key order kept) of the checkpoint at ``path``, the
    ``"config"`` of this project's exported file or None for any other file).

    Accepts ``{"model": sd, ...}``, ``{"state_dict": sd, ...}`` or a bare state dict and strips a leading
    ``module.`` / ``_orig_mod.`` shared by every key. With ``mmap`` (the default) a zip checkpoint is
    memory-mapped, so the entries that are ignored (optimizer, EMA copy) are never read into memory; the
    mapping is private, writes to the tensors never reach the file. Raises PretrainedError.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise PretrainedError(f"no pretrained checkpoint at {path}")
    use_mmap = bool(mmap) and zipfile.is_zipfile(path)
    try:
        try:
            obj = _torch_load(path, use_mmap)
        except Exception:
            if not use_mmap:
                raise
            obj = _torch_load(path, False)  # e.g. a file system that cannot mmap
    except Exception as e:
        refused = _refused_globals(path, e)
        if refused:
            raise PretrainedError(
                f"{path} holds pickled objects other than tensors and plain containers ({_few(refused)}); "
                "they are neither built nor run (weights-only loading). If you trust the file, save its "
                "weights alone: python -c \"import torch; c = torch.load('IN', weights_only=False); "
                "torch.save(c['model'], 'OUT')\"") from None
        raise PretrainedError(f"{path} ({os.path.getsize(path)} bytes) is not a readable PyTorch checkpoint "
                              f"(corrupt, truncated or another format): {_first_line(e)}") from None
    export = obj.get("config") if isinstance(obj, dict) and obj.get("format") == EXPORT_FORMAT else None
    return _state_dict_of(obj, path), export


def _state_dict_of(obj, path):
    if not isinstance(obj, dict):
        raise PretrainedError(f"{path} holds a {type(obj).__name__}, not a state dict or a dict with a "
                              "'model' entry")
    where = ""
    for key in CONTAINER_KEYS:
        if key in obj:
            obj, where = obj[key], f"['{key}']"
            break
    if not isinstance(obj, dict) or not obj:
        what = "an empty dict" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise PretrainedError(f"{path}{where} is {what}, not a state dict")
    bad = [f"{k!r} ({type(v).__name__})" for k, v in obj.items()
           if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise PretrainedError(f"{path}{where} is not a state dict: {len(bad)} of its {len(obj)} entries are not "
                              f"named tensors: {_few(bad)} (expected {{'model': state_dict, ...}}, "
                              "{'state_dict': state_dict} or a bare state dict)")
    sd = dict(obj)
    stripped = True
    while stripped:
        stripped = False
        for prefix in STRIPPED_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                stripped = True
    return sd


# ---------------------------------------------------------------------------------------------------------
# What the checkpoint is
# ---------------------------------------------------------------------------------------------------------

def _shape(t):
    return tuple(t.shape)


def infer_vim_config(state_dict, conv_stride=None):
    """-> dict(embed_dim, depth, patch_size, in_chans, img_size, d_state, expand, d_conv, num_classes, grid, stem)
    read from tensor shapes alone. ``grid`` is the side of the square patch grid of ``pos_embed`` and
    ``img_size = grid * patch_size`` (our PatchEmbed's stride is its patch size); ``num_classes`` is None
    without a head. A conv stem's stride (its ``patch_size``) is not in any shape: ``conv_stride`` gives it.
    Raises PretrainedError naming the keys that are missing or malformed."""
    sd = state_dict
    conv_stem = "patch_embed.proj.weight" not in sd and "patch_embed.proj.3.weight" in sd
    tokenizer = ("patch_embed.proj.0.weight", "patch_embed.proj.3.weight") if conv_stem else \
        ("patch_embed.proj.weight",)
    required = (*tokenizer, "pos_embed", "cls_token", "layers.0.mixer.in_proj.weight",
                "layers.0.mixer.A_log", "layers.0.mixer.conv1d.weight")
    missing = [k for k in required if k not in sd]
    if missing:
        raise PretrainedError(f"not a Vim state dict: no {_few(missing)} (it has {len(sd)} tensors, e.g. "
                              f"{_few(list(sd), 3)})")
    if conv_stem:
        if conv_stride is None:
            raise PretrainedError("the weights have a conv stem (patch_embed.proj.0/3) but the file does not say "
                                  "its stride (only this project's exported files, with their config, have one)")
        embed_dim, in_chans = sd["patch_embed.proj.3.weight"].shape[0], sd["patch_embed.proj.0.weight"].shape[1]
        patch = conv_stride
    else:
        w = sd["patch_embed.proj.weight"]
        if w.ndim != 4 or w.shape[2] != w.shape[3]:
            raise PretrainedError(f"patch_embed.proj.weight has shape {_shape(w)}; expected (D, C, p, p)")
        embed_dim, in_chans, patch = w.shape[0], w.shape[1], w.shape[2]
    pe = sd["pos_embed"]
    if pe.ndim != 3 or pe.shape[0] != 1 or pe.shape[2] != embed_dim or pe.shape[1] < 2:
        raise PretrainedError(f"pos_embed has shape {_shape(pe)}; expected (1, num_patches + 1, {embed_dim})")
    num_patches = pe.shape[1] - 1
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise PretrainedError(f"pos_embed has shape {_shape(pe)}: {num_patches} patch tokens + 1 class token "
                              "is not a square grid")
    layers = sorted({int(m.group(1)) for k in sd if (m := _LAYER_KEY.match(k))})
    depth = layers[-1] + 1
    gaps = sorted(set(range(depth)) - set(layers))
    if gaps:
        raise PretrainedError(f"the checkpoint has layers up to layers.{depth - 1} but no tensors for "
                              f"{_few(f'layers.{i}' for i in gaps)}")
    in_proj, a_log, conv = (sd[f"layers.0.mixer.{k}"] for k in ("in_proj.weight", "A_log", "conv1d.weight"))
    if in_proj.ndim != 2 or in_proj.shape[1] != embed_dim or in_proj.shape[0] % 2 or a_log.ndim != 2 \
            or conv.ndim != 3:
        raise PretrainedError(f"layers.0.mixer has in_proj.weight {_shape(in_proj)}, A_log {_shape(a_log)}, "
                              f"conv1d.weight {_shape(conv)}; expected (2*E*{embed_dim}, {embed_dim}), "
                              "(E*D, d_state), (E*D, 1, d_conv)")
    d_inner = in_proj.shape[0] // 2
    expand = d_inner // embed_dim if d_inner % embed_dim == 0 else d_inner / embed_dim
    head = sd.get("head.weight")
    return dict(embed_dim=embed_dim, depth=depth, patch_size=patch, in_chans=in_chans, img_size=grid * patch,
                d_state=a_log.shape[1], expand=expand, d_conv=conv.shape[-1],
                num_classes=None if head is None else head.shape[0], grid=grid, stem="conv" if conv_stem else "patch")


def _stride_half_note(ck):
    """The '+' releases (vim_*_midclstok_ft_*.pth) embed 16x16 patches at stride 8: 27x27 tokens at 224. Our
    PatchEmbed strides by the patch size, so such a grid reads as a 432x432 model: say so instead."""
    grid, p = ck["grid"], ck["patch_size"]
    if grid * p in _RELEASE_SIZES or p % 2:
        return None
    size = (grid - 1) * (p // 2) + p
    if size not in _RELEASE_SIZES:
        return None
    return (f"its {grid}x{grid} position grid matches patch {p} at stride {p // 2} on {size}x{size} images "
            f"(a finer-granularity '+' / '_ft_' release); this VisionMamba strides by the patch size, so the "
            f"weights are used at stride {p} and the grid is resized: prefer the non-'ft' release")


def _read_and_infer(path):
    sd, export = read_pretrained(path)
    stride = export.get("patch_size") if export and export.get("stem") == "conv" else None
    try:
        return sd, infer_vim_config(sd, stride), export
    except PretrainedError as e:
        raise PretrainedError(f"{path}: {e}") from None


def pretrained_normalisation(path):
    """-> (mean, std) recorded in this project's exported file at ``path``, or None (an official checkpoint:
    the caller uses ImageNet's)."""
    export = read_pretrained(path)[1]
    if not export or export.get("mean") is None or export.get("std") is None:
        return None
    return tuple(export["mean"]), tuple(export["std"])


def pretrained_model_config(path, input_size=None):
    """-> the VimConfig fields the model must be built with to take the checkpoint at ``path``:
    dict(img_size, patch_size, in_chans, embed_dim, depth, d_state, d_conv, expand, stem), with
    ``img_size = input_size`` when given (it must be a multiple of the checkpoint's patch size), else the
    checkpoint's own. Usage: ``build_model(arch, num_classes, drop_path=..., **pretrained_model_config(p))``
    (the fields override the arch's width and depth). Raises PretrainedError."""
    ck = _read_and_infer(path)[1]
    p = ck["patch_size"]
    note = _stride_half_note(ck)
    if input_size is None:
        if note:
            raise PretrainedError(f"{path}: {note}; pass an input size (e.g. 224) to use it anyway")
        img_size = ck["img_size"]
    else:
        if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size <= 0 \
                or input_size % p:
            raise PretrainedError(f"input size {input_size!r} is not a positive multiple of the checkpoint's "
                                  f"patch size {p} (e.g. {p * 8}, {p * 14}, {p * 16})")
        img_size = input_size
    out = {k: ck[k] for k in _CONFIG_FIELDS}
    out["img_size"] = img_size
    return out


def matching_variant(config, variants=None):
    """The name in models.vim.VARIANTS with the config's width and depth, or None (for logs and checks)."""
    if variants is None:
        from models.vim import VARIANTS as variants
    for name, v in variants.items():
        if v["embed_dim"] == config["embed_dim"] and v["depth"] == config["depth"]:
            return name
    return None


# ---------------------------------------------------------------------------------------------------------
# Position embedding
# ---------------------------------------------------------------------------------------------------------

def _pair(g):
    if isinstance(g, int):
        return g, g
    h, w = g
    return int(h), int(w)


def interpolate_pos_embed(pos_embed, old_grid, new_grid, cls_index_old=None, cls_index_new=None,
                          antialias=None):
    """Resize Vim's position embedding to another patch grid, keeping the middle class token.

    pos_embed: (1, gh*gw + 1, D) with the class token's row at ``cls_index_old`` (default: the middle,
    num_patches // 2, where VisionMamba inserts it). The class token is taken out first, the remaining
    patch tokens (in raster order) are reshaped to (1, D, gh, gw), resized with bicubic interpolation
    (align_corners=False, in float32), flattened, and the class token is put back at ``cls_index_new``
    (default: the new middle, new num_patches // 2). -> (1, new_gh*new_gw + 1, D), detached, in the input's
    dtype. Grids are ints (square) or (h, w).

    ``antialias`` (default None: on exactly when a side shrinks) low-pass filters a downsized grid, so each
    new position averages the old ones it covers instead of point-sampling them (timm's choice for position
    embeddings; DeiT/Vim's own fine-tuning code does not antialias). Note that PyTorch's antialiased bicubic
    uses the a = -0.5 kernel, the plain one a = -0.75.

    The same grid and class token index give the input back bit for bit (a copy).
    """
    gh0, gw0 = _pair(old_grid)
    gh1, gw1 = _pair(new_grid)
    n0, n1 = gh0 * gw0, gh1 * gw1
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1 or pos_embed.shape[1] != n0 + 1:
        raise ValueError(f"pos_embed of shape {tuple(pos_embed.shape)} does not fit a {gh0}x{gw0} grid plus a "
                         f"class token: expected (1, {n0 + 1}, D)")
    ci0 = n0 // 2 if cls_index_old is None else int(cls_index_old)
    ci1 = n1 // 2 if cls_index_new is None else int(cls_index_new)
    if not (0 <= ci0 <= n0 and 0 <= ci1 <= n1):
        raise ValueError(f"class token index {ci0} / {ci1} outside 0..{n0} / 0..{n1}")
    with torch.no_grad():
        pos_embed = pos_embed.detach()
        if (gh0, gw0) == (gh1, gw1) and ci0 == ci1:
            return pos_embed.clone()
        dim = pos_embed.shape[2]
        cls = pos_embed[:, ci0:ci0 + 1]
        patches = torch.cat([pos_embed[:, :ci0], pos_embed[:, ci0 + 1:]], dim=1)   # (1, n0, D), raster order
        if (gh0, gw0) != (gh1, gw1):
            shrink = gh1 < gh0 or gw1 < gw0
            grid = patches.reshape(1, gh0, gw0, dim).permute(0, 3, 1, 2).float()  # (1, D, gh, gw)
            grid = F.interpolate(grid, size=(gh1, gw1), mode="bicubic", align_corners=False,
                                 antialias=shrink if antialias is None else bool(antialias))
            patches = grid.permute(0, 2, 3, 1).reshape(1, n1, dim).to(pos_embed.dtype)
        return torch.cat([patches[:, :ci1], cls, patches[:, ci1:]], dim=1)


# ---------------------------------------------------------------------------------------------------------
# Loading into a model
# ---------------------------------------------------------------------------------------------------------

def _unwrap(model):
    """Look through DDP (``.module``) and torch.compile (``._orig_mod``) wrappers, in any nesting."""
    while True:
        inner = next((getattr(model, a) for a in ("module", "_orig_mod")
                      if isinstance(getattr(model, a, None), torch.nn.Module)), None)
        if inner is None:
            return model
        model = inner


def _architecture_differences(ck, cfg, sd, target):
    """-> lines naming every architecture setting where checkpoint and model differ, with the telling keys."""
    def shape(d, k):
        return _shape(d[k]) if k in d else "absent"

    pw = "patch_embed.proj.weight" if ck["stem"] == "patch" else "patch_embed.proj.3.weight"
    a, ip, cw = "layers.0.mixer.A_log", "layers.0.mixer.in_proj.weight", "layers.0.mixer.conv1d.weight"
    checks = [
        ("stem", ck["stem"], cfg.stem, pw),
        ("width (embed_dim)", ck["embed_dim"], cfg.embed_dim, pw),
        ("input channels", ck["in_chans"], cfg.in_chans, pw),
        ("patch size", ck["patch_size"], cfg.patch_size, pw),
        ("d_state", ck["d_state"], cfg.d_state, a),
        ("expand", ck["expand"], cfg.expand, ip),
        ("d_conv", ck["d_conv"], cfg.d_conv, cw),
    ]
    out = [f"{name}: checkpoint {c} ({key} {shape(sd, key)}), model {m} ({key} {shape(target, key)})"
           for name, c, m, key in checks if c != m]
    if ck["depth"] != cfg.depth:
        out.append(f"depth: checkpoint {ck['depth']} (layers.0 .. layers.{ck['depth'] - 1}), model {cfg.depth} "
                   f"(layers.0 .. layers.{cfg.depth - 1})")
    return out


def load_pretrained(model, path, log=print):
    """Copy the pretrained Vim at ``path`` into ``model`` (a VisionMamba built with the target config, e.g.
    from ``pretrained_model_config``; a DDP or torch.compile wrapper is looked through) for fine-tuning.

    The checkpoint's tokenizer (stem), width, depth, d_state, expand, d_conv, patch size and channels must equal
    the model's; ``pos_embed`` is resized when the grids differ; ``head.*`` is kept when its shapes are the model's
    (the same class count), else dropped and the model's own head is left as it is. Every other model tensor must
    come from the checkpoint with the same shape, and the checkpoint may hold nothing else. Raises PretrainedError
    (the model is untouched then); on success logs one or two lines through ``log`` (None: silent) and returns a
    summary dict:
    loaded (tensors), values, dropped ({key: shape}), pos_embed (None or {from, to, cls_index}),
    cast_from (sorted dtype names that were converted, or []), checkpoint (infer_vim_config's dict), notes.
    """
    net = _unwrap(model)
    cfg = getattr(net, "cfg", None)
    if cfg is None or not hasattr(net, "pos_embed"):
        raise TypeError(f"load_pretrained needs a models.vim.VisionMamba, got {type(model).__name__}")
    path = os.fspath(path)
    sd, ck, _ = _read_and_infer(path)
    target = net.state_dict()
    diffs = _architecture_differences(ck, cfg, sd, target)
    if diffs:
        raise PretrainedError(f"{path} does not fit this model: " + "; ".join(diffs)
                              + ". Build the model from pretrained_model_config(path)")

    incoming = dict(sd)
    heads = [k for k in incoming if k.startswith("head.")]
    keep_head = bool(heads) and all(k in target and incoming[k].shape == target[k].shape for k in heads)
    dropped = {} if keep_head else {k: _shape(incoming.pop(k)) for k in heads}
    notes = [n for n in [_stride_half_note(ck)] if n]
    old_grid, new_grid = ck["grid"], cfg.img_size // cfg.patch_size
    resized = None
    if old_grid != new_grid:  # the model's pos_embed is (1, new_grid**2 + 1, D): VisionMamba's grids are square
        incoming["pos_embed"] = interpolate_pos_embed(incoming["pos_embed"], old_grid, new_grid)
        resized = {"from": (old_grid, old_grid), "to": (new_grid, new_grid),
                   "cls_index": (old_grid * old_grid // 2, new_grid * new_grid // 2)}

    expected = [k for k in target if keep_head or not k.startswith("head.")]
    missing = [k for k in expected if k not in incoming]
    unexpected = [k for k in incoming if k not in target]
    wrong_shape = [f"{k} checkpoint {_shape(incoming[k])} vs model {_shape(target[k])}"
                   for k in expected if k in incoming and incoming[k].shape != target[k].shape]
    not_float = [f"{k} ({incoming[k].dtype})" for k in expected if k in incoming
                 and not incoming[k].is_floating_point()]
    problems = []
    if missing:
        problems.append(f"{len(missing)} model tensors missing from the checkpoint: {_few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} checkpoint tensors this model does not have: {_few(unexpected)}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} shapes differ: {_few(wrong_shape)}")
    if not_float:
        problems.append(f"{len(not_float)} tensors are not floating point: {_few(not_float)}")
    if not problems:
        not_finite = [k for k in expected if not torch.isfinite(incoming[k]).all()]
        if not_finite:
            problems.append(f"{len(not_finite)} tensors hold NaN or infinity: {_few(not_finite)}")
    if problems:
        raise PretrainedError(f"{path} cannot be loaded: " + "; ".join(problems))

    cast_from = sorted({str(incoming[k].dtype).replace("torch.", "") for k in expected
                        if incoming[k].dtype != target[k].dtype})
    result = net.load_state_dict(incoming, strict=False)
    assert not result.unexpected_keys and all(k.startswith("head.") for k in result.missing_keys), result

    values = sum(incoming[k].numel() for k in expected)
    info = dict(path=path, loaded=len(expected), values=values, dropped=dropped, pos_embed=resized,
                cast_from=cast_from, checkpoint=ck, notes=notes)
    if log is not None:
        variant = matching_variant(ck) or "custom"
        log(f"pretrained: loaded {len(expected)} tensors ({values / 1e6:.2f}M values) from {path} "
            f"[Vim {variant}: width {ck['embed_dim']}, depth {ck['depth']}, "
            f"{'conv stem, stride' if ck['stem'] == 'conv' else 'patch'} {ck['patch_size']}, "
            f"trained at {ck['img_size']}px]"
            + (f", cast from {'/'.join(cast_from)}" if cast_from else ""))
        pos = ("pos_embed kept ({0}x{0} grid)".format(new_grid) if resized is None else
               f"pos_embed resized {old_grid}x{old_grid} -> {new_grid}x{new_grid} (bicubic, class token kept and "
               f"moved {resized['cls_index'][0]} -> {resized['cls_index'][1]})")
        head = (f"the {cfg.num_classes}-class head kept (same class count)" if keep_head else
                (f"dropped {', '.join(f'{k} {s}' for k, s in dropped.items())}" if dropped else "no head in it")
                + f"; the {cfg.num_classes}-class head stays freshly initialised")
        log(f"pretrained: {pos}; {head}" + "".join(f"; note: {n}" for n in notes))
    return info

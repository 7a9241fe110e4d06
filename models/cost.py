"""What a VisionMamba costs: parameters by part, and multiply-accumulates (MACs) per image.

MACs are what papers on vision models call "FLOPs" (one multiply plus one add counts once). They are counted as

* matrix work, by ``torch.utils.flop_counter.FlopCounterMode`` on one image (it reports 2 FLOPs per MAC for
  matrix multiplies and convolutions; halved here): the tokenizer's convolutions, in_proj, x_proj, the dt
  projection, out_proj and the head;
* two parts no counter sees, by formula per block and scan direction, with E = expand x width channels, L tokens,
  N = d_state, K = d_conv:
  - the depthwise causal conv1d, which the model writes as K shifted multiply-adds: E L K;
  - the selective scan (a custom kernel on the GPU): 4 E L N + 2 E L, that is exp(dt A) and dt B u (one multiply
    per state each), the recurrence h = dA h + dBu (one MAC per state) and y = C h (one MAC per state), then D u
    and the z gate (one per channel) -- the convention of VMamba's ``flops_selective_scan_ref``.
Not counted: elementwise work (RMSNorm, SiLU, softplus, exp, the residual adds, averaging the two directions,
max-pooling in the conv stem, adding the position embedding).

While counting, the scan is replaced by a stand-in that records its shapes and returns zeros: the reference
scan's own einsum would otherwise reach the counter as a matrix multiply and be counted twice.
"""
from collections import Counter
from unittest import mock

import torch
from torch.utils.flop_counter import FlopCounterMode

import models.bimamba as bimamba

# parameter groups: (group, does the name belong to it); per-block groups are summed over the blocks
_MIXER_GROUPS = {"in_proj": ("in_proj",), "conv1d": ("conv1d", "conv1d_b"), "x_proj": ("x_proj", "x_proj_b"),
                 "dt_proj": ("dt_proj", "dt_proj_b"), "A/D": ("A_log", "A_b_log", "D", "D_b"),
                 "out_proj": ("out_proj",)}


def _group(name):
    if name.startswith("patch_embed."):
        return "tokenizer"
    if name in ("pos_embed", "cls_token"):
        return "pos_embed+cls_token"
    if name.startswith("layers."):
        part = name.split(".")[2:]           # layers.{i}.mixer.x_proj_b.weight -> [mixer, x_proj_b, weight]
        if part[0] == "norm":
            return "blocks.norm"
        for group, names in _MIXER_GROUPS.items():
            if part[0] == "mixer" and part[1] in names:
                return f"blocks.{group}"
    if name.startswith("norm_f."):
        return "final_norm"
    if name.startswith("head."):
        return "head"
    raise ValueError(f"parameter {name} belongs to no group")


GROUPS = ("tokenizer", "pos_embed+cls_token", *(f"blocks.{g}" for g in (*_MIXER_GROUPS, "norm")), "final_norm",
          "head")


def parameter_groups(model):
    """-> {"total": n, group: n, ...} in GROUPS' order; the groups add up to the total (every parameter is in
    exactly one)."""
    groups = Counter()
    for name, p in model.named_parameters():
        groups[_group(name)] += p.numel()
    return {"total": sum(p.numel() for p in model.parameters()), **{g: groups[g] for g in GROUPS}}


def scan_macs(d_inner, length, d_state):
    """MACs of one selective scan over one image (module docstring)."""
    return 4 * d_inner * length * d_state + 2 * d_inner * length


@torch.no_grad()
def macs_per_image(model):
    """-> {"total", "matrix" (the counter's), "conv1d", "scan"}: MACs for one image of the model's input size.
    One forward pass of a zero image through ``model`` (in eval mode; no kernel runs: the scan is the stand-in)."""
    cfg = model.cfg
    scans = []

    def stand_in(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, reverse=False,
                 out_scale=1.0, out_add=None):
        scans.append((u.shape[1], u.shape[2], A.shape[1]))     # (D_inner, L, N) per image
        return torch.zeros_like(u)

    x = torch.zeros(1, cfg.in_chans, cfg.img_size, cfg.img_size, device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    kernels = [(layer.mixer.scan_backend, layer.mixer.use_causal_conv1d) for layer in model.layers]
    model.set_kernels("ref")  # the PyTorch path: a custom op's own matrix products would be hidden from the counter
    try:
        with mock.patch.object(bimamba, "get_scan_fn", lambda backend: stand_in), \
                FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
        for layer, (scan, causal_conv1d) in zip(model.layers, kernels):
            layer.mixer.set_kernels(scan, causal_conv1d)
    matrix = counter.get_total_flops() // 2
    conv1d = sum(d * length * cfg.d_conv for d, length, _ in scans)
    scan = sum(scan_macs(d, length, n) for d, length, n in scans)
    return {"total": matrix + conv1d + scan, "matrix": matrix, "conv1d": conv1d, "scan": scan}

"""Batched, on-device training augmentation for uint8 CIFAR batches.

The whole data set lives on the training device as uint8 tensors of shape (N, 3, 32, 32), and every
training batch (B, C, H, W) is augmented there with batched tensor ops: no DataLoader and no Python
loop over images, because per-image CPU RandAugment cannot keep up with a GPU that trains on
>10,000 images/s. Everything here also runs on CPU and keeps the input's device.

Pipeline (``TrainAugment``): random_crop -> random_hflip -> rand_augment (optional) -> normalize.

RandAugment follows ``torchvision.transforms.v2.RandAugment`` (op set, magnitude table, signed
magnitudes, NEAREST interpolation, fill 0), except that every image draws its own ops and signs
(torchvision's transform draws one set of ops for the whole tensor it is given):

* colour ops are torchvision's tensor kernels (``torchvision.transforms.v2.functional``), which
  already work on a batch when their parameter is shared, except Sharpness and AutoContrast, which
  are re-implemented here with the same arithmetic because torchvision's versions synchronise the
  CUDA stream. An op with a per-image sign is run once with +m and once with -m and the two results
  are picked per image with ``torch.where``. Colour ops match torchvision bit for bit.
* geometric ops (ShearX/Y, TranslateX/Y, Rotate) are one per-image inverse affine matrix, computed
  in double precision with torchvision's conventions (centre, shear definition, rotation direction),
  turned into a sampling grid the way torchvision's tensor kernel does and sampled with one
  ``grid_sample(mode="nearest")`` for the whole batch.

Randomness comes from torch's global RNG on the input's device unless a ``torch.Generator`` (on that
device) is passed.
"""
import functools
import math

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

# Defaults for TrainAugment (CIFAR-10 per-channel statistics, as in training/data.py).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

# torchvision's RandAugment op set, in torchvision's order.
OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
       "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
GEOMETRIC_OPS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
COLOUR_OPS = ("Brightness", "Color", "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast",
              "Equalize")
# Ops whose magnitude gets a random sign (torchvision's ``signed`` flag).
SIGNED_OPS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
              "Contrast", "Sharpness")


def _check_uint8_batch(x):
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise ValueError(f"expected a uint8 batch (B, C, H, W), got {tuple(x.shape)} {x.dtype}")


# ----------------------------------------------------------------------------------------------
# Crop and flip
# ----------------------------------------------------------------------------------------------

def random_crop(x, padding=4, generator=None):
    """Per-image random crop of the zero-padded batch back to the input size.

    x: uint8 (B, C, H, W) -> uint8 (B, C, H, W). Image b is the window of the zero-padded image
    (B, C, H + 2p, W + 2p) starting at (row, col) = offset[b], each offset uniform in [0, 2p]^2, as
    torchvision's ``RandomCrop((H, W), padding=p)`` draws it per image.
    """
    _check_uint8_batch(x)
    if padding == 0:
        return x
    b, c, h, w = x.shape
    hp, wp = h + 2 * padding, w + 2 * padding
    padded = F.pad(x, (padding, padding, padding, padding))  # zeros, (B, C, hp, wp)
    top = torch.randint(0, 2 * padding + 1, (b,), device=x.device, generator=generator)
    left = torch.randint(0, 2 * padding + 1, (b,), device=x.device, generator=generator)
    rows = top[:, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = left[:, None] + torch.arange(w, device=x.device)  # (B, W)
    # One gather on the flattened padded image: linear index row * wp + col of every output pixel.
    index = (rows[:, :, None] * wp + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return padded.view(b, c, hp * wp).gather(2, index).view(b, c, h, w)


def random_hflip(x, p=0.5, generator=None):
    """Mirror each image left-right with probability p. x: (B, C, H, W) -> same shape and dtype."""
    flip = torch.rand(x.shape[0], device=x.device, generator=generator) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


# ----------------------------------------------------------------------------------------------
# RandAugment
# ----------------------------------------------------------------------------------------------

def op_magnitude(op_name, magnitude=9, num_magnitude_bins=31, height=32, width=32):
    """(value, signed) of a RandAugment op at bin ``magnitude``, as torchvision's table gives them.

    ``value`` is the unsigned magnitude that torchvision hands to the op (shear factor, pixels,
    degrees, enhance offset, posterize bits, solarize fraction); ``signed`` says whether RandAugment
    negates it with probability 1/2. Ops without a magnitude give 0.0. Values are taken from float32
    ``torch.linspace`` exactly as torchvision builds them, so they are the same floats.
    """
    n = num_magnitude_bins
    if not 0 <= magnitude < n:
        raise ValueError(f"magnitude {magnitude} outside [0, {n})")
    if op_name in ("Identity", "AutoContrast", "Equalize"):
        return 0.0, False
    if op_name in ("ShearX", "ShearY"):
        table = torch.linspace(0.0, 0.3, n)
    elif op_name == "TranslateX":
        table = torch.linspace(0.0, 150.0 / 331.0 * width, n)
    elif op_name == "TranslateY":
        table = torch.linspace(0.0, 150.0 / 331.0 * height, n)
    elif op_name == "Rotate":
        table = torch.linspace(0.0, 30.0, n)
    elif op_name in ("Brightness", "Color", "Contrast", "Sharpness"):
        table = torch.linspace(0.0, 0.9, n)
    elif op_name == "Posterize":
        table = (8 - (torch.arange(n) / ((n - 1) / 4))).round().int()  # 8 bits down to 4
    elif op_name == "Solarize":
        table = torch.linspace(1.0, 0.0, n)  # threshold as a fraction of 255
    else:
        raise ValueError(f"unknown RandAugment op {op_name!r}")
    return float(table[magnitude]), op_name in SIGNED_OPS


def _inverse_affine(center, angle, translate, shear):
    """Inverse affine map (output pixel -> input pixel) as 6 floats [a, b, c, d, e, f], in double.

    Same convention as torchvision: forward map = T(translate) * C(center) * L * C^-1 with linear
    part L = R(angle) * ShearY(shear[1]) * ShearX(shear[0]) (angles in degrees), coordinates
    measured from the image centre. det(L) = 1, so L^-1 is its adjugate. The terms are evaluated in
    the order torchvision 0.29 uses, so the float32-rounded matrices come out identical (the
    algebraically equal textbook order differs in the last bit now and then, which moves a few
    nearest-neighbour picks on odd image sizes).
    """
    rot, sx, sy = math.radians(angle), math.radians(shear[0]), math.radians(shear[1])
    cx, cy = center
    tx, ty = translate
    tan_sx = math.tan(sx)
    # Forward linear part L = [[p, q], [r, s]].
    p = math.cos(rot - sy) / math.cos(sy)
    q = -(p * tan_sx + math.sin(rot))
    r = math.sin(rot - sy) / math.cos(sy)
    s = math.cos(rot) - r * tan_sx
    a, b, d, e = s, -q, -r, p  # L^-1
    # Offset of C * L^-1 * C^-1 * T^-1: c - L^-1 (c + t).
    return [a, b, cx - a * (cx + tx) - b * (cy + ty),
            d, e, cy - d * (cx + tx) - e * (cy + ty)]


def _geometric_matrix(op_name, value, height, width):
    """Inverse affine matrix (6 floats) of one geometric op with signed magnitude ``value``.

    Parameters as torchvision's RandAugment passes them: shears about the top-left corner with
    shear angle atan(value); translations by int(value) pixels (truncated toward zero); rotations by
    ``value`` degrees counter-clockwise about the centre (torchvision's rotate negates the angle
    after taking it mod 360, so do we, to land on the same floats).
    """
    corner = [-0.5 * width, -0.5 * height]  # pixel (0, 0) in centre-based coordinates
    if op_name == "ShearX":
        return _inverse_affine(corner, 0.0, [0.0, 0.0], [math.degrees(math.atan(value)), 0.0])
    if op_name == "ShearY":
        return _inverse_affine(corner, 0.0, [0.0, 0.0], [0.0, math.degrees(math.atan(value))])
    if op_name == "TranslateX":
        return _inverse_affine([0.0, 0.0], 0.0, [float(int(value)), 0.0], [0.0, 0.0])
    if op_name == "TranslateY":
        return _inverse_affine([0.0, 0.0], 0.0, [0.0, float(int(value))], [0.0, 0.0])
    if op_name == "Rotate":
        return _inverse_affine([0.0, 0.0], -(value % 360.0), [0.0, 0.0], [0.0, 0.0])
    raise ValueError(f"{op_name!r} is not a geometric op")


@functools.lru_cache(maxsize=16)
def _pixel_grid(height, width, device):
    """Output pixel centres relative to the image centre, homogeneous: float32 (1, H*W, 3); and the
    half-size (2,) = (W/2, H/2). Cached per device so that no call copies from the host (a blocking
    host-to-device copy synchronises the CUDA stream)."""
    xs = torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, width, device=device)
    ys = torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, height, device=device)
    ones = torch.ones(height, width, device=device)
    base = torch.stack([xs.expand(height, width), ys[:, None].expand(height, width), ones], -1)
    half = torch.tensor([0.5 * width, 0.5 * height], device=device)
    return base.view(1, height * width, 3), half


def affine_nearest(x, theta):
    """Warp each image by its own inverse affine matrix, nearest neighbour, zeros outside.

    x: uint8 (B, C, H, W); theta: float32 (B, 2, 3), mapping output pixel centres to input pixel
    positions, both measured in pixels from the image centre. Returns uint8 (B, C, H, W).
    """
    b, c, h, w = x.shape
    base, half = _pixel_grid(h, w, x.device)
    # Dividing theta by the half-size maps the result to grid_sample's [-1, 1] (align_corners=False)
    # coordinates. Same order of float32 operations as torchvision's kernel, so the sampling
    # positions, and hence the nearest-neighbour picks, agree with it.
    scaled = theta.transpose(1, 2) / half  # (B, 3, 2)
    grid = torch.matmul(base, scaled).view(b, h, w, 2)
    out = F.grid_sample(x.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out.round_().to(torch.uint8)


@functools.lru_cache(maxsize=64)
def _op_thetas(op_name, value, height, width, device):
    """float32 (2, 2, 3): inverse affine matrices of a geometric op with +value ([0]) and -value ([1])."""
    mats = [_geometric_matrix(op_name, value, height, width),
            _geometric_matrix(op_name, -value, height, width)]
    return torch.tensor(mats, dtype=torch.float32).view(2, 2, 3).to(device)


@functools.lru_cache(maxsize=16)
def _sharpness_kernel(channels, device):
    """float32 (C, 1, 3, 3) depthwise smoothing kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13."""
    kernel = torch.full((channels, 1, 3, 3), 1.0 / 13.0, device=device)
    kernel[:, :, 1, 1] = 5.0 / 13.0
    return kernel


def adjust_sharpness(x, factor):
    """PIL-style sharpness for a uint8 batch (B, C, H, W), the same float32 arithmetic as
    torchvision's tensor kernel (blend with a rounded 3x3 smoothing of the interior; the one-pixel
    border is kept), but with a cached kernel: torchvision builds its kernel from a Python list on
    every call, a host-to-device copy that synchronises the CUDA stream."""
    b, c, h, w = x.shape
    if h <= 2 or w <= 2:
        return x
    out = x.float()
    smooth = F.conv2d(out, _sharpness_kernel(c, x.device), groups=c).round_()  # (B, C, H-2, W-2)
    interior = out[..., 1:-1, 1:-1]
    interior.add_(smooth.sub_(interior), alpha=1.0 - factor)  # interior + (1 - f) * (smooth - interior)
    return out.clamp_(0, 255).to(torch.uint8)


def autocontrast(x):
    """Per (image, channel) min-max stretch to [0, 255] of a uint8 batch (B, C, H, W), the same
    float32 arithmetic as torchvision's tensor kernel, whose masked assignments read a value back
    to the host (a CUDA sync); constant channels are left as they are."""
    f = x.float()
    lo = f.amin(dim=(-2, -1), keepdim=True)
    hi = f.amax(dim=(-2, -1), keepdim=True)
    flat = hi == lo
    inv_scale = torch.where(flat, 1.0, (hi - lo).mul_(1.0 / 255.0))
    lo = torch.where(flat, 0.0, lo)
    return f.sub_(lo).div_(inv_scale).clamp_(0, 255).to(torch.uint8)


def _colour_op(x, op_name, value):
    """A colour op with one (signed) magnitude for the whole batch (B, C, H, W), uint8 in and out.

    torchvision's own tensor kernels where they are already batched and sync-free; Sharpness and
    AutoContrast are re-implemented above with the same arithmetic (checked bit for bit in tests).
    """
    if op_name == "Brightness":
        return TF.adjust_brightness(x, brightness_factor=1.0 + value)
    if op_name == "Color":
        return TF.adjust_saturation(x, saturation_factor=1.0 + value)
    if op_name == "Contrast":
        return TF.adjust_contrast(x, contrast_factor=1.0 + value)  # blend with each image's mean grey
    if op_name == "Sharpness":
        return adjust_sharpness(x, 1.0 + value)
    if op_name == "Posterize":
        return TF.posterize(x, bits=int(value))
    if op_name == "Solarize":
        return TF.solarize(x, threshold=255.0 * value)
    if op_name == "AutoContrast":
        return autocontrast(x)
    if op_name == "Equalize":
        return TF.equalize(x)  # per (image, channel) histogram (scatter_add), cumsum LUT, gather
    raise ValueError(f"{op_name!r} is not a colour op")


def apply_op(x, op_name, magnitude, negate=None):
    """Apply one RandAugment op to every image of a batch, with a per-image sign.

    x: uint8 (B, C, H, W). magnitude: the op's value as torchvision's RandAugment passes it to the
    op (see ``op_magnitude``; may already be negative). negate: optional bool (B,) on x's device:
    images where it is True get ``-magnitude`` instead (ignored by ops without a magnitude).
    Returns uint8 (B, C, H, W), image b equal to torchvision's op on x[b] with its signed magnitude.
    """
    _check_uint8_batch(x)
    if op_name == "Identity":
        return x
    if negate is not None:
        negate = negate.to(device=x.device, dtype=torch.bool)
    if op_name in GEOMETRIC_OPS:
        thetas = _op_thetas(op_name, float(magnitude), x.shape[-2], x.shape[-1], x.device)
        if negate is None:
            return affine_nearest(x, thetas[0].expand(x.shape[0], 2, 3))
        return affine_nearest(x, thetas[negate.long()])
    out = _colour_op(x, op_name, magnitude)
    if negate is not None and op_name in SIGNED_OPS:
        # The sign only takes two values, so run the op with each and pick per image: exact, and
        # no per-image parameters needed inside the kernels.
        out = torch.where(negate[:, None, None, None], _colour_op(x, op_name, -magnitude), out)
    return out


@functools.lru_cache(maxsize=32)
def _rand_augment_tables(magnitude, num_magnitude_bins, height, width, device):
    """Per-op lookup tables for one RandAugment configuration, cached per device.

    Returns (values, thetas, is_geometric): values[k] is op k's unsigned magnitude (python float),
    thetas float32 (len(OPS), 2, 2, 3) the inverse affine matrix of op k with sign + ([k, 0]) and
    - ([k, 1]) (identity for non-geometric ops), is_geometric bool (len(OPS),).
    """
    values, mats = [], []
    identity = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    for name in OPS:
        value, _ = op_magnitude(name, magnitude, num_magnitude_bins, height, width)
        values.append(value)
        if name in GEOMETRIC_OPS:
            mats.append([_geometric_matrix(name, value, height, width),
                         _geometric_matrix(name, -value, height, width)])
        else:
            mats.append([identity, identity])
    thetas = torch.tensor(mats, dtype=torch.float32).view(len(OPS), 2, 2, 3).to(device)
    is_geometric = torch.tensor([n in GEOMETRIC_OPS for n in OPS], device=device)
    return values, thetas, is_geometric


def rand_augment(x, num_ops=2, magnitude=9, num_magnitude_bins=31, generator=None, subset=None):
    """Per-image RandAugment: every image draws its own ``num_ops`` ops and signs.

    x: uint8 (B, C, H, W) -> uint8 (B, C, H, W). For each slot, each image picks one of the 14 ops
    uniformly and, for signed ops, negates the magnitude with probability 1/2 (torchvision:
    ``rand <= 0.5``); the slot's ops all read the slot's input.

    Two equivalent ways to run a slot (same random draws, same result, see ``_slot_masked`` and
    ``_slot_subset``): ``subset=None`` picks the masked one on CUDA (no host sync, so kernel launches
    stay ahead of the GPU) and the subset one elsewhere (on CPU every op only touches the images that
    chose it, about 13x less work).
    """
    _check_uint8_batch(x)
    b, _, h, w = x.shape
    if num_ops == 0 or b == 0:
        return x
    if subset is None:
        subset = x.device.type != "cuda"
    tables = _rand_augment_tables(magnitude, num_magnitude_bins, h, w, x.device)
    for _ in range(num_ops):
        op = torch.randint(0, len(OPS), (b,), device=x.device, generator=generator)
        negate = torch.rand(b, device=x.device, generator=generator) <= 0.5
        x = (_slot_subset if subset else _slot_masked)(x, op, negate, tables)
    return x


def _slot_masked(x, op, negate, tables):
    """One RandAugment slot, every op over the whole batch, kept per image with torch.where.

    x: uint8 (B, C, H, W); op: long (B,) index into OPS; negate: bool (B,). About 13 batch-wide op
    evaluations (1 grid_sample + 8 colour ops, 4 of them twice for the two signs), no host sync.
    """
    values, thetas, is_geometric = tables
    # All geometric ops of the slot in one warp; non-geometric images get (unused) identity.
    out = torch.where(is_geometric[op][:, None, None, None],
                      affine_nearest(x, thetas[op, negate.long()]), x)
    for name in COLOUR_OPS:
        k = OPS.index(name)
        out = torch.where((op == k)[:, None, None, None], apply_op(x, name, values[k], negate), out)
    return out  # Identity images keep x


def _slot_subset(x, op, negate, tables):
    """One RandAugment slot, each op run only on the images that picked it (index, op, scatter).

    Same arguments and result as ``_slot_masked``; needs the op counts on the host (a sync on GPU).
    """
    values, thetas, is_geometric = tables
    out = x.clone()
    geo = is_geometric[op].nonzero().squeeze(1)
    if geo.numel():
        out[geo] = affine_nearest(x[geo], thetas[op[geo], negate[geo].long()])
    for name in COLOUR_OPS:
        k = OPS.index(name)
        idx = (op == k).nonzero().squeeze(1)
        if idx.numel():
            out[idx] = apply_op(x[idx], name, values[k], negate[idx])
    return out


# ----------------------------------------------------------------------------------------------
# Normalisation and the training pipeline
# ----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def _channel_stats(mean, std, device):
    """mean, std tuples -> float32 (1, C, 1, 1) tensors on device, cached (no per-batch host copy)."""
    as_t = lambda v: torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1).to(device)
    return as_t(mean), as_t(std)


def normalize(x_uint8, mean, std):
    """(x / 255 - mean) / std per channel. x_uint8: (B, C, H, W); mean, std: length-C sequences of
    numbers. Returns float32 (B, C, H, W) on x's device."""
    mean_t, std_t = _channel_stats(tuple(float(m) for m in mean), tuple(float(s) for s in std),
                                   x_uint8.device)
    return (x_uint8.float() / 255.0 - mean_t) / std_t


class TrainAugment:
    """Training-time augmentation of a uint8 batch on its own device.

    ``aug(x)``: x uint8 (B, C, H, W) -> float32 (B, C, H, W): random_crop(padding) -> random_hflip
    -> rand_augment(num_ops, magnitude) if use_randaugment -> normalize(mean, std).
    ``use_crop=False`` / ``use_flip=False`` drop the crop / the flip (e.g. for deterministic tests).
    """

    def __init__(self, use_randaugment, padding=4, num_ops=2, magnitude=9, mean=CIFAR10_MEAN,
                 std=CIFAR10_STD, num_magnitude_bins=31, use_crop=True, use_flip=True):
        self.use_randaugment = bool(use_randaugment)
        self.use_crop = bool(use_crop)
        self.use_flip = bool(use_flip)
        self.padding = padding
        self.num_ops = num_ops
        self.magnitude = magnitude
        self.num_magnitude_bins = num_magnitude_bins
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def __call__(self, x_uint8, generator=None):
        x = x_uint8
        if self.use_crop:
            x = random_crop(x, self.padding, generator=generator)
        if self.use_flip:
            x = random_hflip(x, generator=generator)
        if self.use_randaugment:
            x = rand_augment(x, self.num_ops, self.magnitude, self.num_magnitude_bins,
                             generator=generator)
        return normalize(x, self.mean, self.std)

    def __repr__(self):
        return (f"TrainAugment(use_randaugment={self.use_randaugment}, use_crop={self.use_crop}, "
                f"use_flip={self.use_flip}, padding={self.padding}, num_ops={self.num_ops}, "
                f"magnitude={self.magnitude}, mean={self.mean}, std={self.std})")

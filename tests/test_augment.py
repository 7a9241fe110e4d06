"""Tests for training/augment.py: batched on-device augmentation against torchvision's per-image ops.

Reference: ``tv_op`` below applies one RandAugment op to one image through the public
``torchvision.transforms.v2.functional`` API with exactly the arguments torchvision's RandAugment
uses (checked against torchvision's own private dispatcher when it is there).

Tolerance for geometric ops: at most GEOMETRIC_TOLERANCE of the pixels may differ. The inverse
affine matrices are computed in the same order of double operations as torchvision and the grid
with the same float32 operations, so on CPU every pixel matches (checked for all 31 bins on several
image sizes while writing this). What can still differ is the matmul that applies the matrices:
ours is one batched matmul, torchvision's one per image, and a different BLAS/GPU path may round a
grid coordinate differently in the last bit, which changes a nearest-neighbour pick only when the
coordinate sits on a half-pixel tie. Those are rare single pixels; 1e-3 (about one pixel per image)
allows for them without hiding a convention error (a wrong centre, shear sign or rotation direction
moves most pixels).
"""
import math

import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF

from training import augment as A

GEOMETRIC_TOLERANCE = 1e-3


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These tensors are tiny: intra-op threads only add pool overhead (badly so on a busy 2-core box).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tv_op(img, op_name, value):
    """torchvision's RandAugment op on one uint8 image (C, H, W) with signed magnitude ``value``."""
    nearest = T.InterpolationMode.NEAREST
    if op_name == "Identity":
        return img
    if op_name == "ShearX":
        return TF.affine(img, angle=0.0, translate=[0, 0], scale=1.0, interpolation=nearest,
                         shear=[math.degrees(math.atan(value)), 0.0], fill=None, center=[0, 0])
    if op_name == "ShearY":
        return TF.affine(img, angle=0.0, translate=[0, 0], scale=1.0, interpolation=nearest,
                         shear=[0.0, math.degrees(math.atan(value))], fill=None, center=[0, 0])
    if op_name == "TranslateX":
        return TF.affine(img, angle=0.0, translate=[int(value), 0], scale=1.0, interpolation=nearest,
                         shear=[0.0, 0.0], fill=None)
    if op_name == "TranslateY":
        return TF.affine(img, angle=0.0, translate=[0, int(value)], scale=1.0, interpolation=nearest,
                         shear=[0.0, 0.0], fill=None)
    if op_name == "Rotate":
        return TF.rotate(img, angle=value, interpolation=nearest, fill=None)
    if op_name == "Brightness":
        return TF.adjust_brightness(img, 1.0 + value)
    if op_name == "Color":
        return TF.adjust_saturation(img, 1.0 + value)
    if op_name == "Contrast":
        return TF.adjust_contrast(img, 1.0 + value)
    if op_name == "Sharpness":
        return TF.adjust_sharpness(img, 1.0 + value)
    if op_name == "Posterize":
        return TF.posterize(img, int(value))
    if op_name == "Solarize":
        return TF.solarize(img, 255.0 * value)
    if op_name == "AutoContrast":
        return TF.autocontrast(img)
    if op_name == "Equalize":
        return TF.equalize(img)
    raise ValueError(op_name)


def sample_images(b=24, h=32, w=32, seed=0):
    """Random images plus the edge cases of the histogram/min-max ops (constant, two-level, dark)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=g)
    x[0] = 77                                                   # constant: equalize/autocontrast no-op
    x[1] = torch.where(torch.rand(h, w, generator=g) < 0.5, 10, 200).to(torch.uint8)  # two levels
    x[2] = torch.randint(0, 40, (3, h, w), dtype=torch.uint8, generator=g)            # dark
    x[3, 0] = 255                                               # one saturated channel
    return x


def differing_fraction(a, b):
    return (a != b).any(dim=-3).float().mean().item()


def assert_op_matches(ours, ref, op_name):
    assert ours.dtype == torch.uint8 and ours.shape == ref.shape
    if op_name in A.GEOMETRIC_OPS:
        assert differing_fraction(ours, ref) <= GEOMETRIC_TOLERANCE
    else:
        assert torch.equal(ours, ref)


# ------------------------------------------------------------------------------------------------
# RandAugment ops against torchvision
# ------------------------------------------------------------------------------------------------

def test_magnitude_table_matches_torchvision():
    space = getattr(T.RandAugment, "_AUGMENTATION_SPACE", None)
    if space is None:
        pytest.skip("torchvision's RandAugment table is not exposed")
    assert tuple(space) == A.OPS
    for bins, mags, (h, w) in [(31, (0, 1, 9, 17, 30), (32, 32)), (11, (0, 4, 10), (24, 40))]:
        for name, (fn, signed) in space.items():
            table = fn(bins, h, w)
            for m in mags:
                value, our_signed = A.op_magnitude(name, m, bins, h, w)
                assert our_signed == signed, name
                assert value == (0.0 if table is None else float(table[m])), (name, m)


def test_reference_matches_torchvision_dispatcher():
    ra = T.RandAugment()
    if not hasattr(ra, "_apply_image_or_video_transform"):
        pytest.skip("torchvision's per-op dispatcher is not available")
    x = sample_images(b=4)
    for name in A.OPS:
        value, signed = A.op_magnitude(name, 9)
        for v in ((value, -value) if signed else (value,)):
            for img in x:
                want = ra._apply_image_or_video_transform(img, name, v, interpolation=ra.interpolation,
                                                          fill=ra._fill)
                assert torch.equal(tv_op(img, name, v), want), (name, v)


@pytest.mark.parametrize("op_name", A.OPS)
@pytest.mark.parametrize("magnitude", [1, 9, 30])
def test_apply_op_matches_torchvision(op_name, magnitude):
    x = sample_images()
    value, signed = A.op_magnitude(op_name, magnitude)
    # Fixed sign for the whole batch: +, then -, then a per-image mix.
    signs = [torch.zeros(len(x), dtype=torch.bool)]
    if signed:
        signs += [torch.ones(len(x), dtype=torch.bool), torch.arange(len(x)) % 3 == 0]
    for negate in signs:
        ours = A.apply_op(x, op_name, value, negate)
        ref = torch.stack([tv_op(img, op_name, -value if n else value) for img, n in zip(x, negate)])
        assert_op_matches(ours, ref, op_name)
    # The sign may also come with the magnitude itself.
    if signed:
        ours = A.apply_op(x, op_name, -value)
        assert_op_matches(ours, torch.stack([tv_op(img, op_name, -value) for img in x]), op_name)


@pytest.mark.parametrize("op_name", A.GEOMETRIC_OPS)
@pytest.mark.parametrize("size", [(24, 40), (31, 17)])
def test_geometric_ops_other_sizes(op_name, size):
    # Centre, shear corner and translate scale depend on H and W separately; odd sizes put the
    # centre on a pixel centre and make the half-size division inexact.
    h, w = size
    x = sample_images(b=8, h=h, w=w)
    for magnitude in (12, 20):
        value, _ = A.op_magnitude(op_name, magnitude, 31, h, w)
        for v in (value, -value):
            ref = torch.stack([tv_op(img, op_name, v) for img in x])
            assert_op_matches(A.apply_op(x, op_name, v), ref, op_name)


def test_geometric_ops_move_pixels():
    # Guard against a vacuous match: at magnitude 9 each geometric op changes the image.
    x = sample_images(b=8)[4:]
    for name in A.GEOMETRIC_OPS:
        value, _ = A.op_magnitude(name, 9)
        assert differing_fraction(A.apply_op(x, name, value), x) > 0.3, name


# ------------------------------------------------------------------------------------------------
# random_crop, random_hflip
# ------------------------------------------------------------------------------------------------

def coordinate_images(b, h=32, w=32, seed=0):
    """Images whose channels 0/1 hold row+1 / col+1 (never 0, so padding is recognisable)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, 256, (b, 3, h, w), dtype=torch.uint8, generator=g)
    x[:, 0] = (torch.arange(h) + 1).view(h, 1).to(torch.uint8)
    x[:, 1] = (torch.arange(w) + 1).view(1, w).to(torch.uint8)
    return x


def recovered_offsets(out, padding):
    """(top, left) of each crop, read off the centre pixel (always inside the original image)."""
    h, w = out.shape[-2:]
    centre = out[:, :, h // 2, w // 2].long()
    return centre[:, 0] - 1 + padding - h // 2, centre[:, 1] - 1 + padding - w // 2


def test_random_crop_is_window_of_padded_image():
    p = 4
    x = coordinate_images(256)
    torch.manual_seed(0)
    out = A.random_crop(x, padding=p)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    top, left = recovered_offsets(out, p)
    assert top.min() >= 0 and top.max() <= 2 * p and left.min() >= 0 and left.max() <= 2 * p
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    for i in range(len(x)):
        t, l = int(top[i]), int(left[i])
        assert torch.equal(out[i], padded[i, :, t:t + 32, l:l + 32])
    assert len(set(zip(top.tolist(), left.tolist()))) > 40  # offsets vary across the batch


def test_random_crop_covers_all_offsets():
    p = 4
    x = coordinate_images(4000)
    torch.manual_seed(1)
    top, left = recovered_offsets(A.random_crop(x, padding=p), p)
    counts = torch.bincount(top * (2 * p + 1) + left, minlength=(2 * p + 1) ** 2)
    assert len(counts) == 81 and counts.min() > 0
    # Roughly uniform: expected 4000/81 ~ 49 per offset.
    assert counts.max() < 100 and counts.min() > 15


def test_random_crop_generator_and_zero_padding():
    x = coordinate_images(16)
    a = A.random_crop(x, 4, generator=torch.Generator().manual_seed(5))
    b = A.random_crop(x, 4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert torch.equal(A.random_crop(x, 0), x)


def test_random_hflip():
    x = sample_images(b=2000)
    torch.manual_seed(0)
    out = A.random_hflip(x)
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all())
    # Image 0 is constant (same == mirrored); count flips on the others.
    frac = mirrored[1:].float().mean().item()
    assert 0.45 < frac < 0.55
    assert torch.equal(A.random_hflip(x, p=0.0), x)
    assert torch.equal(A.random_hflip(x, p=1.0), x.flip(-1))


# ------------------------------------------------------------------------------------------------
# rand_augment
# ------------------------------------------------------------------------------------------------

def test_rand_augment_shape_dtype_and_determinism():
    x = sample_images(b=64)
    torch.manual_seed(123)
    a = A.rand_augment(x)
    torch.manual_seed(123)
    b = A.rand_augment(x)
    assert a.dtype == torch.uint8 and a.shape == x.shape and a.device == x.device
    assert torch.equal(a, b)
    c = A.rand_augment(x, generator=torch.Generator().manual_seed(9))
    d = A.rand_augment(x, generator=torch.Generator().manual_seed(9))
    assert torch.equal(c, d)
    assert torch.equal(A.rand_augment(x, num_ops=0), x)


def test_rand_augment_per_sample_diversity():
    # One image repeated: with per-image ops nearly every copy comes out different.
    x = sample_images(b=8)[5:6].expand(64, -1, -1, -1).contiguous()
    torch.manual_seed(0)
    out = A.rand_augment(x, num_ops=2)
    distinct = {bytes(o.numpy().tobytes()) for o in out}
    assert len(distinct) >= 40


def test_rand_augment_masked_and_subset_paths_agree():
    x = sample_images(b=96)
    torch.manual_seed(7)
    masked = A.rand_augment(x, num_ops=3, subset=False)
    torch.manual_seed(7)
    subset = A.rand_augment(x, num_ops=3, subset=True)
    assert torch.equal(masked, subset)


def test_rand_augment_single_op_is_a_torchvision_op():
    # With one op per image, each output is torchvision's output for some (op, sign); every op shows up.
    x = sample_images(b=128)
    torch.manual_seed(3)
    out = A.rand_augment(x, num_ops=1)
    seen = set()
    for img, o in zip(x, out):
        match = None
        for name in A.OPS:
            value, signed = A.op_magnitude(name, 9)
            for v in ((value, -value) if signed else (value,)):
                ref = tv_op(img, name, v)
                if name in A.GEOMETRIC_OPS:
                    ok = differing_fraction(o[None], ref[None]) <= GEOMETRIC_TOLERANCE
                else:
                    ok = torch.equal(o, ref)
                if ok:
                    match = name
                    break
            if match:
                break
        assert match is not None
        seen.add(match)
    # Identity and a no-op AutoContrast/Equalize can coincide on the special images; the rest differ.
    assert len(seen) >= 12


def test_rand_augment_two_ops_compose():
    # White-box: replay the documented draws (per slot: op indices, then signs) and compose
    # torchvision's ops per image.
    x = sample_images(b=16)
    out = A.rand_augment(x, num_ops=2, generator=torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(11)
    draws = []
    for _ in range(2):
        op = torch.randint(0, len(A.OPS), (len(x),), generator=g)
        neg = torch.rand(len(x), generator=g) <= 0.5
        draws.append((op, neg))
    for i, img in enumerate(x):
        geometric = False
        for op, neg in draws:
            name = A.OPS[int(op[i])]
            value, signed = A.op_magnitude(name, 9)
            img = tv_op(img, name, -value if (signed and neg[i]) else value)
            geometric |= name in A.GEOMETRIC_OPS
        if geometric:
            assert differing_fraction(out[i][None], img[None]) <= GEOMETRIC_TOLERANCE
        else:
            assert torch.equal(out[i], img)


# ------------------------------------------------------------------------------------------------
# normalize, TrainAugment
# ------------------------------------------------------------------------------------------------

def test_normalize():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    mean, std = (0.5, 0.2, 0.0), (0.5, 0.1, 2.0)
    out = A.normalize(x, mean, std)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 4, 4)
    want = torch.tensor([(0.0 - 0.5) / 0.5, (0.2 - 0.2) / 0.1, (1.0 - 0.0) / 2.0])
    assert torch.allclose(out, want.view(1, 3, 1, 1).expand_as(out), atol=1e-6)


def test_train_augment_skips_randaugment_when_off(monkeypatch):
    calls = []
    real = A.rand_augment

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(A, "rand_augment", counting)
    x = sample_images(b=8)
    A.TrainAugment(use_randaugment=False)(x)
    assert calls == []
    out = A.TrainAugment(use_randaugment=True, num_ops=2, magnitude=9)(x)
    assert calls == [1]
    assert out.dtype == torch.float32 and out.shape == x.shape


def test_train_augment_normalises_constant_image():
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    x = torch.full((32, 3, 32, 32), 128, dtype=torch.uint8)
    want = ((128 / 255 - torch.tensor(mean)) / torch.tensor(std)).view(1, 3, 1, 1)
    torch.manual_seed(0)
    out = A.TrainAugment(False, padding=0, mean=mean, std=std)(x)
    assert out.dtype == torch.float32
    assert torch.allclose(out, want.expand_as(out), atol=1e-5)
    # With padding the centre (never padding) is the same; some border pixels are the padded zeros.
    out = A.TrainAugment(False, padding=4, mean=mean, std=std)(x)
    assert torch.allclose(out[:, :, 4:28, 4:28], want.expand(32, 3, 24, 24), atol=1e-5)
    zero = (-torch.tensor(mean) / torch.tensor(std)).view(1, 3, 1, 1)
    assert torch.isclose(out, zero, atol=1e-5).any()


def test_train_augment_crop_and_flip_switches():
    x = sample_images(b=16)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    out = A.TrainAugment(False, mean=mean, std=std, use_crop=False, use_flip=False)(x)
    assert torch.equal(out, A.normalize(x, mean, std))
    # Flip only: every image is the image or its mirror.
    out = A.TrainAugment(False, mean=mean, std=std, use_crop=False)(x)
    same = (out == A.normalize(x, mean, std)).flatten(1).all(1)
    mirrored = (out == A.normalize(x.flip(-1), mean, std)).flatten(1).all(1)
    assert bool((same | mirrored).all())


def test_train_augment_deterministic_under_seed():
    x = sample_images(b=32)
    aug = A.TrainAugment(True)
    torch.manual_seed(42)
    a = aug(x)
    torch.manual_seed(42)
    b = aug(x)
    assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_device_and_cpu_ops():
    x = sample_images(b=64).cuda()
    assert A.random_crop(x).device == x.device
    assert A.random_hflip(x).device == x.device
    assert A.TrainAugment(True)(x).device == x.device
    for name in A.OPS:
        value, _ = A.op_magnitude(name, 9)
        negate = torch.arange(len(x), device=x.device) % 2 == 0
        gpu = A.apply_op(x, name, value, negate).cpu()
        cpu = A.apply_op(x.cpu(), name, value, negate.cpu())
        assert_op_matches(gpu, cpu, name)
    torch.manual_seed(0)
    masked = A.rand_augment(x)  # masked path on CUDA
    torch.manual_seed(0)
    subset = A.rand_augment(x, subset=True)
    assert torch.equal(masked, subset)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_train_augment_does_not_sync():
    # The masked RandAugment path must not wait for the GPU (no .item(), nonzero or blocking
    # host-to-device copy); the first call fills the per-device caches, which may copy once.
    x = sample_images(b=64).cuda()
    aug = A.TrainAugment(True)
    aug(x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        aug(x)
    finally:
        torch.cuda.set_sync_debug_mode(0)

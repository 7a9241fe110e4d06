"""Fine-tuning from ImageNet-pretrained Vim checkpoints: models/pretrained.py.

Checkpoints are built here in hustvl/Vim's layout from our own VisionMamba (whose parameter names are
checked against the official layout below), with small depths so that everything runs on a CPU in seconds.
"""
import argparse
import os
import pickle

import pytest
import torch
import torch.nn.functional as F

from models.pretrained import (PretrainedError, infer_vim_config, interpolate_pos_embed, load_pretrained,
                               matching_variant, pretrained_model_config, read_vim_checkpoint)
from models.vim import VimConfig, VisionMamba, vim_config


def make_model(embed_dim=32, depth=2, img_size=224, patch_size=16, num_classes=1000, d_state=16, seed=0):
    """A VisionMamba whose every tensor holds distinct random values (so a misplaced copy shows)."""
    torch.manual_seed(seed)
    model = VisionMamba(VimConfig(img_size=img_size, patch_size=patch_size, num_classes=num_classes,
                                  embed_dim=embed_dim, depth=depth, d_state=d_state, drop_path=0.0))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def official_checkpoint(model, extras=True):
    """What hustvl/Vim's main.py saves: the weights under "model", plus the training state beside them."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt = {"model": sd}
    if extras:
        ckpt.update(
            optimizer={"state": {0: {"step": torch.tensor(10.0), "exp_avg": torch.zeros(3)}},
                       "param_groups": [{"lr": 1e-5, "betas": (0.9, 0.999), "weight_decay": 0.05,
                                         "params": [0]}]},
            lr_scheduler={"t_initial": 300, "warmup_t": 5, "base_values": [5e-4], "noise_range_t": None},
            epoch=299,
            model_ema={k: v + 1.0 for k, v in sd.items()},
            scaler="none",
            args=argparse.Namespace(model="vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_"
                                          "with_midclstok_div2", lr=5e-4, input_size=224, drop_path=0.1,
                                    opt_betas=None, cutmix_minmax=None, data_set="IMNET"),
        )
    return ckpt


def save(obj, tmp_path, name="vim.pth"):
    path = tmp_path / name
    torch.save(obj, path)
    return str(path)


class Log(list):
    def __call__(self, line):
        self.append(line)


# ------------------------------------------------------------------------------------------------------
# The layout
# ------------------------------------------------------------------------------------------------------

def test_our_names_and_shapes_are_the_official_layout():
    """Vim-tiny's layout (width 192, patch 16 at 224, d_state 16, expand 2, d_conv 4, dt_rank 12),
    written out by hand from hustvl/Vim's models_mamba.py / mamba_simple.py (bimamba v2, RMSNorm)."""
    model = VisionMamba(VimConfig(img_size=224, patch_size=16, embed_dim=192, depth=2, num_classes=1000))
    d, e, n, r = 192, 384, 16, 12
    expected = {"patch_embed.proj.weight": (d, 3, 16, 16), "patch_embed.proj.bias": (d,),
                "cls_token": (1, 1, d), "pos_embed": (1, 197, d), "norm_f.weight": (d,),
                "head.weight": (1000, d), "head.bias": (1000,)}
    for i in range(2):
        pre = f"layers.{i}."
        expected[pre + "norm.weight"] = (d,)
        expected[pre + "mixer.in_proj.weight"] = (2 * e, d)
        expected[pre + "mixer.out_proj.weight"] = (d, e)
        for s in ("", "_b"):
            expected[pre + f"mixer.conv1d{s}.weight"] = (e, 1, 4)
            expected[pre + f"mixer.conv1d{s}.bias"] = (e,)
            expected[pre + f"mixer.x_proj{s}.weight"] = (r + 2 * n, e)
            expected[pre + f"mixer.dt_proj{s}.weight"] = (e, r)
            expected[pre + f"mixer.dt_proj{s}.bias"] = (e,)
            expected[pre + ("mixer.A_log" if not s else "mixer.A_b_log")] = (e, n)
            expected[pre + f"mixer.D{s}"] = (e,)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected
    assert model.cls_position == 98  # 196 // 2, as the official use_middle_cls_token


# ------------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------------

def test_every_tensor_lands_where_it_should(tmp_path):
    src = make_model(embed_dim=192, depth=2, seed=1)
    ckpt = official_checkpoint(src)
    path = save(ckpt, tmp_path)
    dst = make_model(embed_dim=192, depth=2, num_classes=10, seed=2)
    head_before = {k: v.clone() for k, v in dst.head.state_dict().items()}
    log = Log()
    info = load_pretrained(dst, path, log=log)

    saved = ckpt["model"]
    loaded = dst.state_dict()
    for k, v in saved.items():
        if not k.startswith("head."):
            assert torch.equal(loaded[k], v), k
    assert torch.equal(dst.head.weight, head_before["weight"]) and torch.equal(dst.head.bias, head_before["bias"])
    assert dst.head.weight.shape == (10, 192)
    assert info["loaded"] == len(saved) - 2
    assert info["values"] == sum(v.numel() for k, v in saved.items() if not k.startswith("head."))
    assert info["dropped"] == {"head.weight": (1000, 192), "head.bias": (1000,)}
    assert info["pos_embed"] is None and info["cast_from"] == [] and info["notes"] == []
    assert info["checkpoint"]["embed_dim"] == 192 and info["checkpoint"]["img_size"] == 224
    assert 1 <= len(log) <= 2 and "loaded 39 tensors" in log[0] and "head.weight (1000, 192)" in log[1]
    assert "pos_embed kept (14x14 grid)" in log[1]

    # the same features: the model computes what the pretrained one computed
    src.eval(), dst.eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(dst.forward_features(x), src.forward_features(x), rtol=0, atol=0)


@pytest.mark.parametrize("num_classes", [10, 100])
def test_head_is_replaced(tmp_path, num_classes):
    path = save(official_checkpoint(make_model(seed=1)), tmp_path)
    dst = make_model(num_classes=num_classes, seed=3)
    head = dst.head.weight.clone()
    info = load_pretrained(dst, path, log=None)
    assert dst.head.weight.shape == (num_classes, 32) and torch.equal(dst.head.weight, head)
    assert set(info["dropped"]) == {"head.weight", "head.bias"}
    assert dst(torch.randn(1, 3, 224, 224)).shape == (1, num_classes)


def test_extra_entries_are_ignored_and_model_wins_over_ema(tmp_path):
    src = make_model(seed=1)
    ckpt = official_checkpoint(src)
    ckpt["something_else"] = {"nested": [1, 2.5, "x", None, (3, 4)]}
    dst = make_model(num_classes=10, seed=2)
    load_pretrained(dst, save(ckpt, tmp_path), log=None)
    assert torch.equal(dst.norm_f.weight, ckpt["model"]["norm_f.weight"])          # not model_ema's (+1)
    assert not torch.equal(dst.norm_f.weight, ckpt["model_ema"]["norm_f.weight"])


@pytest.mark.parametrize("form", ["model", "state_dict", "bare", "module_prefix", "module_prefix_bare",
                                  "compiled_ddp_prefix"])
def test_container_forms(tmp_path, form):
    src = make_model(seed=1)
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    prefixed = {"module." + k: v for k, v in sd.items()}
    obj = {"model": {"model": sd, "epoch": 3}, "state_dict": {"state_dict": sd, "epoch": 3}, "bare": sd,
           "module_prefix": {"model": prefixed, "args": argparse.Namespace(lr=1.0)},
           "module_prefix_bare": prefixed,
           "compiled_ddp_prefix": {"_orig_mod.module." + k: v for k, v in sd.items()}}[form]
    path = save(obj, tmp_path)
    assert list(read_vim_checkpoint(path)) == list(sd)
    dst = make_model(num_classes=10, seed=2)
    load_pretrained(dst, path, log=None)
    assert torch.equal(dst.layers[1].mixer.x_proj_b.weight, sd["layers.1.mixer.x_proj_b.weight"])
    assert torch.equal(dst.pos_embed, sd["pos_embed"])


def test_a_wrapped_model_is_looked_through(tmp_path):
    sd = make_model(seed=1).state_dict()
    dst = make_model(num_classes=10, seed=2)

    class Wrapper(torch.nn.Module):  # what DDP looks like from here: the model under .module
        def __init__(self, m):
            super().__init__()
            self.module = m

    class Compiled(torch.nn.Module):  # what torch.compile looks like: the model under ._orig_mod
        def __init__(self, m):
            super().__init__()
            self._orig_mod = m

    load_pretrained(Compiled(Wrapper(dst)), save({"model": sd}, tmp_path), log=None)
    assert torch.equal(dst.cls_token, sd["cls_token"])


def test_half_precision_checkpoint_is_cast(tmp_path):
    sd = {k: v.to(torch.bfloat16) for k, v in make_model(seed=1).state_dict().items()}
    dst = make_model(num_classes=10, seed=2)
    log = Log()
    info = load_pretrained(dst, save({"model": sd}, tmp_path), log=log)
    assert info["cast_from"] == ["bfloat16"] and "cast from bfloat16" in log[0]
    assert dst.layers[0].mixer.A_log.dtype == torch.float32
    assert torch.equal(dst.layers[0].mixer.A_log, sd["layers.0.mixer.A_log"].float())


@pytest.mark.parametrize("img_size,grid", [(128, 8), (256, 16)])
def test_load_at_another_resolution(tmp_path, img_size, grid):
    src = make_model(seed=1)  # 224: 14x14
    ckpt = official_checkpoint(src)
    dst = make_model(img_size=img_size, num_classes=100, seed=2)
    log = Log()
    info = load_pretrained(dst, save(ckpt, tmp_path), log=log)
    saved = ckpt["model"]
    assert torch.equal(dst.pos_embed, interpolate_pos_embed(saved["pos_embed"], 14, grid))
    assert dst.pos_embed.shape == (1, grid * grid + 1, 32)
    assert dst.pos_embed[0, grid * grid // 2].equal(saved["pos_embed"][0, 98])   # the class token's row
    for k in ("cls_token", "patch_embed.proj.weight", "layers.1.mixer.dt_proj_b.bias", "norm_f.weight"):
        assert torch.equal(dst.state_dict()[k], saved[k])
    assert info["pos_embed"] == {"from": (14, 14), "to": (grid, grid), "cls_index": (98, grid * grid // 2)}
    assert f"resized 14x14 -> {grid}x{grid}" in log[1] and f"moved 98 -> {grid * grid // 2}" in log[1]
    assert dst(torch.randn(1, 3, img_size, img_size)).shape == (1, 100)


# ------------------------------------------------------------------------------------------------------
# Position embedding interpolation
# ------------------------------------------------------------------------------------------------------

def test_interpolation_is_the_identity_on_the_same_grid():
    pe = torch.randn(1, 197, 24)
    out = interpolate_pos_embed(pe, 14, 14, 98, 98)
    assert torch.equal(out, pe) and out.data_ptr() != pe.data_ptr()
    assert torch.equal(interpolate_pos_embed(pe, (14, 14), (14, 14)), pe)
    pe16 = torch.randn(1, 197, 8, dtype=torch.float16)
    assert torch.equal(interpolate_pos_embed(pe16, 14, 14), pe16)


@pytest.mark.parametrize("new", [8, 16, 7])
def test_interpolation_keeps_the_class_token_and_puts_it_in_the_new_middle(new):
    pe = torch.randn(1, 197, 24)
    out = interpolate_pos_embed(pe, 14, new, 98, new * new // 2)
    assert out.shape == (1, new * new + 1, 24)
    assert torch.equal(out[0, new * new // 2], pe[0, 98])
    # defaults are the middles
    assert torch.equal(interpolate_pos_embed(pe, 14, new), out)


def linear_pos_embed(grid, cls_value=1000.0, dim=4):
    """Patch token (r, c) = (r, c, r + 2c, 1); the middle class token is far away from all of them."""
    r, c = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                          indexing="ij")
    patches = torch.stack([r, c, r + 2 * c, torch.ones_like(r)], dim=-1).reshape(1, grid * grid, dim)
    cls = torch.full((1, 1, dim), cls_value)
    mid = grid * grid // 2
    return torch.cat([patches[:, :mid], cls, patches[:, mid:]], dim=1), patches


@pytest.mark.parametrize("new", [8, 16])
def test_a_smooth_pos_embed_stays_smooth(new):
    pe, patches = linear_pos_embed(14)
    out = interpolate_pos_embed(pe, 14, new)
    mid = new * new // 2
    assert torch.equal(out[0, mid], pe[0, 98])
    grid = torch.cat([out[:, :mid], out[:, mid + 1:]], dim=1).reshape(new, new, 4)

    # exactly the bicubic of the patch grid alone (antialiased when shrinking): the class token took no part
    alone = F.interpolate(patches.reshape(1, 14, 14, 4).permute(0, 3, 1, 2), size=(new, new), mode="bicubic",
                          align_corners=False, antialias=new < 14).permute(0, 2, 3, 1).reshape(new, new, 4)
    torch.testing.assert_close(grid, alone, rtol=0, atol=1e-6)

    # and it is still the linear ramp, sampled at the new cell centres (bicubic is not exactly linear-
    # preserving, hence the tolerance of a small fraction of one old cell)
    centre = (torch.arange(new, dtype=torch.float32) + 0.5) * 14 / new - 0.5
    r, c = torch.meshgrid(centre, centre, indexing="ij")
    ramp = torch.stack([r, c, r + 2 * c, torch.ones_like(r)], dim=-1)
    tolerance = torch.tensor([0.1, 0.1, 0.3, 1e-6])  # per unit of slope: the r + 2c channel gets 3x
    assert ((grid - ramp).abs() <= tolerance).all()
    assert grid.abs().max() < 40  # nothing of the class token's 1000 leaked in

    # the test can tell: the official code's treatment (class token taken from the front) breaks both
    naive = F.interpolate(pe[:, 1:].reshape(1, 14, 14, 4).permute(0, 3, 1, 2), size=(new, new), mode="bicubic",
                          align_corners=False).permute(0, 2, 3, 1).reshape(new, new, 4)
    assert (naive - ramp).abs().max() > 5


def test_interpolation_rejects_a_mismatched_grid():
    with pytest.raises(ValueError, match=r"14x14 grid"):
        interpolate_pos_embed(torch.randn(1, 196, 8), 14, 8)


# ------------------------------------------------------------------------------------------------------
# What the checkpoint is
# ------------------------------------------------------------------------------------------------------

def test_infer_vim_config():
    sd = make_model(embed_dim=48, depth=3, d_state=8, seed=1).state_dict()
    assert infer_vim_config(sd) == dict(embed_dim=48, depth=3, patch_size=16, in_chans=3, img_size=224,
                                        d_state=8, expand=2, d_conv=4, num_classes=1000, grid=14, stem="patch")
    del sd["head.weight"], sd["head.bias"]
    assert infer_vim_config(sd)["num_classes"] is None


def test_pretrained_model_config_builds_the_right_model(tmp_path):
    path = save(official_checkpoint(make_model(embed_dim=48, depth=3, seed=1)), tmp_path)
    cfg = pretrained_model_config(path)
    assert cfg == dict(img_size=224, patch_size=16, in_chans=3, embed_dim=48, depth=3, d_state=16, d_conv=4,
                       expand=2, stem="patch")
    assert pretrained_model_config(path, input_size=128)["img_size"] == 128
    model = VisionMamba(vim_config("mamba_small", num_classes=10, drop_path=0.0,
                                   **pretrained_model_config(path, 128)))
    load_pretrained(model, path, log=None)
    assert matching_variant(cfg) is None
    assert matching_variant(dict(embed_dim=192, depth=24)) == "mamba_tiny"
    for bad in (100, 0, -16, 224.0, True):
        with pytest.raises(PretrainedError, match="multiple of the checkpoint's patch size 16"):
            pretrained_model_config(path, bad)


def test_stride8_release_is_recognised(tmp_path):
    """The '+' releases: patch 16 at stride 8 on 224 -> 27x27 tokens. Read as stride 16 that is 432px."""
    path = save({"model": make_model(embed_dim=16, depth=1, img_size=432, seed=1).state_dict()}, tmp_path)
    with pytest.raises(PretrainedError, match="stride 8 on 224x224"):
        pretrained_model_config(path)
    assert pretrained_model_config(path, 224)["img_size"] == 224
    dst = make_model(embed_dim=16, depth=1, num_classes=10, seed=2)
    log = Log()
    info = load_pretrained(dst, path, log=log)
    assert info["pos_embed"]["from"] == (27, 27) and "stride 8" in info["notes"][0] and "note:" in log[1]


# ------------------------------------------------------------------------------------------------------
# Refusals
# ------------------------------------------------------------------------------------------------------

def refuse(model, path, *patterns):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PretrainedError) as e:
        load_pretrained(model, path, log=None)
    for p in patterns:
        assert p in str(e.value), (p, str(e.value))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # untouched
    return str(e.value)


def test_wrong_width(tmp_path):
    path = save(official_checkpoint(make_model(embed_dim=32, seed=1)), tmp_path)
    refuse(make_model(embed_dim=48, num_classes=10), path, "width (embed_dim): checkpoint 32",
           "patch_embed.proj.weight (32, 3, 16, 16)", "model 48", "patch_embed.proj.weight (48, 3, 16, 16)")


def test_wrong_depth(tmp_path):
    path = save(official_checkpoint(make_model(depth=2, seed=1)), tmp_path)
    refuse(make_model(depth=3, num_classes=10), path, "depth: checkpoint 2 (layers.0 .. layers.1), model 3")


def test_wrong_d_state_and_patch(tmp_path):
    path = save(official_checkpoint(make_model(d_state=8, seed=1)), tmp_path)
    refuse(make_model(num_classes=10), path, "d_state: checkpoint 8 (layers.0.mixer.A_log (64, 8))",
           "model 16 (layers.0.mixer.A_log (64, 16))")
    path = save(official_checkpoint(make_model(img_size=32, patch_size=4, seed=1)), tmp_path, "p4.pth")
    refuse(make_model(num_classes=10), path, "patch size: checkpoint 4", "model 16")


def test_missing_key(tmp_path):
    sd = make_model(seed=1).state_dict()
    del sd["layers.1.mixer.D_b"], sd["layers.0.mixer.conv1d_b.bias"]
    refuse(make_model(num_classes=10), save({"model": sd}, tmp_path),
           "2 model tensors missing from the checkpoint: layers.0.mixer.conv1d_b.bias, layers.1.mixer.D_b")


def test_missing_essential_key(tmp_path):
    sd = make_model(seed=1).state_dict()
    del sd["pos_embed"]
    refuse(make_model(num_classes=10), save({"model": sd}, tmp_path), "not a Vim state dict: no pos_embed")


def test_unexpected_key(tmp_path):
    sd = make_model(seed=1).state_dict()
    sd["layers.0.mixer.gamma"] = torch.ones(32)          # layer scale, which we do not have
    sd["rope.freqs_cos"] = torch.ones(197, 16)             # RoPE buffers, which we do not have
    refuse(make_model(num_classes=10), save({"model": sd}, tmp_path),
           "2 checkpoint tensors this model does not have: layers.0.mixer.gamma, rope.freqs_cos")


def test_many_problems_are_counted_and_the_first_few_named(tmp_path):
    sd = make_model(seed=1).state_dict()
    for i in range(8):
        sd[f"extra.{i}"] = torch.zeros(1)
    msg = refuse(make_model(num_classes=10), save({"model": sd}, tmp_path), "8 checkpoint tensors",
                 "extra.0, extra.1, extra.2, extra.3, extra.4 and 3 more")
    assert "extra.5" not in msg


def test_wrong_shape(tmp_path):
    sd = make_model(seed=1).state_dict()
    sd["layers.1.mixer.x_proj.weight"] = torch.zeros(40, 64)
    refuse(make_model(num_classes=10), save({"model": sd}, tmp_path),
           "1 shapes differ: layers.1.mixer.x_proj.weight checkpoint (40, 64) vs model (34, 64)")


def test_non_float_and_non_finite(tmp_path):
    sd = make_model(seed=1).state_dict()
    sd["layers.0.norm.weight"] = torch.ones(32, dtype=torch.int64)
    refuse(make_model(num_classes=10), save({"model": sd}, tmp_path), "not floating point: layers.0.norm.weight")
    sd = make_model(seed=1).state_dict()
    sd["layers.1.mixer.D"][3] = float("nan")
    refuse(make_model(num_classes=10), save({"model": sd}, tmp_path, "nan.pth"), "NaN or infinity: layers.1.mixer.D")


def test_missing_file(tmp_path):
    refuse(make_model(num_classes=10), str(tmp_path / "nope.pth"), "no pretrained checkpoint at")


def test_corrupt_file(tmp_path):
    path = save(official_checkpoint(make_model(seed=1)), tmp_path)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    refuse(make_model(num_classes=10), path, "is not a readable PyTorch checkpoint")


@pytest.mark.parametrize("content,pattern", [
    (b"this is a README, not weights\n", "is not a readable PyTorch checkpoint"),
    ([1, 2, 3], "holds a list, not a state dict"),
    ({"net": {"w": torch.ones(2)}, "epoch": 3}, "2 of its 2 entries are not named tensors: 'net' (dict), 'epoch' (int)"),
    ({"model": torch.ones(3)}, "['model'] is a Tensor, not a state dict"),
    ({"model": {}}, "['model'] is an empty dict"),
    (torch.nn.Linear(4, 2).state_dict(), "not a Vim state dict: no patch_embed.proj.weight, pos_embed, cls_token"),
])
def test_not_a_vim_checkpoint(tmp_path, content, pattern):
    path = tmp_path / "x.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    refuse(make_model(num_classes=10), str(path), pattern)
    with pytest.raises(PretrainedError):
        pretrained_model_config(str(path))


# ------------------------------------------------------------------------------------------------------
# Hostile files: the payload must never run
# ------------------------------------------------------------------------------------------------------

class _ShellPayload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _ExecPayload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.mark.parametrize("payload,global_name", [(_ShellPayload, "system"), (_ExecPayload, "exec")])
@pytest.mark.parametrize("where", ["whole_file", "in_args_of_a_good_checkpoint", "legacy_pickle"])
def test_a_code_running_pickle_does_not_run(tmp_path, payload, global_name, where):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    if where == "whole_file":
        torch.save(payload(marker), path)
    elif where == "in_args_of_a_good_checkpoint":
        ckpt = official_checkpoint(make_model(seed=1))
        ckpt["args"] = payload(marker)
        torch.save(ckpt, path)
    else:  # a plain pickle, not torch's zip format (protocol 2, as torch's legacy format)
        with open(path, "wb") as f:
            pickle.dump({"model": payload(marker)}, f, protocol=2)
    msg = refuse(make_model(num_classes=10), str(path), str(path))
    assert not marker.exists()
    assert global_name in msg and "neither built nor run" in msg
    for fn in (read_vim_checkpoint, pretrained_model_config):
        with pytest.raises(PretrainedError):
            fn(str(path))
    assert not marker.exists()


def test_a_newer_protocol_pickle_payload_does_not_run_either(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil4.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": _ExecPayload(marker)}, f, protocol=4)
    with pytest.warns(UserWarning, match="pickle protocol"), pytest.raises(PretrainedError, match="evil4.pth"):
        read_vim_checkpoint(str(path))
    assert not marker.exists()

"""models/vim.py and models/bimamba.py: shapes, gradients, the official Vim parameter layout, variant sizes,
the middle class token, the bidirectional scan, drop path, weight-decay groups."""
import copy

import pytest
import torch
import torch.nn.functional as F

from models.bimamba import BiMambaMixer
from models.vim import VARIANTS, build_model, vim_config
from training.optim import build_optimizer

TINY = dict(embed_dim=16, depth=2, patch_size=8)


def tiny_model(num_classes=10, seed=0, **kw):
    torch.manual_seed(seed)
    return build_model("mamba_tiny", num_classes, **{**TINY, **kw})


def images(n=2, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_forward_shape_and_finite():
    for classes in (10, 100):
        m = tiny_model(classes).eval()
        out = m(images(3))
        assert out.shape == (3, classes)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        assert m.forward_features(images(3)).shape == (3, 16)


def test_every_parameter_gets_a_finite_nonzero_gradient():
    m = tiny_model(drop_path=0.0).train()
    y = torch.tensor([1, 7, 3, 0])
    loss = torch.nn.functional.cross_entropy(m(images(4)), y)
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def expected_names(depth):
    mixer = ["in_proj.weight", "conv1d.weight", "conv1d.bias", "conv1d_b.weight", "conv1d_b.bias", "x_proj.weight",
             "x_proj_b.weight", "dt_proj.weight", "dt_proj.bias", "dt_proj_b.weight", "dt_proj_b.bias", "A_log",
             "A_b_log", "D", "D_b", "out_proj.weight"]
    names = {"patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed", "cls_token", "norm_f.weight",
             "head.weight", "head.bias"}
    for i in range(depth):
        names.add(f"layers.{i}.norm.weight")
        names |= {f"layers.{i}.mixer.{n}" for n in mixer}
    return names


def test_state_dict_follows_the_official_vim_layout():
    m = tiny_model(depth=3)
    sd = m.state_dict()
    assert set(sd) == expected_names(3)
    assert set(n for n, _ in m.named_parameters()) == expected_names(3)  # every entry is trained, no buffers


def test_state_dict_shapes():
    d, n_state, d_inner, dt_rank, k = 16, 16, 32, 1, 4
    sd = tiny_model().state_dict()
    shapes = {
        "patch_embed.proj.weight": (d, 3, 8, 8), "pos_embed": (1, 17, d), "cls_token": (1, 1, d),
        "layers.0.mixer.in_proj.weight": (2 * d_inner, d), "layers.0.mixer.conv1d.weight": (d_inner, 1, k),
        "layers.0.mixer.x_proj_b.weight": (dt_rank + 2 * n_state, d_inner),
        "layers.0.mixer.dt_proj.weight": (d_inner, dt_rank), "layers.0.mixer.A_log": (d_inner, n_state),
        "layers.0.mixer.A_b_log": (d_inner, n_state), "layers.0.mixer.D_b": (d_inner,),
        "layers.0.mixer.out_proj.weight": (d, d_inner), "head.weight": (10, d),
    }
    for name, shape in shapes.items():
        assert tuple(sd[name].shape) == shape, name


def count_params(arch, **kw):
    return sum(p.numel() for p in build_model(arch, 10, **kw).parameters())


@pytest.mark.parametrize("arch,width,params", [("mamba_tiny", 192, 6_793_354), ("mamba_small", 384, 25_088_266),
                                               ("mamba_base", 768, 96_182_794)])
def test_variant_sizes(arch, width, params):
    cfg = vim_config(arch)
    assert (cfg.embed_dim, cfg.depth, cfg.patch_size, cfg.img_size) == (width, 24, 4, 32)
    assert cfg.num_patches == 64
    # Cheap count: every block has the same size, so the 24-layer total follows from 1- and 2-layer models.
    one, two = count_params(arch, depth=1), count_params(arch, depth=2)
    assert one + 23 * (two - one) == params


def test_full_tiny_variant_count():
    """The extrapolation above is exact: the real 24-layer mamba_tiny has the same count."""
    m = build_model("mamba_tiny", 10)
    assert len(m.layers) == 24 and m.cfg.embed_dim == 192
    assert sum(p.numel() for p in m.parameters()) == 6_793_354
    assert set(VARIANTS) == {"mamba_tiny", "mamba_small", "mamba_base"}


def test_overrides_take_effect():
    m = build_model("mamba_small", 7, embed_dim=24, depth=3, patch_size=16)
    assert len(m.layers) == 3
    assert m.patch_embed.proj.weight.shape == (24, 3, 16, 16)
    assert m.pos_embed.shape == (1, 5, 24)          # 4 patches + the class token
    assert m.head.weight.shape == (7, 24)
    assert m.eval()(images(2)).shape == (2, 7)
    # None means "the variant's value"
    m2 = build_model("mamba_tiny", 10, embed_dim=None, depth=None, patch_size=None)
    assert (m2.cfg.embed_dim, m2.cfg.depth, m2.cfg.patch_size) == (192, 24, 4)


def test_unknown_arch():
    with pytest.raises(ValueError, match="mamba_huge"):
        build_model("mamba_huge", 10)
    with pytest.raises(ValueError):
        vim_config("vit_small")


def test_patch_size_must_divide_image():
    with pytest.raises(ValueError):
        build_model("mamba_tiny", 10, **{**TINY, "patch_size": 5})


def test_class_token_sits_in_the_middle():
    m = tiny_model().eval()
    M = m.cfg.num_patches
    mid = M // 2
    x = images(2)
    seen = {}
    m.layers[0].register_forward_pre_hook(lambda mod, args: seen.__setitem__("tokens", args[0].detach()))
    m.norm_f.register_forward_hook(lambda mod, args, out: seen.__setitem__("final", out.detach()))
    feats = m.forward_features(x)

    tokens = seen["tokens"]                                       # the sequence entering the first block
    assert tokens.shape == (2, M + 1, 16)
    patches = m.patch_embed.proj(x).flatten(2).transpose(1, 2)    # (B, M, D) in raster order
    pos = m.pos_embed[0].detach()
    torch.testing.assert_close(tokens[:, mid], (m.cls_token[0, 0] + pos[mid]).expand(2, -1))
    torch.testing.assert_close(tokens[:, :mid], patches[:, :mid] + pos[:mid])
    torch.testing.assert_close(tokens[:, mid + 1:], patches[:, mid:] + pos[mid + 1:])
    # the features are the final normed sequence at the class token's position
    torch.testing.assert_close(feats, seen["final"][:, mid])


def test_output_depends_on_the_class_token():
    m = tiny_model().eval()
    x = images(2)
    before = m(x)
    with torch.no_grad():
        m.cls_token.add_(1.0)
    assert not torch.allclose(before, m(x))


def mixer_and_input(seed=0):
    torch.manual_seed(seed)
    mixer = BiMambaMixer(8, d_state=4).eval()
    with torch.no_grad():  # make D and A differ between the directions, so that swapping them matters
        for p in mixer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return mixer, torch.randn(2, 9, 8)


DIRECTION_PARAMS = [("conv1d.weight", "conv1d_b.weight"), ("conv1d.bias", "conv1d_b.bias"),
                    ("x_proj.weight", "x_proj_b.weight"), ("dt_proj.weight", "dt_proj_b.weight"),
                    ("dt_proj.bias", "dt_proj_b.bias"), ("A_log", "A_b_log"), ("D", "D_b")]


def test_backward_direction_scans_the_flipped_sequence():
    """Mixer(h) with the two directions' parameters swapped, applied to the flipped sequence, is the flipped
    output: true only if the second direction runs on the reversed tokens and is flipped back."""
    mixer, h = mixer_and_input()
    out = mixer(h)
    swapped = copy.deepcopy(mixer)
    sd = mixer.state_dict()
    new = dict(sd)
    for f, b in DIRECTION_PARAMS:
        new[f], new[b] = sd[b], sd[f]
    swapped.load_state_dict(new)
    torch.testing.assert_close(swapped(h.flip(1)), out.flip(1), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(mixer(h.flip(1)), out.flip(1), atol=1e-4)  # the swap is needed: directions differ


def test_mixer_is_vims_bidirectional_mixer_written_out():
    """The mixer (x and z as two products, the directions' mean in the scans' epilogues) equals Vim's v2 mixer written
    out plainly: in_proj split in two; per direction, on the tokens in order or flipped, the causal conv + SiLU,
    x_proj, dt_proj with its bias, the scan with the z gate; the flipped one flipped back; the mean; out_proj."""
    from models.bimamba import conv1d_silu
    from models.scan import selective_scan_ref
    mixer, h = mixer_and_input(2)
    x, z = mixer.in_proj(h).chunk(2, dim=-1)
    ys = []
    for suffix, flip in (("", False), ("_b", True)):
        xs, zs = (x.flip(1), z.flip(1)) if flip else (x, z)
        conv = getattr(mixer, "conv1d" + suffix)
        u = conv1d_silu(xs, conv.weight.squeeze(1), conv.bias)
        dt, B, C = getattr(mixer, "x_proj" + suffix)(u).split([mixer.dt_rank, mixer.d_state, mixer.d_state], -1)
        dt = getattr(mixer, "dt_proj" + suffix)(dt)
        A = -torch.exp(getattr(mixer, "A_log" if not suffix else "A_b_log"))
        y = selective_scan_ref(u.mT, dt.mT, A, B.mT, C.mT, getattr(mixer, "D" + suffix), z=zs.mT,
                               delta_softplus=True).mT
        ys.append(y.flip(1) if flip else y)
    torch.testing.assert_close(mixer(h), mixer.out_proj((ys[0] + ys[1]) / 2), rtol=1e-5, atol=1e-6)


def silence(mixer, suffix):
    """Make one direction output exactly zero: B = C = 0 (x_proj rows) and D = 0."""
    with torch.no_grad():
        getattr(mixer, "x_proj" + suffix).weight[mixer.dt_rank:] = 0
        getattr(mixer, "D" + suffix).zero_()


def test_forward_direction_is_causal_and_backward_is_anticausal():
    L, t = 9, 4
    for silenced in ("_b", ""):
        mixer, h = mixer_and_input(1)
        silence(mixer, silenced)
        h2 = h.clone()
        h2[:, t] += 1.0
        diff = (mixer(h) - mixer(h2)).abs().amax(dim=(0, 2))   # per position
        assert diff.shape == (L,) and diff[t] > 1e-4
        if silenced == "_b":   # only the forward direction: a change at t reaches positions >= t only
            assert diff[:t].max() < 1e-7 and diff[t + 1:].min() > 1e-6
        else:                  # only the backward direction: positions <= t only
            assert diff[t + 1:].max() < 1e-7 and diff[:t].min() > 1e-6


def drop_rate(module):
    return getattr(module, "drop_prob", 0.0)


def test_drop_path_rises_linearly_across_depth():
    m = build_model("mamba_tiny", 10, embed_dim=16, depth=5, patch_size=8, drop_path=0.2)
    rates = [drop_rate(layer.drop_path) for layer in m.layers]
    assert rates == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    assert isinstance(m.layers[0].drop_path, torch.nn.Identity)
    assert drop_rate(m.drop_path_f) == pytest.approx(0.2)
    m0 = build_model("mamba_tiny", 10, embed_dim=16, depth=3, patch_size=8, drop_path=0.0)
    assert all(drop_rate(layer.drop_path) == 0 for layer in m0.layers)


def test_drop_path_only_in_training():
    m = tiny_model(drop_path=0.5)
    x = images(4)
    m.eval()
    assert torch.equal(m(x), m(x))
    m.train()
    torch.manual_seed(0)
    a = m(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, m(x))


def test_no_weight_decay_names():
    m = tiny_model(depth=3)
    expected = {"pos_embed", "cls_token"} | {f"layers.{i}.mixer.{n}" for i in range(3) for n in ("A_log", "A_b_log")}
    assert set(m.no_weight_decay()) == expected


def test_optimizer_groups():
    m = tiny_model(depth=2)
    opt = build_optimizer(m, 1e-3, 0.05, torch.device("cpu"))
    by_id = {id(p): n for n, p in m.named_parameters()}
    groups = {g["weight_decay"]: {by_id[id(p)] for p in g["params"]} for g in opt.param_groups}
    assert set(groups) == {0.05, 0.0}
    no_decay_named = {"pos_embed", "cls_token"} | {f"layers.{i}.mixer.{n}" for i in range(2)
                                                   for n in ("A_log", "A_b_log")}
    expected_no = {n for n, p in m.named_parameters() if p.ndim <= 1} | no_decay_named
    assert groups[0.0] == expected_no
    assert groups[0.05] == set(by_id.values()) - expected_no
    assert "layers.0.mixer.D" in groups[0.0] and "layers.1.mixer.dt_proj_b.bias" in groups[0.0]
    assert "layers.0.norm.weight" in groups[0.0] and "head.bias" in groups[0.0]
    assert {"head.weight", "patch_embed.proj.weight", "layers.1.mixer.in_proj.weight",
            "layers.0.mixer.conv1d_b.weight"} <= groups[0.05]
    assert all(g["lr"] == 1e-3 for g in opt.param_groups)
    total = sum(len(g["params"]) for g in opt.param_groups)
    assert total == len(list(m.parameters()))


def test_weight_decay_leaves_no_decay_group_alone():
    """One AdamW step with zero gradients: only the decay group shrinks."""
    m = tiny_model()
    opt = build_optimizer(m, 0.1, 0.5, torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    skip = set(m.no_weight_decay())
    for n, p in m.named_parameters():
        if p.ndim <= 1 or n in skip:
            assert torch.equal(p, before[n]), n
        else:
            torch.testing.assert_close(p.detach(), before[n] * (1 - 0.1 * 0.5))


@pytest.mark.parametrize("reverse", [False, True])
def test_conv1d_silu_is_the_official_depthwise_conv(reverse):
    """Our channels-last shifted-sum conv equals nn.Conv1d(groups=D, padding=K-1) truncated to L (Mamba's), then
    SiLU; reverse=True equals it on the flipped sequence, flipped back."""
    from models.bimamba import conv1d_silu
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(6, 6, 4, groups=6, padding=3)
    x = torch.randn(2, 7, 6)                                               # (B, L, D)
    seq = x.flip(1) if reverse else x
    want = F.silu(conv(seq.transpose(1, 2))[..., :7]).transpose(1, 2)
    want = want.flip(1) if reverse else want
    got = conv1d_silu(x, conv.weight.squeeze(1), conv.bias, reverse=reverse)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scan", ["ref", "triton"])
def test_the_triton_scan_brings_the_triton_convs(scan, monkeypatch):
    """With the Triton scan the mixer's two convs and x_projs go to models/conv_triton.py's op, with each direction's
    own weights; with any other scan they stay the PyTorch conv and nn.Linear (the op stood in for by them here, as
    the CPU cannot compile it; tests/test_conv_triton.py checks the op itself)."""
    pytest.importorskip("triton")
    import models.conv_triton
    from models.bimamba import conv1d_silu
    calls = []

    def stand_in(x, w_f, b_f, w_b, b_b, p_f, p_b):
        calls.append((w_f, b_f, w_b, b_b, p_f, p_b))
        u_f, u_b = conv1d_silu(x, w_f, b_f), conv1d_silu(x, w_b, b_b, reverse=True)
        return u_f, u_b, u_f @ p_f.t(), u_b @ p_b.t()

    monkeypatch.setattr(models.conv_triton, "conv_pair_silu", stand_in)
    torch.manual_seed(0)
    mixer = BiMambaMixer(8)
    mixer.set_kernels(scan, False)
    x = torch.randn(2, 5, mixer.d_inner)
    u_f, u_b, q_f, q_b = mixer._convs(x)
    torch.testing.assert_close(u_f, conv1d_silu(x, mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias))
    torch.testing.assert_close(u_b, conv1d_silu(x, mixer.conv1d_b.weight.squeeze(1), mixer.conv1d_b.bias, True))
    torch.testing.assert_close(q_f, mixer.x_proj(u_f))
    torch.testing.assert_close(q_b, mixer.x_proj_b(u_b))
    assert len(calls) == (scan == "triton")
    if calls:
        w_f, b_f, w_b, b_b, p_f, p_b = calls[0]
        assert torch.equal(w_f, mixer.conv1d.weight.squeeze(1)) and b_f is mixer.conv1d.bias
        assert torch.equal(w_b, mixer.conv1d_b.weight.squeeze(1)) and b_b is mixer.conv1d_b.bias
        assert p_f is mixer.x_proj.weight and p_b is mixer.x_proj_b.weight


@pytest.mark.parametrize("scan", ["ref", "triton"])
def test_the_triton_scan_runs_both_directions_as_one_op(scan, monkeypatch):
    """With the Triton scan the mixer's two scans go to models/scan_triton.py's scan pair, once, with each direction's
    own parameters; with any other scan they stay two calls of the backend's scan (the forward direction, then the
    reverse one adding half its output to half the first's). The pair (and the Triton conv op that comes with it) are
    stood in for by the reference scan (and conv) composed the same way, as the CPU cannot compile them;
    tests/test_scan_triton.py checks the pair itself. Either way the output is the plain mixer's."""
    pytest.importorskip("triton")
    import models.bimamba as bimamba
    import models.conv_triton
    import models.scan_triton
    from models.bimamba import conv1d_silu
    from models.scan import selective_scan_ref
    mixer, h = mixer_and_input(3)
    want = mixer(h)  # the reference scan's two calls
    pairs, singles = [], []

    def conv_stand_in(x, w_f, b_f, w_b, b_b, p_f, p_b):
        u_f, u_b = conv1d_silu(x, w_f, b_f), conv1d_silu(x, w_b, b_b, reverse=True)
        return u_f, u_b, u_f @ p_f.t(), u_b @ p_b.t()

    def pair_stand_in(u_f, dt_f, A_f, B_f, C_f, D_f, bias_f, u_b, dt_b, A_b, B_b, C_b, D_b, bias_b, z,
                      delta_softplus=True):
        pairs.append(dict(A_f=A_f, D_f=D_f, bias_f=bias_f, A_b=A_b, D_b=D_b, bias_b=bias_b, softplus=delta_softplus))
        y = selective_scan_ref(u_f, dt_f, A_f, B_f, C_f, D_f, z, bias_f, delta_softplus, out_scale=0.5)
        return selective_scan_ref(u_b, dt_b, A_b, B_b, C_b, D_b, z, bias_b, delta_softplus, reverse=True,
                                  out_scale=0.5, out_add=y)

    def single(*args, **kw):
        singles.append(kw)
        return selective_scan_ref(*args, **kw)

    monkeypatch.setattr(models.conv_triton, "conv_pair_silu", conv_stand_in)
    monkeypatch.setattr(models.scan_triton, "selective_scan_pair_triton", pair_stand_in)
    monkeypatch.setattr(bimamba, "get_scan_fn", lambda backend: single)
    mixer.set_kernels(scan, False)
    torch.testing.assert_close(mixer(h), want, rtol=1e-5, atol=1e-6)
    if scan == "triton":
        assert len(pairs) == 1 and not singles
        got = pairs[0]
        assert got["D_f"] is mixer.D and got["bias_f"] is mixer.dt_proj.bias and got["softplus"] is True
        assert got["D_b"] is mixer.D_b and got["bias_b"] is mixer.dt_proj_b.bias
        assert torch.equal(got["A_f"], -torch.exp(mixer.A_log)) and torch.equal(got["A_b"], -torch.exp(mixer.A_b_log))
    else:
        assert not pairs and [(kw["reverse"], kw["out_scale"], kw["out_add"] is None) for kw in singles] == \
            [(False, 0.5, True), (True, 0.5, False)]


def test_conv_stem_gives_the_patch_4_grid():
    """--stem conv: two stride-2 stages, so 32x32 -> 8x8 = 64 tokens + the class token, like patch 4; the class token
    still sits in the middle; every stem parameter learns."""
    torch.manual_seed(0)
    model = build_model("mamba_tiny", 10, embed_dim=32, depth=2, stem="conv", drop_path=0.0)
    assert model.cfg.num_patches == 64 and model.cls_position == 32 and model.pos_embed.shape == (1, 65, 32)
    x = torch.randn(2, 3, 32, 32)
    assert model.patch_embed(x).shape == (2, 64, 32)
    F.cross_entropy(model(x), torch.tensor([1, 2])).backward()
    stem = dict(model.patch_embed.named_parameters())
    assert set(stem) == {"proj.0.weight", "proj.3.weight"}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stem.values())
    assert build_model("mamba_tiny", 10, stem="conv", img_size=64).cfg.num_patches == 256


def test_conv_stem_stride_2_gives_the_patch_2_grid():
    """--stem conv --patch_size 2: the same two convolutions and parameters without the last pool, so 32x32 ->
    16x16 = 256 tokens + the class token, like patch 2; its weights load into the stride-4 stem and back."""
    torch.manual_seed(0)
    model = build_model("mamba_tiny", 10, embed_dim=32, depth=2, stem="conv", patch_size=2, drop_path=0.0)
    assert model.cfg.num_patches == 256 and model.cls_position == 128 and model.pos_embed.shape == (1, 257, 32)
    x = torch.randn(2, 3, 32, 32)
    assert model.patch_embed(x).shape == (2, 256, 32)
    F.cross_entropy(model(x), torch.tensor([1, 2])).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.patch_embed.parameters())
    four = build_model("mamba_tiny", 10, embed_dim=32, depth=2, stem="conv", drop_path=0.0).patch_embed
    four.load_state_dict(model.patch_embed.state_dict())  # same names and shapes: only the pooling differs
    # the stride-4 stem is the stride-2 stem followed by one more 3x3 max-pool of stride 2
    pooled = F.max_pool2d(model.patch_embed.proj(x), 3, stride=2, padding=1)
    torch.testing.assert_close(four(x), pooled.flatten(2).transpose(1, 2))


def test_bad_stem():
    with pytest.raises(ValueError, match="stem"):
        build_model("mamba_tiny", 10, stem="vit")
    with pytest.raises(ValueError, match="divisible by 4"):
        build_model("mamba_tiny", 10, stem="conv", img_size=30)
    with pytest.raises(ValueError, match="divisible by 2"):
        build_model("mamba_tiny", 10, stem="conv", patch_size=2, img_size=31)
    for stride in (1, 3, 8):
        with pytest.raises(ValueError, match="stride is 2 or 4"):
            build_model("mamba_tiny", 10, stem="conv", patch_size=stride)


def test_causal_conv1d_only_with_mamba_ssms_scan_uncompiled_and_installed(monkeypatch):
    import models.bimamba as bimamba
    monkeypatch.setattr(bimamba, "causal_conv1d_available", lambda: True)
    assert bimamba.use_causal_conv1d("cuda", compiled=False)
    assert not bimamba.use_causal_conv1d("cuda", compiled=True)
    assert not any(bimamba.use_causal_conv1d(scan, compiled=False) for scan in ("triton", "ref"))
    monkeypatch.setattr(bimamba, "causal_conv1d_available", lambda: False)
    assert not bimamba.use_causal_conv1d("cuda", compiled=False)

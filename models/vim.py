"""Vision Mamba (Vim, hustvl/Vim) with the middle class token, for CIFAR-sized inputs.

patch embed (conv; or an optional convolutional stem) -> insert cls token in the middle -> + pos embed
  -> depth x [residual add (fp32), RMSNorm, BiMambaMixer] -> residual add, RMSNorm -> cls token -> head
Parameter names follow the official layout so its checkpoints map onto ours.
"""
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
from timm.layers import DropPath, trunc_normal_

from models.bimamba import BiMambaMixer

# Vim's tiny / small / base: the same depth, widths 192 / 384 / 768.
VARIANTS = {
    "mamba_tiny": dict(embed_dim=192, depth=24),
    "mamba_small": dict(embed_dim=384, depth=24),
    "mamba_base": dict(embed_dim=768, depth=24),
}


@dataclass(frozen=True)
class VimConfig:
    img_size: int = 32
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 10
    embed_dim: int = 384
    depth: int = 24
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    drop_path: float = 0.1
    norm_eps: float = 1e-5
    stem: str = "patch"  # "patch": Vim's patch embedding; "conv": ConvStem, whose stride is then patch_size (2 or 4)

    @property
    def num_patches(self):
        return (self.img_size // self.patch_size) ** 2


def vim_config(arch, **overrides):
    """The variant's numbers, with any non-None override (embed_dim, depth, patch_size, ...) applied."""
    if arch not in VARIANTS:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(VARIANTS)}")
    cfg = VimConfig(**VARIANTS[arch])
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


class PatchEmbed(nn.Module):
    def __init__(self, img_size, patch_size, in_chans, embed_dim):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"patch size {patch_size} does not divide the image size {img_size}")
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W/p^2, D)


class ConvStem(nn.Module):
    """A convolutional tokenizer in the manner of Compact Convolutional Transformers (CCT-x/3x2): two stages of
    (3x3 conv, ReLU, 3x3 max-pool with stride 2), so each token sees a 13x13-pixel field and the 32x32 image gives
    the same 8x8 = 64 tokens as patch 4. With stride 2 the second stage has no pool: the same two convolutions and
    parameters, a 9x9-pixel field, and 16x16 = 256 tokens, as patch 2. The trainer's tokenizer from scratch, at
    stride 2 unless ``--patch_size 4``; official checkpoints use patches."""
    STRIDES = (2, 4)

    def __init__(self, img_size, in_chans, embed_dim, stride=4, hidden=64):
        super().__init__()
        if stride not in self.STRIDES:
            raise ValueError(f"the conv stem's stride is 2 or 4, got {stride}")
        if img_size % stride:
            raise ValueError(f"the conv stem needs an image size divisible by {stride}, got {img_size}")
        last_pool = [nn.MaxPool2d(3, stride=2, padding=1)] if stride == 4 else []
        self.proj = nn.Sequential(  # the convolutions stay at indices 0 and 3 for either stride
            nn.Conv2d(in_chans, hidden, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1),
            nn.Conv2d(hidden, embed_dim, 3, padding=1, bias=False), nn.ReLU(), *last_pool)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W/stride^2, D)


class Block(nn.Module):
    """Vim's block: add the residual (kept in fp32), normalise, mix."""

    def __init__(self, cfg, drop_path):
        super().__init__()
        self.mixer = BiMambaMixer(cfg.embed_dim, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand)
        self.norm = nn.RMSNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, hidden, residual):
        residual = hidden.float() if residual is None else residual + self.drop_path(hidden).float()
        hidden = self.mixer(self.norm(residual.to(self.norm.weight.dtype)))
        return hidden, residual


class VisionMamba(nn.Module):
    def __init__(self, cfg: VimConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.stem not in ("patch", "conv"):
            raise ValueError(f"unknown stem {cfg.stem!r}; choose patch or conv")
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim) \
            if cfg.stem == "patch" else ConvStem(cfg.img_size, cfg.in_chans, cfg.embed_dim, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.embed_dim))
        rates = [r.item() for r in torch.linspace(0, cfg.drop_path, cfg.depth, device="cpu")]
        self.layers = nn.ModuleList(Block(cfg, r) for r in rates)
        self.drop_path_f = DropPath(rates[-1]) if rates[-1] > 0 else nn.Identity()
        self.norm_f = nn.RMSNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes)
        self._init_weights()

    @property
    def cls_position(self):
        return self.cfg.num_patches // 2

    def set_kernels(self, scan_backend, use_causal_conv1d=False):
        for layer in self.layers:
            layer.mixer.set_kernels(scan_backend, use_causal_conv1d)

    def _init_weights(self):
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        for layer in self.layers:
            # GPT-2 style rescale of the residual branch's output projection by 1/sqrt(depth), as Mamba/Vim.
            nn.init.kaiming_uniform_(layer.mixer.out_proj.weight, a=math.sqrt(5))
            with torch.no_grad():
                layer.mixer.out_proj.weight /= math.sqrt(self.cfg.depth)

    def no_weight_decay(self):
        """Names of parameters trained without weight decay (besides every 1-D tensor)."""
        names = {"pos_embed", "cls_token"}
        names |= {n for n, _ in self.named_parameters() if n.endswith(("A_log", "A_b_log"))}
        return names

    def forward_features(self, x):
        """x: (B, 3, H, W) -> the class token's features (B, embed_dim)."""
        x = self.patch_embed(x)                                            # (B, M, D)
        pos = self.cls_position
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([x[:, :pos], cls, x[:, pos:]], dim=1) + self.pos_embed  # (B, M + 1, D)
        hidden, residual = x, None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual)
        residual = residual + self.drop_path_f(hidden).float()
        hidden = self.norm_f(residual.to(self.norm_f.weight.dtype))
        return hidden[:, pos]

    def forward(self, x):
        return self.head(self.forward_features(x))


def build_model(arch, num_classes, **overrides):
    return VisionMamba(vim_config(arch, num_classes=num_classes, **overrides))

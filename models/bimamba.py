"""Vim's bidirectional "v2" Mamba mixer.

One in_proj and one out_proj serve both directions. The forward direction scans the tokens in order; the
backward direction has its own conv1d, x_proj, dt_proj, A and D and scans the flipped sequence. The two
outputs are averaged before out_proj (Vim's ``if_divide_out``). Parameter names follow hustvl/Vim, so its
checkpoints load as they are.
"""
import importlib.util
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.scan import get_scan_fn


def causal_conv1d_available():
    return importlib.util.find_spec("causal_conv1d") is not None


def causal_conv1d_silu_ref(x, weight, bias):
    """Depthwise causal conv + SiLU. x: (B, D, L), weight: (D, K), bias: (D,) -> (B, D, L)."""
    k = weight.shape[-1]
    y = F.conv1d(F.pad(x, (k - 1, 0)), weight.unsqueeze(1), bias, groups=x.shape[1])
    return F.silu(y)


class BiMambaMixer(nn.Module):
    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto",
                 dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4):
        super().__init__()
        self.d_model, self.d_state = d_model, d_state
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        for suffix in ("", "_b"):  # the forward ("") and backward ("_b") directions' own parameters
            conv = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1)
            x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
            dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
            _init_dt_proj(dt_proj, self.dt_rank, dt_min, dt_max, dt_init_floor)
            # S4D-real initialisation: A = -(1..N) for every channel, stored as log for positivity.
            A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
            setattr(self, "conv1d" + suffix, conv)
            setattr(self, "x_proj" + suffix, x_proj)
            setattr(self, "dt_proj" + suffix, dt_proj)
            setattr(self, "A_log" if not suffix else "A_b_log", nn.Parameter(torch.log(A)))
            setattr(self, "D" + suffix, nn.Parameter(torch.ones(self.d_inner)))
        self.scan_backend = "ref"
        self.use_causal_conv1d = False

    def set_kernels(self, scan_backend, use_causal_conv1d):
        self.scan_backend, self.use_causal_conv1d = scan_backend, use_causal_conv1d

    def _conv(self, x, conv):
        if self.use_causal_conv1d:
            from causal_conv1d import causal_conv1d_fn
            return causal_conv1d_fn(x, conv.weight.squeeze(1), conv.bias, activation="silu")
        return causal_conv1d_silu_ref(x, conv.weight.squeeze(1), conv.bias)

    def _direction(self, x, z, conv, x_proj, dt_proj, A_log, D):
        """One scan direction. x, z: (B, D_in, L) -> (B, D_in, L)."""
        x = self._conv(x, conv)
        x_dbl = x_proj(x.transpose(1, 2))                                  # (B, L, R + 2N)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = (dt @ dt_proj.weight.t()).transpose(1, 2)                     # (B, D_in, L); bias goes in the scan
        B = B.transpose(1, 2)                                              # (B, N, L)
        C = C.transpose(1, 2)
        A = -torch.exp(A_log.float())                                      # (D_in, N)
        scan = get_scan_fn(self.scan_backend)
        if self.scan_backend == "cuda":  # mamba-ssm's kernel wants contiguous inputs in its own dtype
            x, dt, B, C, z = (t.contiguous() for t in (x, dt, B, C, z))
        return scan(x, dt, A, B, C, D.float(), z=z, delta_bias=dt_proj.bias.float(), delta_softplus=True)

    def forward(self, hidden):
        """hidden: (B, L, d_model) -> (B, L, d_model)."""
        xz = self.in_proj(hidden).transpose(1, 2)                          # (B, 2*D_in, L)
        x, z = xz.chunk(2, dim=1)
        y_f = self._direction(x, z, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D)
        y_b = self._direction(x.flip(-1), z.flip(-1), self.conv1d_b, self.x_proj_b, self.dt_proj_b,
                              self.A_b_log, self.D_b)
        y = (y_f + y_b.flip(-1)) / 2                                       # (B, D_in, L)
        return self.out_proj(y.transpose(1, 2))


def _init_dt_proj(dt_proj, dt_rank, dt_min, dt_max, dt_init_floor):
    """Mamba's dt initialisation: softplus(bias) log-uniform in [dt_min, dt_max]."""
    std = dt_rank ** -0.5
    nn.init.uniform_(dt_proj.weight, -std, std)
    dt = torch.exp(torch.rand(dt_proj.out_features) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_init_floor)
    with torch.no_grad():
        dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus

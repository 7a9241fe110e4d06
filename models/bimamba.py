"""Vim's bidirectional "v2" Mamba mixer.

One in_proj and one out_proj serve both directions. The forward direction scans the tokens in order; the
backward direction has its own conv1d, x_proj, dt_proj, A and D and scans the flipped sequence (computed as an
anti-causal conv and a reverse scan, so that no activation is copied just to flip it). The two
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


def use_causal_conv1d(scan_backend, compiled):
    """Whether the mixer's convs go to the causal-conv1d package's kernel: only with mamba-ssm's scan ("cuda"; our
    Triton scan brings our Triton convs), when the package is installed, and not under torch.compile, which fuses our
    PyTorch conv (and its SiLU) with the ops around it and would break its graph at the package's kernel."""
    return scan_backend == "cuda" and not compiled and causal_conv1d_available()


def conv1d_silu(x, weight, bias, reverse=False):
    """Depthwise causal conv + SiLU over the tokens. x: (B, L, D), weight: (D, K), bias: (D,) -> (B, L, D).

    reverse=True is the anti-causal conv that Vim's backward direction applies (flip, causal conv, flip back), taken
    directly. Written as K shifted multiply-adds on the channels-last activations rather than F.conv1d, which wants
    them channels-first: no transposed copies, and torch.compile fuses it all (conv, bias, SiLU) into one kernel.
    """
    k, length = weight.shape[-1], x.shape[1]
    weight, bias = weight.to(x.dtype), bias.to(x.dtype)  # the activations' dtype, as F.conv1d under autocast
    if reverse:  # y_t = sum_j w_{K-1-j} x_{t+j}
        x, weight = F.pad(x, (0, 0, 0, k - 1)), weight.flip(-1)
    else:        # y_t = sum_j w_j x_{t-K+1+j}
        x = F.pad(x, (0, 0, k - 1, 0))
    y = bias + weight[:, 0] * x[:, :length]
    for j in range(1, k):
        y = y + weight[:, j] * x[:, j:j + length]
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

    def _conv(self, x, conv, reverse):
        """x: (B, L, D_in) -> (B, L, D_in)."""
        weight = conv.weight.squeeze(1)
        if self.use_causal_conv1d:  # the causal-conv1d package's kernel; it reads channels-last (B, D, L) views
            from causal_conv1d import causal_conv1d_fn
            if reverse:
                return causal_conv1d_fn(x.flip(1).transpose(1, 2), weight, conv.bias, activation="silu") \
                    .transpose(1, 2).flip(1)
            return causal_conv1d_fn(x.transpose(1, 2), weight, conv.bias, activation="silu").transpose(1, 2)
        return conv1d_silu(x, weight, conv.bias, reverse)

    def _convs(self, x):
        """Both directions' conv + SiLU and x_proj: x (B, L, D_in) -> (u_f, u_b, x_dbl_f, x_dbl_b), (B, L, D_in) and
        (B, L, R + 2N). With the Triton scan, one op does it all (models/conv_triton.py): its backward then gets u's
        two gradients (from the scan and from x_proj) apart and sums them in the conv kernel, not in a kernel of
        their own."""
        if self.scan_backend == "triton":
            from models.conv_triton import conv_pair_silu
            return conv_pair_silu(x, self.conv1d.weight.squeeze(1), self.conv1d.bias,
                                  self.conv1d_b.weight.squeeze(1), self.conv1d_b.bias, self.x_proj.weight,
                                  self.x_proj_b.weight)
        u_f, u_b = self._conv(x, self.conv1d, False), self._conv(x, self.conv1d_b, True)
        return u_f, u_b, self.x_proj(u_f), self.x_proj_b(u_b)

    def _scan_inputs(self, x, x_dbl, dt_proj, A_log, D):
        """One direction's scan inputs from x (the conv's output) and x_dbl (its x_proj), (B, L, *) -> (u, delta, A,
        B, C, D, delta_bias), the activations as (B, *, L) views: the Triton kernel reads them without copies."""
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = dt @ dt_proj.weight.t()                                       # (B, L, D_in); bias goes in the scan
        A = -torch.exp(A_log.float())                                      # (D_in, N)
        return (x.transpose(1, 2), dt.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), D.float(),
                dt_proj.bias.float())

    def _scans(self, inputs_f, inputs_b, z):
        """Both directions' scans over their _scan_inputs and the gate z (B, D_in, L) -> (y_f + y_b) / 2, (B, D_in, L).
        The backward direction (reverse) scans the tokens from last to first; its output comes back in the tokens'
        order. The mean is in the scans' epilogues: the second adds half its output to half the first's, so no
        separate kernel reads both and none halves the gradient (docs/SPEED.md). With the Triton scan both are one op
        (models/scan_triton.py's scan pair), whose backward sums the two directions' gradients of z in its second
        kernel, not in an add kernel of their own."""
        if self.scan_backend == "triton":
            from models.scan_triton import selective_scan_pair_triton
            return selective_scan_pair_triton(*inputs_f, *inputs_b, z, delta_softplus=True)
        scan = get_scan_fn(self.scan_backend)
        y = None
        for (u, dt, A, B, C, D, bias), reverse in ((inputs_f, False), (inputs_b, True)):
            y = scan(u, dt, A, B, C, D, z=z, delta_bias=bias, delta_softplus=True, reverse=reverse, out_scale=0.5,
                     out_add=y)
        return y

    def forward(self, hidden):
        """hidden: (B, L, d_model) -> (B, L, d_model)."""
        # x and z as two products, not one split in two: the backward then sums their input gradients in the
        # matrix multiplies instead of concatenating dx and dz into a copy first (docs/SPEED.md)
        w_x, w_z = self.in_proj.weight.chunk(2)
        x, z = F.linear(hidden, w_x), F.linear(hidden, w_z)                # (B, L, D_in) each
        u_f, u_b, x_dbl_f, x_dbl_b = self._convs(x)
        y = self._scans(self._scan_inputs(u_f, x_dbl_f, self.dt_proj, self.A_log, self.D),
                        self._scan_inputs(u_b, x_dbl_b, self.dt_proj_b, self.A_b_log, self.D_b), z.transpose(1, 2))
        return self.out_proj(y.transpose(1, 2))


def _init_dt_proj(dt_proj, dt_rank, dt_min, dt_max, dt_init_floor):
    """Mamba's dt initialisation: softplus(bias) log-uniform in [dt_min, dt_max]."""
    std = dt_rank ** -0.5
    nn.init.uniform_(dt_proj.weight, -std, std)
    dt = torch.exp(torch.rand(dt_proj.out_features) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_init_floor)
    with torch.no_grad():
        dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus

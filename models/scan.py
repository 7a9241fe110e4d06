"""The selective scan (Mamba's S6 recurrence) and the one place that picks its backend.

Every backend has the signature of mamba-ssm's ``selective_scan_fn``:

    u, delta, z: (B, D, L)    A: (D, N)    B, C: (B, N, L)    D, delta_bias: (D,)
    returns out: (B, D, L) in u's dtype

    delta <- softplus(delta + delta_bias)            (when delta_softplus)
    h_t    = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t       h: (B, D, N)
    y_t    = <C_t, h_t> + D * u_t
    out_t  = y_t * silu(z_t)                         (when z is given)
    out_t  = out_scale * out_t + out_add_t           (out_add optional, (B, D, L); our addition, not mamba-ssm's)

plus ``reverse``: scan from the last step to the first (the same as flipping every (B, *, L) input along L, scanning
and flipping the output back). Vim's backward direction uses it, and the mixer averages its two directions with the
epilogue: the second scan adds half its output to half the first's. With the triton backend the mixer makes the two
calls one op, ``models.scan_triton.selective_scan_pair_triton`` (its backward sums the directions' gradients of z in
its kernel); it has no place here, where every backend gives the one-direction scan above.

Backends: ``ref`` (pure PyTorch, runs anywhere), ``cuda`` (mamba-ssm's kernel) and ``triton`` (our kernel for short
sequences, ``models/scan_triton.py``). ``auto`` takes the fastest one that can run on the device: triton on CUDA (then
mamba-ssm, then ref), ref on the CPU.
"""
import importlib.util

import torch
import torch.nn.functional as F

SCAN_CHOICES = ("auto", "ref", "cuda", "triton")


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, reverse=False,
                       out_scale=1.0, out_add=None):
    """Pure-PyTorch selective scan in fp32; shapes as in the module docstring."""
    if reverse:
        return _flipped(selective_scan_ref, u, delta, A, B, C, D, z, delta_bias, delta_softplus, out_scale, out_add)
    dtype_in = u.dtype
    u, delta, A, B, C = u.float(), delta.float(), A.float(), B.float(), C.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    dA = torch.exp(delta.unsqueeze(-1) * A[:, None])                                 # (B, D, L, N)
    dBu = (delta * u).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(1)          # (B, D, L, N)
    h = torch.zeros_like(dA[:, :, 0])                                         # (B, D, N)
    states = []
    for t in range(u.shape[-1]):  # the recurrence is sequential in t; everything else is batched
        h = dA[:, :, t] * h + dBu[:, :, t]
        states.append(h)
    y = torch.einsum("bdln,bnl->bdl", torch.stack(states, dim=2), C)
    if D is not None:
        y = y + u * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    y = y * out_scale
    if out_add is not None:
        y = y + out_add.float()
    return y.to(dtype_in)


def _flipped(scan, u, delta, A, B, C, D, z, delta_bias, delta_softplus, out_scale, out_add):
    """A reverse scan from a forward one: flip the sequences, scan, flip back."""
    u, delta, B, C = (t.flip(-1) for t in (u, delta, B, C))
    z, out_add = (None if t is None else t.flip(-1) for t in (z, out_add))
    return scan(u, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                out_scale=out_scale, out_add=out_add).flip(-1)


def _mamba_ssm_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, reverse=False,
                    out_scale=1.0, out_add=None):
    """mamba-ssm's kernel, which wants contiguous inputs and scans forward only; out_scale and out_add are applied
    after it (it has no such epilogue)."""
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    if reverse:
        return _flipped(_mamba_ssm_scan, u, delta, A, B, C, D, z, delta_bias, delta_softplus, out_scale, out_add)
    u, delta, B, C = (t.contiguous() for t in (u, delta, B, C))
    z = None if z is None else z.contiguous()
    out = selective_scan_fn(u, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus)
    if out_scale != 1.0:
        out = out * out_scale
    return out if out_add is None else out + out_add


def mamba_ssm_available():
    return importlib.util.find_spec("mamba_ssm") is not None


def triton_scan_available():
    return importlib.util.find_spec("triton") is not None


def resolve_scan(name, device):
    """Turn ``--scan`` into a backend that runs on ``device``; asking for a missing one raises ValueError."""
    device = torch.device(device)
    if name not in SCAN_CHOICES:
        raise ValueError(f"--scan must be one of {', '.join(SCAN_CHOICES)}, got {name!r}")
    if name == "auto":  # measured (H100, batch 512, fwd+bwd): our Triton scan runs 6.7x faster than mamba-ssm's at
        # 65 tokens, 5.8x at 257 (docs/SPEED.md)
        if device.type != "cuda":
            return "ref"
        return "triton" if triton_scan_available() else "cuda" if mamba_ssm_available() else "ref"
    if name in ("cuda", "triton") and device.type != "cuda":
        raise ValueError(f"--scan {name} needs a CUDA device, but the run is on {device.type}")
    if name == "cuda" and not mamba_ssm_available():
        raise ValueError("--scan cuda needs mamba-ssm, which is not installed (pip install mamba-ssm "
                         "causal-conv1d --no-build-isolation), or use --scan ref")
    if name == "triton" and not triton_scan_available():
        raise ValueError(f"--scan {name} needs the triton package, which is not installed")
    return name


def get_scan_fn(backend):
    """The scan function of a resolved backend (see ``resolve_scan``)."""
    if backend == "ref":
        return selective_scan_ref
    if backend == "cuda":
        return _mamba_ssm_scan
    if backend == "triton":
        from models.scan_triton import selective_scan_triton
        return selective_scan_triton
    raise ValueError(f"unknown scan backend {backend!r}")

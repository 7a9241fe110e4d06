"""Vim's two depthwise convs + SiLU (one per scan direction) as one Triton kernel each way, for the mixer.

    x: (B, L, D), channels contiguous (in_proj's x product)             w_f, w_b: (D, K)    b_f, b_b: (D,)
    u_f[t] = silu(b_f + sum_j w_f[j] * x[t - (K-1) + j])     the forward direction's causal conv
    u_b[t] = silu(b_b + sum_j w_b[j] * x[t + (K-1) - j])     the backward direction's: flip, causal conv, flip back
    -> u_f, u_b: (B, L, D) contiguous, x's dtype; x is 0 outside the sequence; arithmetic is fp32

Written by hand because compiled PyTorch (``models.bimamba.conv1d_silu``, still the path without the Triton scan)
took about 4.1 ms a layer for the two convs where moving their bytes once takes about 0.5 ms (mamba_small, 257
tokens, batch 512, H100): it kept a padded copy of x per direction for the backward, which was eight kernels. Here the
forward reads x once and writes u_f and u_b; the backward reads x, du_f and du_b once, recomputes the
pre-activations, and writes dx (both directions' parts summed) and per-program sums of the weight and bias
gradients, which torch then sums. With both kernels the step ran 20-23% faster and its peak memory fell by 18%
(docs/SPEED.md, "The mixer's convs").

A program owns BLOCK_D channels of one batch element and walks the sequence ROWS tokens at a time, each row loaded
once, a group ahead of the group it computes; a tap's neighbours come from registers. A first version on 2-D tiles
loaded each input at every shift a tap needs, and each shifted load cost about a full read from memory.
"""
from typing import List, Optional

import torch
from torch import Tensor
import triton
import triton.language as tl

from models.scan_triton import _device

# Not tuned (no GPU time was left for a sweep): 8 rows keep 24 loads a lane in flight in the backward at 96 registers
# (54 in the forward, no spills, compiled for sm_90); 64 channels, one per lane, make 6,144 programs of two warps at
# mamba_small's 768 channels and batch 512.
ROWS = 8       # tokens a program loads together, one group ahead of the group it computes
BLOCK_D = 64   # channels per program (one per lane, two warps)


@triton.jit
def _rows(ptr, t0, L, s_l, offs_d, mask_d, R: tl.constexpr):
    """Rows t0 .. t0+R-1 of a (L, D) sequence as R channel vectors (as stored), 0 outside the sequence."""
    out = ()
    for r in tl.static_range(R):
        t = t0 + r
        out = out + (tl.load(ptr + t * s_l + offs_d, mask=mask_d & (t >= 0) & (t < L), other=0.0),)
    return out


@triton.jit
def _taps(w_ptr, offs_d, mask_d, K: tl.constexpr):
    """The K taps of the (D, K) weight as channel vectors, fp32."""
    w = ()
    for j in tl.static_range(K):
        w = w + (tl.load(w_ptr + offs_d * K + j, mask=mask_d, other=0.0).to(tl.float32),)
    return w


@triton.jit
def _window(carry, new, K: tl.constexpr, R: tl.constexpr):
    """carry (K-1 rows) followed by new (R rows, converted to fp32): one window of K-1+R rows."""
    w = carry
    for r in tl.static_range(R):
        w = w + (new[r].to(tl.float32),)
    return w


@triton.jit
def _tail(w, K: tl.constexpr, R: tl.constexpr):
    """The last K-1 rows of a window of K-1+R: the next window's carry."""
    out = ()
    for i in tl.static_range(K - 1):
        out = out + (w[R + i],)
    return out


@triton.jit
def _silu_grad(a):
    s = tl.sigmoid(a)
    return s * (1.0 + a * (1.0 - s))


@triton.jit
def _conv_fwd_kernel(x_ptr, wf_ptr, bf_ptr, wb_ptr, bb_ptr, uf_ptr, ub_ptr, L, Dim, s_xb, s_xl, s_ub, s_ul,
                     K: tl.constexpr, R: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program: BLOCK_D channels of one batch element, the sequence in groups of R tokens. Each x row is loaded
    once: group t0 .. t0+R-1 completes u_f there and u_b at t0-(K-1) .. t0+R-K (which needs x up to t0+R-1)."""
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < Dim
    pid_b = tl.program_id(1).to(tl.int64)
    x_ptr += pid_b * s_xb
    uf_ptr += pid_b * s_ub + offs_d
    ub_ptr += pid_b * s_ub + offs_d
    wf = _taps(wf_ptr, offs_d, mask_d, K)
    wb = _taps(wb_ptr, offs_d, mask_d, K)
    bf = tl.load(bf_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    bb = tl.load(bb_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    carry = ()  # x[t0-(K-1) .. t0-1]: zeros before the sequence
    for i in tl.static_range(K - 1):
        carry = carry + (tl.zeros((BLOCK_D,), tl.float32),)
    nxt = _rows(x_ptr, 0, L, s_xl, offs_d, mask_d, R)
    for t0 in range(0, L + K - 1, R):
        cur = nxt
        nxt = _rows(x_ptr, t0 + R, L, s_xl, offs_d, mask_d, R)
        w = _window(carry, cur, K, R)  # w[i] = x[t0-(K-1)+i]
        for r in tl.static_range(R):
            af = bf
            ab = bb
            for j in tl.static_range(K):
                af += wf[j] * w[r + j]              # x[t-(K-1)+j], t = t0+r
                ab += wb[j] * w[r + K - 1 - j]      # x[t+(K-1)-j], t = t0+r-(K-1)
            t = t0 + r
            tl.store(uf_ptr + t * s_ul, (af * tl.sigmoid(af)).to(uf_ptr.dtype.element_ty), mask=mask_d & (t < L))
            tb = t - (K - 1)
            tl.store(ub_ptr + tb * s_ul, (ab * tl.sigmoid(ab)).to(ub_ptr.dtype.element_ty),
                     mask=mask_d & (tb >= 0) & (tb < L))
        carry = _tail(w, K, R)


@triton.jit
def _conv_bwd_kernel(x_ptr, wf_ptr, bf_ptr, wb_ptr, bb_ptr, duf_ptr, dub_ptr, ef_ptr, eb_ptr, dx_ptr, dw_ptr, L, Dim,
                     s_xb, s_xl, s_fb, s_fl, s_bb, s_bl, s_dxb, s_dxl,
                     K: tl.constexpr, R: tl.constexpr, BLOCK_D: tl.constexpr, HAS_EXTRA: tl.constexpr):
    """One program: BLOCK_D channels of one batch element, the sequence in groups of R tokens, each input row
    loaded once. With g_f = du_f * silu'(a_f) and g_b likewise (a: the pre-activations, recomputed):
        dx[t]   = sum_s w_f[K-1-s] * g_f[t + s]  +  sum_s w_b[K-1-s] * g_b[t - s]        (s = 0 .. K-1)
        dw_f[j] = sum_t g_f[t] * x[t - (K-1) + j]      dw_b[j] = sum_t g_b[t] * x[t + (K-1) - j]
    Group t0 .. t0+R-1 computes g_f there and g_b at t0-(K-1) .. t0+R-K, and completes dx at t0-(K-1) .. t0+R-K.
    The weight and bias gradients' per-program sums go to dw_ptr as (B, 2, K + 1, D): taps, then bias. With
    HAS_EXTRA, u_f's and u_b's gradients come in two parts each, du and e (laid out alike), summed as they are used."""
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < Dim
    pid_b = tl.program_id(1).to(tl.int64)
    x_ptr += pid_b * s_xb
    duf_ptr += pid_b * s_fb
    dub_ptr += pid_b * s_bb
    ef_ptr += pid_b * s_fb
    eb_ptr += pid_b * s_bb
    dx_ptr += pid_b * s_dxb + offs_d
    wf = _taps(wf_ptr, offs_d, mask_d, K)
    wb = _taps(wb_ptr, offs_d, mask_d, K)
    bf = tl.load(bf_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    bb = tl.load(bb_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    zero = tl.zeros((BLOCK_D,), tl.float32)
    xc = ()   # x at t0-(K-1) .. t0-1
    gfc = ()  # g_f at t0-(K-1) .. t0-1
    gbc = ()  # g_b at t0-2(K-1) .. t0-K
    for i in tl.static_range(K - 1):
        xc = xc + (zero,)
        gfc = gfc + (zero,)
        gbc = gbc + (zero,)
    acc = ()  # sums of g_f * x (K taps), g_f, g_b * x (K taps), g_b
    for i in tl.static_range(2 * (K + 1)):
        acc = acc + (zero,)
    RE: tl.constexpr = R if HAS_EXTRA else 0  # rows of e loaded a group (none without it)
    nxt = (_rows(x_ptr, 0, L, s_xl, offs_d, mask_d, R), _rows(duf_ptr, 0, L, s_fl, offs_d, mask_d, R),
           _rows(dub_ptr, 1 - K, L, s_bl, offs_d, mask_d, R), _rows(ef_ptr, 0, L, s_fl, offs_d, mask_d, RE),
           _rows(eb_ptr, 1 - K, L, s_bl, offs_d, mask_d, RE))
    for t0 in range(0, L + K - 1, R):
        cur = nxt
        nxt = (_rows(x_ptr, t0 + R, L, s_xl, offs_d, mask_d, R),
               _rows(duf_ptr, t0 + R, L, s_fl, offs_d, mask_d, R),
               _rows(dub_ptr, t0 + R + 1 - K, L, s_bl, offs_d, mask_d, R),
               _rows(ef_ptr, t0 + R, L, s_fl, offs_d, mask_d, RE),
               _rows(eb_ptr, t0 + R + 1 - K, L, s_bl, offs_d, mask_d, RE))
        w = _window(xc, cur[0], K, R)  # w[i] = x[t0-(K-1)+i]
        gf = gfc
        gb = gbc
        nacc = acc
        for r in tl.static_range(R):
            af = bf  # a_f at t0+r: x[t0+r-(K-1)+j] = w[r+j]
            ab = bb  # a_b at t0+r-(K-1): x[t0+r-(K-1)+(K-1)-j] = w[r+K-1-j]
            for j in tl.static_range(K):
                af += wf[j] * w[r + j]
                ab += wb[j] * w[r + K - 1 - j]
            du_f = cur[1][r].to(tl.float32)
            du_b = cur[2][r].to(tl.float32)
            if HAS_EXTRA:
                du_f += cur[3][r].to(tl.float32)
                du_b += cur[4][r].to(tl.float32)
            g_f = du_f * _silu_grad(af)
            g_b = du_b * _silu_grad(ab)
            gf = gf + (g_f,)  # gf[i] = g_f at t0-(K-1)+i
            gb = gb + (g_b,)  # gb[i] = g_b at t0-2(K-1)+i
            upd = ()
            for j in tl.static_range(K):
                upd = upd + (nacc[j] + g_f * w[r + j],)
            upd = upd + (nacc[K] + g_f,)
            for j in tl.static_range(K):
                upd = upd + (nacc[K + 1 + j] + g_b * w[r + K - 1 - j],)
            nacc = upd + (nacc[2 * K + 1] + g_b,)
        acc = nacc
        for r in tl.static_range(R):  # dx at t = t0+r-(K-1): g_f at t+s = gf[r+s], g_b at t-s = gb[r+K-1-s]
            dx = zero
            for s in tl.static_range(K):
                dx += wf[K - 1 - s] * gf[r + s] + wb[K - 1 - s] * gb[r + K - 1 - s]
            t = t0 + r - (K - 1)
            tl.store(dx_ptr + t * s_dxl, dx.to(dx_ptr.dtype.element_ty), mask=mask_d & (t >= 0) & (t < L))
        xc = _tail(w, K, R)
        gfc = _tail(gf, K, R)
        gbc = _tail(gb, K, R)
    dw_ptr += pid_b * 2 * (K + 1) * Dim
    for i in tl.static_range(2 * (K + 1)):
        tl.store(dw_ptr + i * Dim + offs_d, acc[i], mask=mask_d)


def _channels_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _project(u, p):
    """u (B, L, D) @ p.T, p: (P, D) in u's dtype (as autocast would cast it) -> (B, L, P)."""
    Bsz, L, Dim = u.shape
    return (u.reshape(Bsz * L, Dim) @ p.to(u.dtype).t()).view(Bsz, L, p.shape[0])


@torch.library.custom_op("vim::conv_pair_fwd", mutates_args=())
def _conv_pair_fwd(x: Tensor, w_f: Tensor, b_f: Tensor, w_b: Tensor, b_b: Tensor, p_f: Optional[Tensor],
                   p_b: Optional[Tensor]) -> List[Tensor]:
    Bsz, L, Dim = x.shape
    u_f, u_b = (torch.empty(Bsz, L, Dim, dtype=x.dtype, device=x.device) for _ in range(2))
    with _device(x):
        _conv_fwd_kernel[(triton.cdiv(Dim, BLOCK_D), Bsz)](
            x, w_f, b_f, w_b, b_b, u_f, u_b, L, Dim, x.stride(0), x.stride(1), u_f.stride(0), u_f.stride(1),
            K=w_f.shape[1], R=ROWS, BLOCK_D=BLOCK_D, num_warps=BLOCK_D // 32)
    if p_f is None:
        return [u_f, u_b]
    return [u_f, u_b, _project(u_f, p_f), _project(u_b, p_b)]


@_conv_pair_fwd.register_fake
def _(x, w_f, b_f, w_b, b_b, p_f, p_b):
    out = [torch.empty(x.shape, dtype=x.dtype, device=x.device) for _ in range(2)]
    if p_f is None:
        return out
    return out + [x.new_empty(*x.shape[:2], p.shape[0]) for p in (p_f, p_b)]


def _conv_pair_backward(du_f, du_b, e_f, e_b, x, w_f, b_f, w_b, b_b):
    """-> dx, and the weights' and biases' gradients as per-batch sums (B, 2, K + 1, D) fp32, which _backward
    finishes. e_f, e_b: u's second gradients (from the projections), which the kernel adds to du_f's and du_b's."""
    Bsz, L, Dim = x.shape
    K = w_f.shape[1]
    extra = e_f is not None
    if not extra:
        du_f, du_b = _channels_contiguous(du_f), _channels_contiguous(du_b)
        e_f = e_b = du_f  # (unread)
    else:  # the kernel reads e with du's strides
        du_f, du_b, e_f, e_b = (t.contiguous() for t in (du_f, du_b, e_f, e_b))
    dx = torch.empty(Bsz, L, Dim, dtype=x.dtype, device=x.device)
    dw = torch.empty(Bsz, 2, K + 1, Dim, dtype=torch.float32, device=x.device)
    with _device(x):
        _conv_bwd_kernel[(triton.cdiv(Dim, BLOCK_D), Bsz)](
            x, w_f, b_f, w_b, b_b, du_f, du_b, e_f, e_b, dx, dw, L, Dim, x.stride(0), x.stride(1), du_f.stride(0),
            du_f.stride(1), du_b.stride(0), du_b.stride(1), dx.stride(0), dx.stride(1),
            K=K, R=ROWS, BLOCK_D=BLOCK_D, HAS_EXTRA=extra, num_warps=BLOCK_D // 32)
    return [dx, dw]


@torch.library.custom_op("vim::conv_pair_bwd", mutates_args=())
def _conv_pair_bwd(du_f: Tensor, du_b: Tensor, e_f: Optional[Tensor], e_b: Optional[Tensor], x: Tensor,
                   w_f: Tensor, b_f: Tensor, w_b: Tensor, b_b: Tensor) -> List[Tensor]:
    return _conv_pair_backward(du_f, du_b, e_f, e_b, x, w_f, b_f, w_b, b_b)


@_conv_pair_bwd.register_fake
def _(du_f, du_b, e_f, e_b, x, w_f, b_f, w_b, b_b):
    return [torch.empty(x.shape, dtype=x.dtype, device=x.device),
            x.new_empty(x.shape[0], 2, w_f.shape[1] + 1, x.shape[2], dtype=torch.float32)]


def _setup_context(ctx, inputs, output):
    x, w_f, b_f, w_b, b_b, p_f, p_b = inputs
    ctx.projected = p_f is not None
    ctx.save_for_backward(x, w_f, b_f, w_b, b_b, p_f, p_b, *(output[:2] if ctx.projected else (None, None)))


def _backward(ctx, grads):
    """The op's gradients. The projections' products and the finishing sums, slices and casts are plain torch ops
    here, outside the custom op, so that torch.compile traces them into the backward graph and fuses them; run
    eagerly inside the op they were 9 launches besides the kernel and the products (docs/SPEED.md)."""
    x, w_f, b_f, w_b, b_b, p_f, p_b, u_f, u_b = ctx.saved_tensors
    Bsz, L, Dim = x.shape
    K = w_f.shape[1]
    du_f, du_b = (torch.zeros_like(x) if g is None else g for g in grads[:2])
    e_f = e_b = None
    grads_p = (None, None)
    if ctx.projected:  # dq: the products' gradients; u's from them (e) goes to the kernel, which adds it to du's
        dq_f, dq_b = (x.new_zeros(*x.shape[:2], p.shape[0]) if g is None else g for g, p in zip(grads[2:], (p_f, p_b)))
        e_f, e_b = (_project(dq, p.t()) for dq, p in ((dq_f, p_f), (dq_b, p_b)))
        grads_p = [(dq.reshape(Bsz * L, -1).t() @ u.reshape(Bsz * L, Dim)).to(p.dtype)
                   for dq, u, p in ((dq_f, u_f, p_f), (dq_b, u_b, p_b))]
    dx, dw = _conv_pair_bwd(du_f, du_b, e_f, e_b, x, w_f, b_f, w_b, b_b)
    dw = dw.sum(0)  # (2, K + 1, D)
    return (dx, dw[0, :K].t().contiguous().to(w_f.dtype), dw[0, K].to(b_f.dtype),
            dw[1, :K].t().contiguous().to(w_b.dtype), dw[1, K].to(b_b.dtype), *grads_p)


_conv_pair_fwd.register_autograd(_backward, setup_context=_setup_context)


def conv_pair_silu(x, w_f, b_f, w_b, b_b, p_f=None, p_b=None):
    """(u_f, u_b) of the module docstring, differentiable w.r.t. x, the weights and the biases. x: (B, L, D) with
    contiguous channels (else copied), w_f, w_b: (D, K), b_f, b_b: (D,). With p_f, p_b (P, D) (x_proj's weights):
    (u_f, u_b, u_f @ p_f.T, u_b @ p_b.T), the products in x's dtype. Then the backward receives u's gradients from
    the scan and from the product apart, and the conv kernel sums them as it reads them: no kernel of their own."""
    Bsz, L, Dim = x.shape
    K = w_f.shape[-1]
    if w_f.shape != (Dim, K) or w_b.shape != (Dim, K) or b_f.shape != (Dim,) or b_b.shape != (Dim,):
        raise ValueError(f"weights must be ({Dim}, K) and biases ({Dim},), got {tuple(w_f.shape)}, "
                         f"{tuple(w_b.shape)}, {tuple(b_f.shape)}, {tuple(b_b.shape)}")
    if Bsz > 65535:  # the batch is the second grid axis
        raise ValueError(f"batch {Bsz} is above 65535; split it")
    if (p_f is None) != (p_b is None) or (p_f is not None and (p_f.shape[1] != Dim or p_b.shape != p_f.shape)):
        raise ValueError(f"projections must both be given, (P, {Dim}) each")
    if p_f is not None:  # cast here, where torch.compile fuses the casts, not in the op (as autocast casts them)
        p_f, p_b = p_f.to(x.dtype), p_b.to(x.dtype)
    return tuple(_conv_pair_fwd(_channels_contiguous(x), w_f.contiguous(), b_f, w_b.contiguous(), b_b, p_f, p_b))

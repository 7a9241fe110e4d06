"""The first Triton selective scan (``--scan triton_v1``), kept to compare against ``models/scan_triton.py``.

A (states x channels) tile per program, one-step backward chunks with every state stored to an fp32 scratch.

Same signature and semantics as ``models.scan.selective_scan_ref`` (and mamba-ssm's ``selective_scan_fn``):

    u, delta, z: (B, D, L)    A: (D, N)    B, C: (B, N, L)    D, delta_bias: (D,)    ->  out: (B, D, L), u's dtype

    delta <- softplus(delta + delta_bias)                      (delta_bias / softplus optional)
    h_t    = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t  h: (B, D, N), h_{-1} = 0
    y_t    = <C_t, h_t> + D * u_t
    out_t  = y_t * silu(z_t)                                   (when z is given)

Inputs may be fp32, fp16 or bf16, with any strides (the model passes (B, L, D)-contiguous tensors as
``.transpose(1, 2)`` views, and then a time step of a channel block is one contiguous load). Arithmetic is fp32.

Work split. One program owns one batch element and a block of channels and walks the sequence one step at a time,
BLOCK_L steps per loop iteration (unrolled, so the loads of those steps are in flight together). The state of the
block, an (N, channels) fp32 tile, stays in registers; nothing of size B*D*L*N is written to memory.

Backward, per program, with nothing saved by the forward but its inputs:
  pass 1  runs the recurrence forward and writes the state at the end of every chunk of BLOCK_L steps to an fp32
          scratch of B*D*N*(L/BLOCK_L) values (32x the bytes of a bf16 (B, D, L) tensor at BLOCK_L = 1, N = 16), freed
          when the backward returns;
  pass 2  walks the chunks from last to first. It recomputes the chunk's states from the saved boundary state, keeping
          them in registers, then steps back through the chunk with the adjoint state
              g_t = dL/dh_t = C_t*dy_t + a_{t+1}*g_{t+1},      a_t = exp(delta_t*A),  dy = dout*silu(z)
          and accumulates
              ddelta_t = sum_n g_t*(A*a_t*h_{t-1} + u_t*B_t)    du_t = D*dy_t + delta_t * sum_n g_t*B_t
              dA      += sum_t delta_t*g_t*a_t*h_{t-1}          dB_t = sum_d g_t*delta_t*u_t
              dC_t     = sum_d dy_t*h_t                         dD  += sum_t dy_t*u_t
          dB and dC sum over channel blocks (fp32 atomics, or with DBC_PARTIALS one slot per block that torch sums);
          dA, dD and d(delta_bias) are per-batch partials that torch sums afterwards.
  SUPER > 1 (a switch; 6% slower in a mamba_small step at batch 512 with SUPER=2): pass 1 keeps the state only at
          the end of every group of SUPER chunks, and pass 2, on reaching a group, recomputes its chunks' start
          states into SUPER slots of its own, read back soon after (likely from cache). At one-step chunks the
          boundary states move about 5x the bytes of the real (bf16) inputs and outputs, all through HBM; with
          groups SUPER times fewer go there, for one more recomputation.
  PREFETCH (a switch for one-step chunks; the narrow shape): both passes issue the next step's loads (and pass 2 the next
          start state) before working on the current step, whose loads the previous step issued, so a step does
          not wait for memory; pass 2 also reuses the recomputed exp(delta*A) for the way back. It keeps a step's
          loads and its exp(delta*A) by construction, so CACHE_STEP and CACHE_DECAY change nothing beside it.

Registers. The state tile is (N, BLOCK_D) fp32, spread over one warp's lanes and registers (see FWD_CONFIG); sums over
n (y, ddelta, du) and over channels (dB, dC) are in-thread adds plus a few shuffles. The backward keeps the BLOCK_L+1
states of a chunk in registers (a tuple; the loop over the chunk's steps is unrolled) and recomputes exp(delta_t*A) on
the way back rather than keeping it: the exp unit has room there, the register file has not.
"""
import contextlib
from typing import List, Optional

import torch
from torch import Tensor
import triton
import triton.language as tl

# Launch shapes; a benchmark may overwrite these. A program covers BLOCK_D channels and runs BLOCK_L steps per loop
# iteration; the backward's chunks, and so its scratch of boundary states (1/BLOCK_L of all states, fp32), are BLOCK_L
# steps long. Triton derives the register layout from the coalesced load of the (N, BLOCK_D) tile of A: consecutive
# channels per thread, lanes over the rest of the channels and then over the states, so sums over either axis are
# mostly in-thread; more warps would split the states across warps (sums through shared memory).
# Chosen by `python tools/benchmark.py --scan_sweep --batch_sizes 128 1024` on an H200 (D=768, N=16, 65 tokens, bf16,
# both directions; docs/results/scan_sweep_cache.log). At batch 1024: forward 1.18 ms at (64, 4, 1 warp) against 1.23
# at (32, 4, 1); backward 7.12 ms at (64, 1, 1) with CACHE_STEP, 7.14 without, 7.91 at (64, 2, 1), 7.27 at (32, 1, 1).
# The 64-channel backward uses all 255 registers a thread may have and spills (14 values at BLOCK_L 1, 76 at 2, 204
# at 4): longer chunks keep more recomputed states live and lose more than their overlapped loads win back. Wide
# blocks need many programs to fill the GPU: at batch 128 the (32, ...) shapes took 1.92 ms forward + backward and
# the (64, ...) ones 2.76 ms, so a launch with fewer than WIDE_MIN_PROGRAMS_PER_SM programs of 64 channels per SM
# takes the *_NARROW shapes (batch 512 and below for D=768 on 132 SMs). At batch 128 the sweep found the backward at
# (32, 2, 1) with both caches 1.76 ms against 1.87 for the narrow shape below, and the forward at (32, 4, 1) 0.23 ms
# against 0.27; but a mamba_small training step at batch 512 (compiled) with those two ran at 3,259 images/s against
# 3,585 with the shapes then in use (measured on another machine). A step-level A/B back to back (eager, batch 512,
# conv stem) then gave 2,068 images/s with the narrow backward at (32, 4, 1), 2,283 at (32, 1, 1) and 2,305 at
# (32, 1, 1) with PREFETCH (1,947 at 16 channels with PREFETCH): the narrow backward below.
FWD_CONFIG = dict(BLOCK_D=64, BLOCK_L=4, num_warps=1)
BWD_CONFIG = dict(BLOCK_D=64, BLOCK_L=1, num_warps=1, CACHE_STEP=True)
FWD_CONFIG_NARROW = dict(BLOCK_D=32, BLOCK_L=8, num_warps=1)
BWD_CONFIG_NARROW = dict(BLOCK_D=32, BLOCK_L=1, num_warps=1, PREFETCH=True)
BWD_FLAGS = dict(CACHE_STEP=False, CACHE_DECAY=False, DBC_PARTIALS=False, SUPER=1, PREFETCH=False)  # when left out
WIDE_MIN_PROGRAMS_PER_SM = 48
LAST_LAUNCH = {}  # "fwd" / "bwd" -> registers per thread and spills of the last compiled launch
LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E)


@triton.jit
def _load(ptr, offs, mask):
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _position(t, L, REVERSE: tl.constexpr):
    """Where the scan's t-th step lies in memory: t, or L-1-t when the sequence is scanned from its end."""
    if REVERSE:
        return L - 1 - t
    return t


@triton.jit
def _softplus(x):
    # log1p(exp(x)) as log(w) * e / (w - 1), accurate when exp(x) is tiny; linear above 20 like F.softplus
    e = tl.exp(x)
    w = 1.0 + e
    lp = tl.where(w == 1.0, e, tl.log(w) * e / (w - 1.0))
    return tl.where(x > 20.0, x, lp)


@triton.jit
def _load_delta(ptr, offs, mask, bias, SOFTPLUS: tl.constexpr):
    """(delta, delta + bias before softplus) of one step; delta is 0 where masked, so padding leaves the state alone."""
    raw = _load(ptr, offs, mask) + bias
    dt = raw
    if SOFTPLUS:
        dt = _softplus(raw)
    return tl.where(mask, dt, 0.0), raw


@triton.jit
def _program_setup(A_ptr, D_ptr, bias_ptr, offs_d, offs_n, mask_d, mask_nd, s_Ad, s_An,
                   u_ptr, dt_ptr, B_ptr, C_ptr, z_ptr, o_ptr, pid_b, s_ub, s_tb, s_Bb, s_Cb, s_zb, s_ob,
                   HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr):
    """What both kernels start with: this program's (BLOCK_N, BLOCK_D) tile of A (padded (state, channel) pairs get
    A = 0, and B = C = 0 from their masked loads, so their state stays 0), its channels' delta_bias and D (0.0 when
    absent), and the input pointers (and out / dout) moved to its batch element."""
    A = _load(A_ptr, offs_n[:, None] * s_An + offs_d[None, :] * s_Ad, mask_nd)
    bias = 0.0
    if HAS_BIAS:
        bias = _load(bias_ptr, offs_d, mask_d)
    Dv = 0.0
    if HAS_D:
        Dv = _load(D_ptr, offs_d, mask_d)
    return (A, bias, Dv, u_ptr + pid_b * s_ub, dt_ptr + pid_b * s_tb, B_ptr + pid_b * s_Bb, C_ptr + pid_b * s_Cb,
            z_ptr + pid_b * s_zb, o_ptr + pid_b * s_ob)


@triton.jit
def _advance(h, A, u_ptr, dt_ptr, B_ptr, p, offs_d, offs_n, s_ul, s_ud, s_tl, s_td, s_Bl, s_Bn, mask_d, mask_n, bias,
             SOFTPLUS: tl.constexpr):
    """The backward's recomputation of h_t from h_{t-1}, t at memory position p inside the sequence."""
    u = _load(u_ptr, p * s_ul + offs_d * s_ud, mask_d)
    dt, _ = _load_delta(dt_ptr, p * s_tl + offs_d * s_td, mask_d, bias, SOFTPLUS)
    Bt = _load(B_ptr, p * s_Bl + offs_n * s_Bn, mask_n)
    return tl.exp2((dt * LOG2E)[None, :] * A) * h + Bt[:, None] * (dt * u)[None, :]


@triton.jit
def _fwd_kernel(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr,
                Dim, L, N,
                s_ub, s_ud, s_ul, s_tb, s_td, s_tl, s_Ad, s_An, s_Bb, s_Bn, s_Bl, s_Cb, s_Cn, s_Cl,
                s_zb, s_zd, s_zl, s_ob, s_od, s_ol,
                HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                REVERSE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_b = tl.program_id(1).to(tl.int64)  # 64-bit batch offsets: B*L*D can pass 2**31
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < Dim
    mask_n = offs_n < N
    A, bias, Dv, u_ptr, dt_ptr, B_ptr, C_ptr, z_ptr, out_ptr = _program_setup(
        A_ptr, D_ptr, bias_ptr, offs_d, offs_n, mask_d, mask_n[:, None] & mask_d[None, :], s_Ad, s_An,
        u_ptr, dt_ptr, B_ptr, C_ptr, z_ptr, out_ptr, pid_b, s_ub, s_tb, s_Bb, s_Cb, s_zb, s_ob, HAS_D, HAS_BIAS)

    h = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for l0 in range(0, L, BLOCK_L):
        for k in tl.static_range(BLOCK_L):  # unrolled so that the loads of BLOCK_L steps are in flight together
            t = l0 + k
            p = _position(t, L, REVERSE)
            m_d = mask_d & (t < L)
            m_n = mask_n & (t < L)
            u = _load(u_ptr, p * s_ul + offs_d * s_ud, m_d)
            dt, _ = _load_delta(dt_ptr, p * s_tl + offs_d * s_td, m_d, bias, SOFTPLUS)
            Bt = _load(B_ptr, p * s_Bl + offs_n * s_Bn, m_n)
            Ct = _load(C_ptr, p * s_Cl + offs_n * s_Cn, m_n)
            h = tl.exp2((dt * LOG2E)[None, :] * A) * h + Bt[:, None] * (dt * u)[None, :]
            y = tl.sum(h * Ct[:, None], axis=0)
            if HAS_D:
                y += Dv * u
            if HAS_Z:
                z = _load(z_ptr, p * s_zl + offs_d * s_zd, m_d)
                y = y * z * tl.sigmoid(z)
            tl.store(out_ptr + p * s_ol + offs_d * s_od, y.to(out_ptr.dtype.element_ty), mask=m_d)


@triton.jit
def _load_raw(ptr, offs, mask):
    """A load left in its stored dtype: nothing uses it before the next step, so its latency hides behind this one."""
    return tl.load(ptr + offs, mask=mask, other=0.0)


@triton.jit
def _load_step_raw(u_ptr, dt_ptr, B_ptr, C_ptr, dout_ptr, z_ptr, p, offs_d, offs_n, mask_d, mask_n, s_ul, s_ud, s_tl,
                   s_td, s_Bl, s_Bn, s_Cl, s_Cn, s_ol, s_od, s_zl, s_zd, HAS_Z: tl.constexpr):
    """What the way back reads of one step (memory position p), left in its stored dtypes: u, delta (before bias and
    softplus), B, C, dout and z (dout again when there is no z)."""
    dy = _load_raw(dout_ptr, p * s_ol + offs_d * s_od, mask_d)
    z = dy
    if HAS_Z:
        z = _load_raw(z_ptr, p * s_zl + offs_d * s_zd, mask_d)
    return (_load_raw(u_ptr, p * s_ul + offs_d * s_ud, mask_d), _load_raw(dt_ptr, p * s_tl + offs_d * s_td, mask_d),
            _load_raw(B_ptr, p * s_Bl + offs_n * s_Bn, mask_n), _load_raw(C_ptr, p * s_Cl + offs_n * s_Cn, mask_n),
            dy, z)


@triton.jit
def _advance_raw(h, A, u, dt_raw, Bt, mask_d, bias, SOFTPLUS: tl.constexpr):
    """-> (h_t, exp(delta_t*A), u_t, delta_t, delta_t + bias, B_t), fp32, from h_{t-1} and the step's raw loads.
    The same recurrence as _advance, kept apart: built on this, _advance compiles to other code for the timed shapes."""
    u = u.to(tl.float32)
    raw = dt_raw.to(tl.float32) + bias
    dt = raw
    if SOFTPLUS:
        dt = _softplus(raw)
    dt = tl.where(mask_d, dt, 0.0)
    Bt = Bt.to(tl.float32)
    a = tl.exp2((dt * LOG2E)[None, :] * A)
    return a * h + Bt[:, None] * (dt * u)[None, :], a, u, dt, raw, Bt


@triton.jit
def _step_back(u, dt, dt_raw, Bt, Ct, dy, z, a, h_prev, h_cur, q, dA_acc, dD_acc, dbias_acc, A, Dv, p, m_d, m_n,
               offs_d, offs_n, N, du_ptr, ddt_ptr, dz_ptr, dB_ptr, dC_ptr, s_dul, s_dud, s_dtl, s_dtd, s_dzl, s_dzd,
               HAS_D: tl.constexpr, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr, HAVE_DECAY: tl.constexpr,
               DBC_PARTIALS: tl.constexpr):
    """The backward's step back through step t (memory position p), from its loaded inputs (fp32) and its states
    h_{t-1} (h_prev) and h_t (h_cur): stores du, ddelta and dz of the step, adds its dB and dC, and returns
    (q = a_t*g_t for step t-1, and the dA, dD and delta_bias sums). a is exp(delta_t*A) when HAVE_DECAY, else unused
    and recomputed here."""
    if HAS_Z:
        y = tl.sum(h_cur * Ct[:, None], axis=0) + Dv * u
        sz = tl.sigmoid(z)
        dz = dy * y * sz * (1.0 + z * (1.0 - sz))
        tl.store(dz_ptr + p * s_dzl + offs_d * s_dzd, dz.to(dz_ptr.dtype.element_ty), mask=m_d)
        dy = dy * z * sz
    g = Ct[:, None] * dy[None, :] + q                 # g_t = C_t*dy_t + a_{t+1}*g_{t+1}
    if not HAVE_DECAY:
        a = tl.exp2((dt * LOG2E)[None, :] * A)
    q = a * g                                         # a_t*g_t, passed back to step t-1
    ghb = q * h_prev                                  # g_t * a_t * h_{t-1}
    dA_acc += ghb * dt[None, :]
    gB = tl.sum(g * Bt[:, None], axis=0)
    ddt = tl.sum(ghb * A, axis=0) + u * gB
    du = dt * gB + Dv * dy
    if HAS_D:
        dD_acc += dy * u
    if SOFTPLUS:
        ddt = ddt * tl.sigmoid(dt_raw)               # softplus'(x) = sigmoid(x) (and 1 above 20)
    ddt = tl.where(m_d, ddt, 0.0)
    dbias_acc += ddt
    tl.store(du_ptr + p * s_dul + offs_d * s_dud, du.to(du_ptr.dtype.element_ty), mask=m_d)
    tl.store(ddt_ptr + p * s_dtl + offs_d * s_dtd, ddt.to(ddt_ptr.dtype.element_ty), mask=m_d)
    # sums over this program's channels, stored in its own slot or added to the entries that the other channel
    # blocks add into (same-address atomics from D/BLOCK_D programs)
    dB_t = tl.sum(g * (dt * u)[None, :], axis=1)
    dC_t = tl.sum(h_cur * dy[None, :], axis=1)
    if DBC_PARTIALS:
        tl.store(dB_ptr + p * N + offs_n, dB_t, mask=m_n)
        tl.store(dC_ptr + p * N + offs_n, dC_t, mask=m_n)
    else:
        tl.atomic_add(dB_ptr + p * N + offs_n, dB_t, mask=m_n, sem="relaxed")
        tl.atomic_add(dC_ptr + p * N + offs_n, dC_t, mask=m_n, sem="relaxed")
    return q, dA_acc, dD_acc, dbias_acc


@triton.jit
def _bwd_kernel(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr,
                du_ptr, ddt_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, ck_ptr,
                Dim, L, N,
                s_ub, s_ud, s_ul, s_tb, s_td, s_tl, s_Ad, s_An, s_Bb, s_Bn, s_Bl, s_Cb, s_Cn, s_Cl,
                s_zb, s_zd, s_zl, s_ob, s_od, s_ol,
                s_dub, s_dud, s_dul, s_dtb, s_dtd, s_dtl, s_dzb, s_dzd, s_dzl,
                HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                REVERSE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr,
                CACHE_STEP: tl.constexpr, CACHE_DECAY: tl.constexpr, DBC_PARTIALS: tl.constexpr,
                SUPER: tl.constexpr, PREFETCH: tl.constexpr):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < Dim
    mask_n = offs_n < N
    mask_nd = mask_n[:, None] & mask_d[None, :]
    A, bias, Dv, u_ptr, dt_ptr, B_ptr, C_ptr, z_ptr, dout_ptr = _program_setup(
        A_ptr, D_ptr, bias_ptr, offs_d, offs_n, mask_d, mask_nd, s_Ad, s_An,
        u_ptr, dt_ptr, B_ptr, C_ptr, z_ptr, dout_ptr, pid_b, s_ub, s_tb, s_Bb, s_Cb, s_zb, s_ob, HAS_D, HAS_BIAS)
    du_ptr += pid_b * s_dub
    ddt_ptr += pid_b * s_dtb
    dz_ptr += pid_b * s_dzb
    if DBC_PARTIALS:  # dB, dC: fp32 (B, channel blocks, L, N) buffers, one slot per program, summed by torch
        dB_ptr += (pid_b * tl.num_programs(0) + pid_d) * L * N
        dC_ptr += (pid_b * tl.num_programs(0) + pid_d) * L * N
    else:  # fp32 (B, L, N) buffers that all channel blocks of a batch element add into
        dB_ptr += pid_b * L * N
        dC_ptr += pid_b * L * N
    n_chunks = tl.cdiv(L, BLOCK_L)
    n_super = tl.cdiv(n_chunks, SUPER)  # groups of SUPER chunks
    TILE: tl.constexpr = BLOCK_N * BLOCK_D
    # This program's scratch, one (BLOCK_N, BLOCK_D) tile per slot: the state at the end of every group but the last
    # (n_super-1 slots), then, with SUPER > 1, the start states of the group being worked on (SUPER slots).
    ck_tile = offs_n[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
    ck_ptr += (pid_b * tl.num_programs(0) + pid_d) * (n_super - 1 + (SUPER if SUPER > 1 else 0)) * TILE
    group_ptr = ck_ptr + (n_super - 1) * TILE

    # Pass 1: group-boundary states (every step of these groups is inside the sequence).
    h = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    if PREFETCH:  # one-step chunks, no groups: step s+1's loads are issued before step s is computed
        p = _position(0, L, REVERSE)
        nu = _load_raw(u_ptr, p * s_ul + offs_d * s_ud, mask_d)
        ndt = _load_raw(dt_ptr, p * s_tl + offs_d * s_td, mask_d)
        nB = _load_raw(B_ptr, p * s_Bl + offs_n * s_Bn, mask_n)
        for s in range(0, n_chunks - 1):
            cu, cdt, cB = nu, ndt, nB
            p = _position(s + 1, L, REVERSE)
            nu = _load_raw(u_ptr, p * s_ul + offs_d * s_ud, mask_d)
            ndt = _load_raw(dt_ptr, p * s_tl + offs_d * s_td, mask_d)
            nB = _load_raw(B_ptr, p * s_Bl + offs_n * s_Bn, mask_n)
            h, _, _, _, _, _ = _advance_raw(h, A, cu, cdt, cB, mask_d, bias, SOFTPLUS)
            tl.store(ck_ptr + s * TILE + ck_tile, h)
    else:
        for s in range(0, n_super - 1):
            for j in range(0, SUPER):
                for k in tl.static_range(BLOCK_L):
                    p = _position((s * SUPER + j) * BLOCK_L + k, L, REVERSE)
                    h = _advance(h, A, u_ptr, dt_ptr, B_ptr, p, offs_d, offs_n, s_ul, s_ud, s_tl, s_td, s_Bl, s_Bn,
                                 mask_d, mask_n, bias, SOFTPLUS)
            tl.store(ck_ptr + s * TILE + ck_tile, h)

    # Pass 2: chunks from last to first.
    q = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)  # a_{t+1}*g_{t+1}; across chunks, t+1 = first step of the later one
    dA_acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), tl.float32)
    if PREFETCH:  # one-step chunks: step t-1's loads (and its start state) are issued before step t is worked on
        nu, ndt, nB, nC, ndy, nz = _load_step_raw(
            u_ptr, dt_ptr, B_ptr, C_ptr, dout_ptr, z_ptr, _position(L - 1, L, REVERSE), offs_d, offs_n, mask_d, mask_n,
            s_ul, s_ud, s_tl, s_td, s_Bl, s_Bn, s_Cl, s_Cn, s_ol, s_od, s_zl, s_zd, HAS_Z)
        nh = tl.load(ck_ptr + tl.maximum(L - 2, 0) * TILE + ck_tile, mask=mask_nd & (L > 1), other=0.0)
        for i in range(0, L):
            t = L - 1 - i
            p = _position(t, L, REVERSE)
            cu, cdt, cB, cC, cdy, cz, h = nu, ndt, nB, nC, ndy, nz, nh
            tn = tl.maximum(t - 1, 0)  # the step worked on next (after step 0: step 0 again, loaded and unused)
            nu, ndt, nB, nC, ndy, nz = _load_step_raw(
                u_ptr, dt_ptr, B_ptr, C_ptr, dout_ptr, z_ptr, _position(tn, L, REVERSE), offs_d, offs_n, mask_d,
                mask_n, s_ul, s_ud, s_tl, s_td, s_Bl, s_Bn, s_Cl, s_Cn, s_ol, s_od, s_zl, s_zd, HAS_Z)
            nh = tl.load(ck_ptr + tl.maximum(tn - 1, 0) * TILE + ck_tile, mask=mask_nd & (tn > 0), other=0.0)
            h_cur, a, u, dt, dt_raw, Bt = _advance_raw(h, A, cu, cdt, cB, mask_d, bias, SOFTPLUS)
            q, dA_acc, dD_acc, dbias_acc = _step_back(
                u, dt, dt_raw, Bt, cC.to(tl.float32), cdy.to(tl.float32), cz.to(tl.float32), a, h, h_cur, q,
                dA_acc, dD_acc, dbias_acc, A, Dv, p, mask_d, mask_n, offs_d, offs_n, N, du_ptr, ddt_ptr, dz_ptr,
                dB_ptr, dC_ptr, s_dul, s_dud, s_dtl, s_dtd, s_dzl, s_dzd, HAS_D, HAS_Z, SOFTPLUS, True, DBC_PARTIALS)
    else:
        for i in range(0, n_chunks):
            c = n_chunks - 1 - i
            s = c // SUPER
            j = c - s * SUPER
            if SUPER == 1:
                h = tl.load(ck_ptr + tl.maximum(s - 1, 0) * TILE + ck_tile, mask=mask_nd & (s > 0), other=0.0)
            else:
                if j == tl.minimum(SUPER, n_chunks - s * SUPER) - 1:  # the group's last chunk: a new group begins
                    # From the group's start state, recompute the start state of each of its chunks into this program's
                    # group slots: the boundary states in HBM are SUPER times fewer, these few are re-read soon after.
                    h = tl.load(ck_ptr + tl.maximum(s - 1, 0) * TILE + ck_tile, mask=mask_nd & (s > 0), other=0.0)
                    tl.store(group_ptr + ck_tile, h)
                    for jj in range(0, j):
                        for k in tl.static_range(BLOCK_L):
                            p = _position((s * SUPER + jj) * BLOCK_L + k, L, REVERSE)
                            h = _advance(h, A, u_ptr, dt_ptr, B_ptr, p, offs_d, offs_n, s_ul, s_ud, s_tl, s_td, s_Bl,
                                         s_Bn, mask_d, mask_n, bias, SOFTPLUS)
                        tl.store(group_ptr + (jj + 1) * TILE + ck_tile, h)
                h = tl.load(group_ptr + j * TILE + ck_tile)
            # Recompute the chunk's states: h_cur[k] = h_t and h_prev[k] = h_{t-1} for its k-th step t (the same
            # values, shifted: the tuples cost no registers twice, and indices stay plain loop constants).
            # With CACHE_STEP the step's loaded vectors (u, delta, B) are kept for the way back too, and with
            # CACHE_DECAY its exp(delta_t*A) tile: fewer loads and exponentials against more live registers
            # (--scan_sweep times both).
            h_prev = ()
            h_cur = ()
            steps = ()
            decays = ()
            for k in tl.static_range(BLOCK_L):
                t = c * BLOCK_L + k
                p = _position(t, L, REVERSE)
                m_d = mask_d & (t < L)
                u = _load(u_ptr, p * s_ul + offs_d * s_ud, m_d)
                dt, dt_raw = _load_delta(dt_ptr, p * s_tl + offs_d * s_td, m_d, bias, SOFTPLUS)
                Bt = _load(B_ptr, p * s_Bl + offs_n * s_Bn, mask_n & (t < L))
                h_prev = h_prev + (h,)
                a = tl.exp2((dt * LOG2E)[None, :] * A)
                h = a * h + Bt[:, None] * (dt * u)[None, :]
                h_cur = h_cur + (h,)
                if CACHE_STEP:
                    steps = steps + ((u, dt, dt_raw, Bt),)
                if CACHE_DECAY:
                    decays = decays + (a,)
            # Step back through the chunk with the adjoint state g.
            for k in tl.static_range(BLOCK_L - 1, -1, -1):
                t = c * BLOCK_L + k
                p = _position(t, L, REVERSE)
                m_d = mask_d & (t < L)
                m_n = mask_n & (t < L)
                if CACHE_STEP:
                    u, dt, dt_raw, Bt = steps[k]
                else:
                    u = _load(u_ptr, p * s_ul + offs_d * s_ud, m_d)
                    dt, dt_raw = _load_delta(dt_ptr, p * s_tl + offs_d * s_td, m_d, bias, SOFTPLUS)
                    Bt = _load(B_ptr, p * s_Bl + offs_n * s_Bn, m_n)
                Ct = _load(C_ptr, p * s_Cl + offs_n * s_Cn, m_n)
                dy = _load(dout_ptr, p * s_ol + offs_d * s_od, m_d)
                z = dy
                if HAS_Z:
                    z = _load(z_ptr, p * s_zl + offs_d * s_zd, m_d)
                a = q
                if CACHE_DECAY:
                    a = decays[k]
                q, dA_acc, dD_acc, dbias_acc = _step_back(
                    u, dt, dt_raw, Bt, Ct, dy, z, a, h_prev[k], h_cur[k], q, dA_acc, dD_acc, dbias_acc, A, Dv, p,
                    m_d, m_n, offs_d, offs_n, N, du_ptr, ddt_ptr, dz_ptr, dB_ptr, dC_ptr, s_dul, s_dud, s_dtl, s_dtd,
                    s_dzl, s_dzd, HAS_D, HAS_Z, SOFTPLUS, CACHE_DECAY, DBC_PARTIALS)

    # per-batch partial sums, reduced over the batch by torch
    tl.store(dA_ptr + pid_b * N * Dim + offs_n[:, None] * Dim + offs_d[None, :], dA_acc, mask=mask_nd)
    tl.store(dD_ptr + pid_b * Dim + offs_d, dD_acc, mask=mask_d)
    tl.store(dbias_ptr + pid_b * Dim + offs_d, dbias_acc, mask=mask_d)


def _empty_like_bdl(x):
    """An empty (B, D, L) tensor stored like x: (B, L, D)-contiguous when x's channels are contiguous (a transposed
    view), else (B, D, L)-contiguous, so that the kernels' loads and stores of one time step stay contiguous."""
    Bsz, Dim, L = x.shape
    if x.stride(1) == 1 and x.stride(2) != 1:
        return torch.empty(Bsz, L, Dim, dtype=x.dtype, device=x.device).transpose(1, 2)
    return torch.empty(Bsz, Dim, L, dtype=x.dtype, device=x.device)


def _channels_contiguous(A):
    """A (D, N) as a view of an (N, D)-contiguous copy. Every (N, BLOCK_D) tile the backward reads or writes is then
    contiguous along the channels, and Triton gives them all one register layout instead of converting between two."""
    return A.t().contiguous().t()


def _pick(wide, narrow, u):
    """The wide launch shapes when the batch gives every SM enough programs of 64 channels, else the narrow ones."""
    if not u.is_cuda:  # the interpreter: whatever FWD_CONFIG / BWD_CONFIG say (tests set them)
        return wide
    Bsz, Dim, _ = u.shape
    sms = torch.cuda.get_device_properties(u.device).multi_processor_count
    return wide if Bsz * triton.cdiv(Dim, 64) >= WIDE_MIN_PROGRAMS_PER_SM * sms else narrow


def _launch(cfg, Dim, L, N):
    """Block sizes of one launch, shrunk for tiny problems (tests); the config's other keys pass through."""
    return dict(cfg, BLOCK_D=min(cfg["BLOCK_D"], max(triton.next_power_of_2(Dim), 16)),
                BLOCK_L=min(cfg["BLOCK_L"], triton.next_power_of_2(L)), BLOCK_N=triton.next_power_of_2(N))


def _note_launch(kind, kernel):
    """Keep the registers and spills of the last compiled launch of each kernel (for --scan_sweep)."""
    if hasattr(kernel, "n_regs"):  # a compiled kernel (the interpreter returns none)
        LAST_LAUNCH[kind] = dict(regs=kernel.n_regs, spills=kernel.n_spills)


def _flags(D, z, delta_bias, delta_softplus, reverse):
    return dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                SOFTPLUS=bool(delta_softplus), REVERSE=bool(reverse))


def _forward_launch(cfg, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse):
    """-> (grid, arguments, compile-time constants, out) of the forward kernel's launch with launch shape cfg (the
    registers tool, tools/scan_regs.py, compiles exactly these arguments without a GPU)."""
    Bsz, Dim, L = u.shape
    out = _empty_like_bdl(u)
    At = _channels_contiguous(A)
    meta = _launch(cfg, Dim, L, A.shape[1])
    grid = (triton.cdiv(Dim, meta["BLOCK_D"]), Bsz)
    z_strides = z.stride() if z is not None else (0, 0, 0)
    args = (u, delta, At, B, C, D if D is not None else u, z if z is not None else u,
            delta_bias if delta_bias is not None else u, out,
            Dim, L, A.shape[1], *u.stride(), *delta.stride(), *At.stride(), *B.stride(), *C.stride(), *z_strides,
            *out.stride())
    return grid, args, dict(_flags(D, z, delta_bias, delta_softplus, reverse), **meta), out


def _forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse):
    grid, args, meta, out = _forward_launch(_pick(FWD_CONFIG, FWD_CONFIG_NARROW, u), u, delta, A, B, C, D, z,
                                            delta_bias, delta_softplus, reverse)
    _note_launch("fwd", _fwd_kernel[grid](*args, **meta))
    return out


def _backward_launch(cfg, dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse):
    """-> (grid, arguments, compile-time constants, output buffers) of the backward kernel's launch with launch
    shape cfg (BWD_FLAGS fill in the switches it leaves out)."""
    Bsz, Dim, L = u.shape
    N = A.shape[1]
    meta = dict(BWD_FLAGS, **_launch(cfg, Dim, L, N))
    if meta["PREFETCH"] and (meta["BLOCK_L"] != 1 or meta["SUPER"] != 1):
        raise ValueError(f"the backward's PREFETCH needs BLOCK_L=1 and SUPER=1, got {cfg}")
    grid = (triton.cdiv(Dim, meta["BLOCK_D"]), Bsz)
    tile = meta["BLOCK_N"] * meta["BLOCK_D"]
    f32 = dict(dtype=torch.float32, device=u.device)
    At = _channels_contiguous(A)
    du, ddelta = _empty_like_bdl(u), _empty_like_bdl(delta)
    dz = _empty_like_bdl(z) if z is not None else None
    if meta["DBC_PARTIALS"]:  # every (b, block, t, n) slot is written once
        dB, dC = (torch.empty(Bsz, grid[0], L, N, **f32) for _ in range(2))
    else:
        dB, dC = (torch.zeros(Bsz, L, N, **f32) for _ in range(2))
    dA = torch.empty(Bsz, N, Dim, **f32)
    dD = torch.empty(Bsz, Dim, **f32)
    dbias = torch.empty(Bsz, Dim, **f32)
    sup = meta["SUPER"]
    slots = triton.cdiv(triton.cdiv(L, meta["BLOCK_L"]), sup) - 1 + (sup if sup > 1 else 0)  # per program
    ck = torch.empty(max(slots * grid[0] * Bsz * tile, 1), **f32)
    z_strides = z.stride() if z is not None else (0, 0, 0)
    args = (u, delta, At, B, C, D if D is not None else u, z if z is not None else u,
            delta_bias if delta_bias is not None else u, dout,
            du, ddelta, dz if dz is not None else du, dB, dC, dA, dD, dbias, ck,
            Dim, L, N, *u.stride(), *delta.stride(), *At.stride(), *B.stride(), *C.stride(), *z_strides,
            *dout.stride(), *du.stride(), *ddelta.stride(), *(dz.stride() if dz is not None else (0, 0, 0)))
    meta.update(_flags(D, z, delta_bias, delta_softplus, reverse))
    return grid, args, meta, (du, ddelta, dz, dB, dC, dA, dD, dbias)


def _backward(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse):
    """-> du, ddelta, dA, dB, dC, dD, dz, ddelta_bias; None for an absent input. Layouts as ``_grad_layouts``."""
    grid, args, meta, buffers = _backward_launch(_pick(BWD_CONFIG, BWD_CONFIG_NARROW, u), dout, u, delta, A, B, C, D,
                                                 z, delta_bias, delta_softplus, reverse)
    _note_launch("bwd", _bwd_kernel[grid](*args, **meta))
    du, ddelta, dz, dB, dC, dA, dD, dbias = buffers
    dA = dA.sum(0).t().contiguous().to(A.dtype)
    if meta["DBC_PARTIALS"]:
        dB, dC = dB.sum(1), dC.sum(1)
    dB = dB.transpose(1, 2).contiguous().to(B.dtype)  # (B, N, L)
    dC = dC.transpose(1, 2).contiguous().to(C.dtype)
    dD = dD.sum(0).to(D.dtype) if D is not None else None
    dbias = dbias.sum(0).to(delta_bias.dtype) if delta_bias is not None else None
    return du, ddelta, dA, dB, dC, dD, dz, dbias


def _grad_layouts(u, delta, A, B, C, D, z, delta_bias):
    """Empty tensors shaped, typed and strided like ``_backward``'s results (for torch.compile's tracing)."""
    return (_empty_like_bdl(u), _empty_like_bdl(delta), torch.empty_like(A, memory_format=torch.contiguous_format),
            torch.empty_like(B, memory_format=torch.contiguous_format),
            torch.empty_like(C, memory_format=torch.contiguous_format),
            None if D is None else torch.empty_like(D), None if z is None else _empty_like_bdl(z),
            None if delta_bias is None else torch.empty_like(delta_bias))


def _device(u):
    return torch.cuda.device(u.device) if u.is_cuda else contextlib.nullcontext()  # CPU: the interpreter


# The kernels are registered as two custom operators with an autograd formula, so that torch.compile treats each as
# one opaque call and fuses the elementwise work around it, rather than breaking its graph at every layer.
@torch.library.custom_op("vim::selective_scan_v1_fwd", mutates_args=())
def _scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
              delta_bias: Optional[Tensor], delta_softplus: bool, reverse: bool) -> Tensor:
    with _device(u):
        return _forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)


@_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse):
    return _empty_like_bdl(u)


# A custom operator returns tensors, not None: an absent input's gradient travels as an empty tensor.
@torch.library.custom_op("vim::selective_scan_v1_bwd", mutates_args=())
def _scan_bwd(dout: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
              z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool, reverse: bool) -> List[Tensor]:
    with _device(u):
        grads = _backward(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)
    return [u.new_empty(0) if g is None else g for g in grads]


@_scan_bwd.register_fake
def _(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse):
    return [u.new_empty(0) if g is None else g for g in _grad_layouts(u, delta, A, B, C, D, z, delta_bias)]


def _setup_context(ctx, inputs, output):
    *tensors, ctx.delta_softplus, ctx.reverse = inputs
    ctx.save_for_backward(*tensors)


def _scan_backward(ctx, dout):
    u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors
    grads = _scan_bwd(dout, u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, ctx.reverse)
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    return (*(None if x is None else g for g, x in zip(grads, inputs)), None, None)


_scan_fwd.register_autograd(_scan_backward, setup_context=_setup_context)


def selective_scan_triton_v1(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, reverse=False):
    """Selective scan with mamba-ssm's ``selective_scan_fn`` signature; shapes and semantics in the module docstring.

    ``reverse=True`` scans from the last step to the first (the result equals flipping every (B, *, L) input along
    L, scanning, and flipping the output back) without moving any data.
    Differentiable w.r.t. u, delta, A, B, C, D, z and delta_bias. Returns (B, D, L) in u's dtype, stored
    (B, L, D)-contiguous when u's channels are contiguous (a ``.transpose(1, 2)`` view), else contiguous.
    """
    Bsz, Dim, L = u.shape
    N = A.shape[1]
    if delta.shape != u.shape or (z is not None and z.shape != u.shape):
        raise ValueError("u, delta and z must all be (B, D, L)")
    if A.shape != (Dim, N) or A.is_complex():
        raise ValueError(f"A must be a real (D, N) = ({Dim}, N) tensor, got {tuple(A.shape)} {A.dtype}")
    if B.shape != (Bsz, N, L) or C.shape != (Bsz, N, L):
        raise ValueError(f"B and C must be (B, N, L) = ({Bsz}, {N}, {L})")
    if (D is not None and D.shape != (Dim,)) or (delta_bias is not None and delta_bias.shape != (Dim,)):
        raise ValueError(f"D and delta_bias must be ({Dim},)")
    if Bsz > 65535:  # the batch is the second grid axis
        raise ValueError(f"batch {Bsz} is above 65535; split it")
    return _scan_fwd(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), bool(reverse))

"""The selective scan (Mamba's S6 recurrence) in Triton, for short sequences: Vim's 65 and 257 tokens.

Same signature and semantics as ``models.scan.selective_scan_ref`` (and mamba-ssm's ``selective_scan_fn``):

    u, delta, z: (B, D, L)    A: (D, N)    B, C: (B, N, L)    D, delta_bias: (D,)    ->  out: (B, D, L), u's dtype

    delta <- softplus(delta + delta_bias)                      (delta_bias / softplus optional)
    h_t    = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t  h: (B, D, N), h_{-1} = 0
    y_t    = <C_t, h_t> + D * u_t
    out_t  = y_t * silu(z_t)                                   (when z is given)
    out_t  = out_scale * out_t + out_add_t                     (out_add optional: the mixer's mean of its directions)

plus ``reverse``: scan from the last step to the first, reading the same memory (Vim's backward direction).
Inputs may be fp32, fp16 or bf16 with any strides; arithmetic is fp32. N is at most 32.

The scan pair (``selective_scan_pair_triton``) is the mixer's two directions over one gate z as one op: the forward
direction's output halved, then the backward direction's (reverse) halved and added to it, by the same kernels. Its
backward runs the backward direction's backward, which writes dz, then the forward direction's with ``DZ_ADD``: pass 2
reads the dz stored there (a chunk ahead, with the chunk's other loads; each lane its own elements) and stores the
sum. As two ops, each wrote its own dz and autograd added them in a kernel of its own, three passes over a (B, L, D)
tensor a layer (estimated at 1.7% of the training step at 257 tokens, batch 512). The pair saves the same inputs as
the two ops did; pass 2 with ``DZ_ADD`` fits its registers without spills (tools/scan_regs.py).

Work split. A program is one warp: one batch element, 32 channels (one per lane), every state. Each state is its own
channel vector (a tuple of N registers per lane), so sums over the states (y, and the backward's sums for du and
ddelta) are adds inside a lane and every per-channel quantity (softplus, gates) is computed once per lane. Nothing of
size B*D*L*N goes to memory in the forward. No load is masked (``_clamped``: a masked load costs a zeroing move per
register), and the softplus and sigmoids use the special-function unit's one-instruction approximations
(``FAST_MATH``).

Loads ahead of use. The scan is bound by the latency of its loads, not by its arithmetic (docs/SPEED.md), so every
load goes out a group of steps before the steps that use it:
  * B_t and C_t are the same for every lane. They are loaded spread over the lanes (``_spread``): lane l holds 32-bit
    word l mod W of step l div W (W words a step: 8 for 16 bf16 states packed in pairs), so one register per lane
    holds 32 / W steps, and a step's words reach every lane by warp shuffles (``_word``) or, at 16 states, through
    shared memory (below). Loaded as scalars, each lane would hold W registers a step, and
    the backward has no registers to spare for that.
  * The forward loads GROUP steps at once, one group ahead.
  * The backward's two passes load the next chunk while they compute the current one.

Backward, with nothing saved by the forward but its inputs, in two passes over the sequence, two launches of one
kernel (PASS 1, then 2: pass 1 needs a quarter of pass 2's registers, and as its own launch it runs with more warps
resident; 0.5-5.5% faster than one launch, docs/results/scan_ab_split_maxnreg_h100.log):
  pass 1  runs the recurrence forward and stores the state at the end of every chunk of CHUNK steps (a scratch of
          B*D*N*L/CHUNK values, freed when the backward returns);
  pass 2  walks the chunks from last to first. It recomputes the chunk's states from the stored one, then steps back
          through them with the adjoint state
              g_t = dL/dh_t = C_t*dy_t + a_{t+1}*g_{t+1},      a_t = exp(delta_t*A),  dy = dout*silu(z)
          accumulating
              ddelta_t = sum_n g_t*(A*a_t*h_{t-1} + u_t*B_t)    du_t = D*dy_t + delta_t * sum_n g_t*B_t
              dA      += sum_t delta_t*g_t*a_t*h_{t-1}          dB_t = sum_d g_t*delta_t*u_t
              dC_t     = sum_d dy_t*h_t                         dD  += sum_t dy_t*u_t
          dB_t and dC_t are sums over the warp's lanes, added atomically (fp32) into (B, L, N) buffers that all
          channel blocks share; dA, dD and d(delta_bias) are per-batch partials that torch sums afterwards.
Shared memory. The forward and pass 2 are bound by issuing their instructions (pass 2 with few warps resident: it needs
many registers), so at 16 states (the model's) some of their work goes through shared memory, by inline PTX (Triton
has no other way to it):
  * B_t and C_t, in the forward and in both passes of the backward, where a group's (chunk's) are one register per
    lane: once a group each lane unpacks its word of B and of C to fp32 and stores them, and then every lane reads a
    step's 16 values of B and of C with 8 vector loads of the address that all lanes read (a broadcast, no bank
    conflicts). Shuffled, B and C took 16 shuffles and 32 unpacking instructions a step; the forward's loop goes from
    182 to 145 instructions a step (sm_90), pass 1's from 128 to 109 (at 80 registers instead of 64), pass 2's from
    481 to 431. On an H100 at 257 tokens, batch 512 the forward call took 5-8% less time, and the backward 0.3-0.6%
    less with pass 1's and 2.4% less with pass 2's (docs/SPEED.md).
  * Pass 2's sums over the lanes: each lane stores its 32 parts (dB_t's and dC_t's 16 each) as a column of a table,
    then reads one row back in 16-byte vectors and adds it up: 32 stores, 8 loads and 31 adds a step, against 31
    shuffles, 62 selects and 31 adds for a reduce-scatter of warp shuffles (``_sum_over_lanes``).
  * Pass 2's recomputed states of the chunk: one row of 16 fp32 per lane and step (4 vector stores, and 4 loads on
    the way back), not 16 registers per step of the chunk.
Pass 2's B and C add 12 broadcast loads a step to its 12 loads and 36 stores in shared memory (its exponentials
there, about 32 wavefronts a step, had made it 4-5% slower; docs/SPEED.md). Triton's interpreter runs no PTX: there
B and C come by shuffles, the states stay in registers and the sums are the reduce-scatter. CHUNK trades scratch
traffic (1/CHUNK of all the states, written and read once) against the registers the kept per-step values take, and
so resident warps.

The scratch is fp32 for fp32 inputs and bf16 for 16-bit ones. Writing it is most of pass 1's time: at 257 tokens,
batch 512 the fp32 scratch was 2.1 GB a call, and pass 1 ran at 76% of the memory's bandwidth. In bf16 the backward
takes 7.5-9.5% less time at the measured shapes (docs/SPEED.md). Each chunk's first state is then rounded to bf16 (8
bits of mantissa), as the activations around the scan already are; outputs and gradients at the model's shapes stay
within the bf16 tests' tolerances. Storing every other chunk's state instead (fp32, the odd chunks' first state
recomputed in pass 2 from the even chunk before) halves the scratch too, but gained nothing (0.3% faster to 1.2%
slower), likely because pass 2 then computes with loads it has only just issued.
"""
import contextlib
import os
from typing import List, Optional

import torch
from torch import Tensor
import triton
import triton.language as tl
from triton.language.extra import libdevice

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
LANES = 32
# backward: steps recomputed together (their states kept in shared memory, the per-step values in registers). 4 beat
# 3 by 1-3.6% in the backward at the model's shapes and 5 is slower (docs/results/scan_ab_smem*_h100.log);
# 4 compiles to 254 registers without spills (tools/scan_regs.py). Capping registers for more resident warps spills
# and was slower (CHUNK 3 at 200 registers: 1% faster than uncapped; CHUNK 4 at 200: a backward 1.52x the old kernel's).
CHUNK = 4
# forward: steps loaded together, one group ahead. 4 was fastest at batch 512 (65 and 257 tokens) and within 3% of
# 8 at 257 tokens, batch 128 (docs/results/scan_ab_prefetch_h100.log).
GROUP = 4
# The softplus and the sigmoids take one special-function instruction per exp, log and division (approximate, a few
# ulp). Triton's own tl.log, tl.sigmoid and "/" are exact library sequences, about 30 instructions for a log: 10-20%
# of the scan's instructions per step. Triton's interpreter cannot run the approximations and uses the exact forms.
FAST_MATH = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")


@triton.jit
def _position(t, L, REVERSE: tl.constexpr):
    if REVERSE:
        return L - 1 - t
    return t


@triton.jit
def _exp(x):
    return tl.exp2(x * LOG2E)  # one approximate exp2 (Triton's tl.exp adds a denormal fix-up around it)


@triton.jit
def _div(a, b):
    if FAST_MATH:
        return libdevice.fast_dividef(a, b)
    return a / b


@triton.jit
def _log(x):
    if FAST_MATH:
        return libdevice.fast_log2f(x) * LN2
    return tl.log(x)


@triton.jit
def _sigmoid(x):
    return _div(1.0, 1.0 + _exp(-x))


@triton.jit
def _softplus(x):
    e = _exp(x)
    w = 1.0 + e
    lp = tl.where(w == 1.0, e, _div(_log(w) * e, w - 1.0))  # log1p(e), accurate where e is small
    return tl.where(x > 20.0, x, lp)


@triton.jit
def _vec(ptr, offs, mask):
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _delta(raw, bias, mask, SOFTPLUS: tl.constexpr):
    """-> (delta, raw delta + bias) in fp32; delta is 0 where masked, so a padded step leaves the state alone."""
    x = raw.to(tl.float32) + bias
    dt = x
    if SOFTPLUS:
        dt = _softplus(x)
    return tl.where(mask, dt, 0.0), x


@triton.jit
def _setup(pid_d, Dim, A_ptr, D_ptr, bias_ptr, s_Ad, s_An, N: tl.constexpr, BLOCK_D: tl.constexpr,
           BLOCK_N: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr):
    """A program's channels (block pid_d) -> lane, offs_d, mask_d, offs_c (offs_d clamped to the last channel:
    channels past Dim read its data, with delta 0), A*log2(e) as BLOCK_N channel vectors (0 for padded states: their
    state stays 0), delta_bias, D."""
    lane = tl.arange(0, BLOCK_D)
    offs_d = pid_d * BLOCK_D + lane
    mask_d = offs_d < Dim
    offs_c = tl.minimum(offs_d, Dim - 1)
    A2 = ()
    for n in tl.static_range(BLOCK_N):
        A2 = A2 + (tl.load(A_ptr + n * s_An + offs_d * s_Ad, mask=mask_d & (n < N), other=0.0).to(tl.float32)
                   * LOG2E,)
    bias = 0.0
    if HAS_BIAS:
        bias = _vec(bias_ptr, offs_d, mask_d)
    Dv = 0.0
    if HAS_D:
        Dv = _vec(D_ptr, offs_d, mask_d)
    return lane, offs_d, mask_d, offs_c, A2, bias, Dv


@triton.jit
def _clamped(t, L, REVERSE: tl.constexpr):
    """Position of step t, or of the last step for t past the sequence: loads are never masked (a masked load
    costs a zeroing move per register); a step past the end reads real data and is made inert by its delta and
    output gradient, set to 0."""
    return _position(tl.minimum(t, L - 1), L, REVERSE)


@triton.jit
def _spread(ptr, s_l, s_n, t0, L, lane, K: tl.constexpr, N: tl.constexpr, BLOCK_N: tl.constexpr,
            PACKED: tl.constexpr, REVERSE: tl.constexpr):
    """B (or C) of steps t0 .. t0+K-1, spread over the lanes: a tuple of R = ceil(K*W/32) registers; lane l of
    register r holds word (32r + l) mod W of step t0 + (32r + l) div W, W = BLOCK_N/2 bf16 pairs a step when PACKED,
    else BLOCK_N values (fp32). Steps past the sequence read the last one; words past N are 0."""
    W: tl.constexpr = BLOCK_N // 2 if PACKED else BLOCK_N
    R: tl.constexpr = (K * W + 31) // 32
    out = ()
    for r in tl.static_range(R):
        i = r * 32 + lane
        j = i % W
        p = _clamped(t0 + tl.minimum(i // W, K - 1), L, REVERSE)
        if PACKED:
            words = (ptr + p * s_l).to(tl.pointer_type(tl.int32))
            out = out + (tl.load(words + j, mask=2 * j < N, other=0),)
        else:
            out = out + (tl.load(ptr + p * s_l + j * s_n, mask=j < N, other=0.0).to(tl.float32),)
    return out


@triton.jit
def _word(regs, i, BLOCK_D: tl.constexpr):
    """Word i of a _spread tuple, in every lane (one warp shuffle)."""
    return tl.gather(regs[i // 32], tl.full((BLOCK_D,), i % 32, tl.int32), 0)


@triton.jit
def _step_bc(regs, k, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PACKED: tl.constexpr):
    """Step k's BLOCK_N values of a _spread tuple as fp32 channel vectors."""
    out = ()
    if PACKED:
        for j in tl.static_range(BLOCK_N // 2):
            w = _word(regs, k * (BLOCK_N // 2) + j, BLOCK_D)
            out = out + ((w << 16).to(tl.float32, bitcast=True), (w & -65536).to(tl.float32, bitcast=True))
    else:
        for n in tl.static_range(BLOCK_N):
            out = out + (_word(regs, k * BLOCK_N + n, BLOCK_D),)
    return out


@triton.jit
def _lane_loads(u_ptr, dt_ptr, z_ptr, g_ptr, t0, L, s_ul, s_tl, s_zl, s_gl,
                K: tl.constexpr, HAS_Z: tl.constexpr, HAS_G: tl.constexpr, REVERSE: tl.constexpr):
    """Per step of t0 .. t0+K-1 (clamped to the sequence): (u, delta, z, g) as stored, from per-lane pointers; g is
    the output gradient in the backward, out_add in the forward; z and g are u's value where absent (never used
    then)."""
    out = ()
    for k in tl.static_range(K):
        p = _clamped(t0 + k, L, REVERSE)
        u = tl.load(u_ptr + p * s_ul)
        z = u
        if HAS_Z:
            z = tl.load(z_ptr + p * s_zl)
        g = u
        if HAS_G:
            g = tl.load(g_ptr + p * s_gl)
        out = out + ((u, tl.load(dt_ptr + p * s_tl), z, g),)
    return out


@triton.jit
def _dz_loads(dz_ptr, t0, L, s_dzl, K: tl.constexpr, DZ_ADD: tl.constexpr, REVERSE: tl.constexpr):
    """With DZ_ADD, the dz already stored (by the other direction's backward) at steps t0 .. t0+K-1 (clamped to the
    sequence), from per-lane pointers; else nothing. A lane stores a step's sum only after it has loaded the step: each
    lane reads and writes its own elements, so no load sees this kernel's stores. Loaded with the chunk's other loads:
    loaded where the sum is stored, ptxas issued it no earlier than the previous step's atomic adds, about 200
    instructions before its use (for sm_90: 252 registers this way, 255 that way, neither spills)."""
    out = ()
    if DZ_ADD:
        for k in tl.static_range(K):
            out = out + (tl.load(dz_ptr + _clamped(t0 + k, L, REVERSE) * s_dzl),)
    return out


@triton.jit
def _fwd_kernel(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, add_ptr, out_ptr,
                Dim, L, scale,
                s_ub, s_ud, s_ul, s_tb, s_td, s_tl, s_Ad, s_An, s_Bb, s_Bn, s_Bl, s_Cb, s_Cn, s_Cl,
                s_zb, s_zd, s_zl, s_ab, s_ad, s_al, s_ob, s_od, s_ol,
                N: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                PACKED: tl.constexpr, GROUP: tl.constexpr, HAS_ADD: tl.constexpr):
    pid_b = tl.program_id(1).to(tl.int64)
    lane, offs_d, mask_d, offs_c, A2, bias, Dv = _setup(tl.program_id(0), Dim, A_ptr, D_ptr, bias_ptr, s_Ad, s_An,
                                                        N, BLOCK_D, BLOCK_N, HAS_D, HAS_BIAS)
    u_ptr += pid_b * s_ub + offs_c * s_ud  # per-lane pointers: the loads below add only the step's offset
    dt_ptr += pid_b * s_tb + offs_c * s_td
    z_ptr += pid_b * s_zb + offs_c * s_zd
    add_ptr += pid_b * s_ab + offs_c * s_ad
    B_ptr += pid_b * s_Bb
    C_ptr += pid_b * s_Cb
    out_ptr += pid_b * s_ob
    SHARED: tl.constexpr = SMEM and BLOCK_N == 16 and PACKED and GROUP == BC_STEPS
    bc = 0
    if SHARED:  # the group's B_t and C_t in shared memory (B's 4 steps, then C's)
        bc = _shared_buffer(BCBUF_ASM, lane)
    h = ()
    for n in tl.static_range(BLOCK_N):
        h = h + (tl.zeros((BLOCK_D,), tl.float32),)
    nxt = (_lane_loads(u_ptr, dt_ptr, z_ptr, add_ptr, 0, L, s_ul, s_tl, s_zl, s_al, GROUP, HAS_Z, HAS_ADD, REVERSE),
           _spread(B_ptr, s_Bl, s_Bn, 0, L, lane, GROUP, N, BLOCK_N, PACKED, REVERSE),
           _spread(C_ptr, s_Cl, s_Cn, 0, L, lane, GROUP, N, BLOCK_N, PACKED, REVERSE))
    for g in range(0, tl.cdiv(L, GROUP)):
        cur = nxt
        t0 = (g + 1) * GROUP  # the next group's loads go out before this group computes
        nxt = (_lane_loads(u_ptr, dt_ptr, z_ptr, add_ptr, t0, L, s_ul, s_tl, s_zl, s_al, GROUP, HAS_Z, HAS_ADD,
                           REVERSE),
               _spread(B_ptr, s_Bl, s_Bn, t0, L, lane, GROUP, N, BLOCK_N, PACKED, REVERSE),
               _spread(C_ptr, s_Cl, s_Cn, t0, L, lane, GROUP, N, BLOCK_N, PACKED, REVERSE))
        steps = cur[0]
        if SHARED:
            _store_bc(bc, lane, (cur[1][0], cur[2][0]))
        for k in tl.static_range(GROUP):
            t = g * GROUP + k
            live = t < L
            p = _clamped(t, L, REVERSE)
            u_r = steps[k][0]
            dt_r = steps[k][1]
            z_r = steps[k][2]
            u = u_r.to(tl.float32)
            dt, _ = _delta(dt_r, bias, mask_d & live, SOFTPLUS)  # 0 past the sequence: the state stays
            Bt = _bc_step(bc, cur[1], k, False, SHARED, BLOCK_D, BLOCK_N, PACKED)
            Ct = _bc_step(bc, cur[2], k, True, SHARED, BLOCK_D, BLOCK_N, PACKED)
            dtu = dt * u
            y = Dv * u
            nh = ()
            for n in tl.static_range(BLOCK_N):
                hn = tl.exp2(dt * A2[n]) * h[n] + Bt[n] * dtu
                y += hn * Ct[n]
                nh = nh + (hn,)
            h = nh
            if HAS_Z:
                zf = z_r.to(tl.float32)
                y = y * zf * _sigmoid(zf)
            y = y * scale
            if HAS_ADD:
                y += steps[k][3].to(tl.float32)
            tl.store(out_ptr + p * s_ol + offs_d * s_od, y.to(out_ptr.dtype.element_ty), mask=mask_d & live)


@triton.jit
def _lane_swap(x, lane, M: tl.constexpr):
    """x of the lane whose index differs from this one's in bit M (a warp shuffle: one warp per program)."""
    return tl.gather(x, lane ^ M, 0)


@triton.jit
def _sum_over_lanes(v, lane, LOG2N: tl.constexpr):
    """Sums of 2**LOG2N channel vectors over a warp's 32 lanes, spread over the lanes (a reduce-scatter: 2**LOG2N
    shuffles in all rather than 5 per vector). -> x: lane l holds the sum of vector (l >> (5 - LOG2N))."""
    for lvl in tl.static_range(LOG2N):
        up = (lane & (16 >> lvl)) != 0
        nv = ()
        for j in tl.static_range((1 << (LOG2N - lvl)) // 2):
            send = tl.where(up, v[j], v[j + (1 << (LOG2N - lvl)) // 2])
            keep = tl.where(up, v[j + (1 << (LOG2N - lvl)) // 2], v[j])
            nv = nv + (keep + _lane_swap(send, lane, 16 >> lvl),)
        v = nv
    x = v[0]
    for lvl in tl.static_range(LOG2N, 5):
        x += _lane_swap(x, lane, 16 >> lvl)
    return x


# the shared-memory table's row: 32 lanes' values and 4 words of padding (see _smem_sum_asm)
SMEM_ROW_BYTES = tl.constexpr(4 * (32 + 4))


def _smem_sum_asm(rows=32, stride=SMEM_ROW_BYTES.value):
    """PTX for _sum_rows_over_lanes: each lane stores its `rows` values as one column of a table in shared memory,
    one row of `stride` bytes per value (scalar stores: the 32 lanes of a store fill one row's consecutive words),
    then reads its own row back as 16-byte vectors and adds it up. Rows of 36 words (4 of padding) put the 8 rows
    that a quarter warp's 16-byte loads touch at once on 8 different groups of banks, so neither side has bank
    conflicts. Inputs $1..$rows are the values, then the lane's shared-memory addresses: its column's (table + 4 *
    lane) and its row's (table + stride * lane)."""
    lines = ["{", f".reg .f32 a<{rows}>;",
             "bar.warp.sync -1;"]  # (no lane still reads the table's last use when it is written again)
    lines += [f"st.shared.f32 [${rows + 1}+{v * stride}], ${v + 1};" for v in range(rows)]
    lines += ["bar.warp.sync -1;"]
    lines += [f"ld.shared.v4.f32 {{a{4 * i}, a{4 * i + 1}, a{4 * i + 2}, a{4 * i + 3}}}, [${rows + 2}+{16 * i}];"
              for i in range(rows // 4)]
    width = 1
    while width < rows // 2:  # a pairwise tree: short chains of dependent adds
        lines += [f"add.f32 a{i}, a{i}, a{i + width};" for i in range(0, rows, 2 * width)]
        width *= 2
    lines += [f"add.f32 $0, a0, a{rows // 2};", "}"]
    return "\n".join(lines)


SMEM_SUM_ASM = tl.constexpr(_smem_sum_asm())
# Shared memory through inline PTX (Triton has no other way to it), for 16 states (the model's): dB_t's and dC_t's
# sums over the lanes and the chunk's states in pass 2. Triton's interpreter runs no PTX; there the states stay in
# registers and the sums are the reduce-scatter of warp shuffles.
SMEM = FAST_MATH
HROW = tl.constexpr(80)  # a lane's row of 16 fp32 states and 4 words of padding: 16-byte stores without bank conflicts
MAX_CHUNK = 5
HBUF_ASM = tl.constexpr("{ .shared .align 16 .b8 hbuf[%d]; mov.u32 $0, hbuf; }" % (MAX_CHUNK * LANES * HROW.value))
TBUF_ASM = tl.constexpr("{ .shared .align 16 .b8 tbuf[%d]; mov.u32 $0, tbuf; }" % (LANES * SMEM_ROW_BYTES.value))
STORE_ROW_ASM = tl.constexpr("{ " + " ".join(
    f"st.shared.v4.f32 [$1+{16 * i}], {{${4 * i + 2}, ${4 * i + 3}, ${4 * i + 4}, ${4 * i + 5}}};" for i in range(4))
    + " mov.u32 $0, 0; }")
LOAD_ROW_ASM = tl.constexpr("{ " + " ".join(
    f"ld.shared.v4.f32 {{${4 * i}, ${4 * i + 1}, ${4 * i + 2}, ${4 * i + 3}}}, [$16+{16 * i}];" for i in range(4))
    + " }")
# B_t and C_t (pass 1: B_t) through shared memory, where each is one register per lane as _spread loads
# it (16 states, packed bf16, 4 steps a group or chunk): once a group each lane stores its word of B (and of C)
# unpacked to fp32, and each step every lane reads the step's 16 values with 4 vector loads of one address (a
# broadcast), instead of 8 warp shuffles and 16 unpacking instructions a step for each of B and C (_step_bc, which the
# interpreter and other state counts keep). sm_90 loops of 145 instructions a step in the forward (182 with shuffles)
# and 109 in pass 1 (128, but at 80 registers instead of 64). H100, 257 tokens, batch 512 (tools/scan_ab.py): the
# forward 0.756 -> 0.716 ms a call, the backward 2.955 -> 2.945 ms; pass 1 with shuffles instead, 2.962 ms. Pass 2:
# 481 -> 431 instructions a step, the backward 2.932 -> 2.863 ms a call (same GPU and shape, a later run).
BC_STEPS = tl.constexpr(4)  # steps of a group (forward) or chunk (backward) that one register per lane holds
BC_BYTES = tl.constexpr(BC_STEPS.value * 16 * 4)  # one group's B (or C) as fp32: 64 bytes a step
BCBUF_ASM = tl.constexpr("{ .shared .align 16 .b8 bcbuf[%d]; mov.u32 $0, bcbuf; }" % (2 * BC_BYTES.value))


def _bc_store_asm(words):
    """PTX for _store_bc: each lane stores its `words` packed words ($1: B's, $2: C's) at $<words + 1>, between warp
    barriers, as two fp32 each (the low bf16 is the even state) with one 8-byte store at the buffer + 8 * lane, B's in
    the first 256 bytes, C's in the next: the 32 lanes fill 4 steps' values in order. The barrier before keeps every
    lane from overwriting values that another lane has still to read from the last group; the one after makes the
    stores visible to every lane."""
    lines = ["{", ".reg .b32 lo, hi;", "bar.warp.sync -1;"]
    for w in range(words):
        lines += [f"shl.b32 lo, ${w + 1}, 16;", f"and.b32 hi, ${w + 1}, 0xFFFF0000;",
                  f"st.shared.v2.f32 [${words + 1}+{w * BC_BYTES.value}], {{lo, hi}};"]
    lines += ["bar.warp.sync -1;", "mov.u32 $0, 0;", "}"]
    return "\n".join(lines)


BC_STORE_ASM = tl.constexpr(_bc_store_asm(2))
B_STORE_ASM = tl.constexpr(_bc_store_asm(1))


@triton.jit
def _shared_buffer(asm, lane):
    """The shared-memory address of the buffer that asm declares (the same in every lane)."""
    return tl.inline_asm_elementwise(asm, "=r,r", (lane,), dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _sum_rows_over_lanes(dBp, dCp, col_addr, row_addr):
    """dB_t's and dC_t's per-lane parts (16 channel vectors each) summed over the warp's 32 lanes: lane l gets the
    sum of dBp[l] (l < 16) or dCp[l - 16]."""
    return tl.inline_asm_elementwise(SMEM_SUM_ASM, "=f," + "f," * 32 + "r,r", dBp + dCp + (col_addr, row_addr),
                                     dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _store_row(addr, h):
    """The 16 states h into this lane's row at shared-memory address addr (kept in order with _load_row: neither is
    pure)."""
    tl.inline_asm_elementwise(STORE_ROW_ASM, "=r,r" + ",f" * 16, (addr,) + h, dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _load_row(addr):
    """16 fp32 from shared-memory address addr: _store_row's states back, or (the same address in every lane, a
    broadcast) a step's B_t or C_t that _store_bc stored unpacked."""
    return tl.inline_asm_elementwise(LOAD_ROW_ASM, "=f" + ",=f" * 15 + ",r", (addr,), dtype=(tl.float32,) * 16,
                                     is_pure=False, pack=1)


@triton.jit
def _store_bc(bc, lane, words):
    """This lane's packed words of a group (a tuple: B's, or B's and C's) into the shared buffer at bc, unpacked to
    fp32; not pure, so kept in order with the loads before and after it."""
    asm: tl.constexpr = BC_STORE_ASM if len(words) == 2 else B_STORE_ASM
    tl.inline_asm_elementwise(asm, "=r" + ",r" * len(words) + ",r", words + (bc + 8 * lane,), dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _shared_step(bc, k, IS_C: tl.constexpr):
    """Step k's 16 values of B (or of C) from the shared buffer at bc as fp32 channel vectors, each loaded from the
    same address by every lane (a broadcast)."""
    return _load_row(bc + IS_C * BC_BYTES + k * 64)


@triton.jit
def _bc_step(bc, regs, k, IS_C: tl.constexpr, SHARED: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
             PACKED: tl.constexpr):
    """Step k's B_t (or C_t) as fp32 channel vectors: from the shared buffer at bc with SHARED, else from regs, the
    group's (chunk's) _spread registers."""
    if SHARED:
        out = _shared_step(bc, k, IS_C)
    else:
        out = _step_bc(regs, k, BLOCK_D, BLOCK_N, PACKED)
    return out


@triton.jit
def _gate_back(dy, z_raw, u, Ct, hc, Dv, BLOCK_N: tl.constexpr):
    """Back through out = y * silu(z): -> (dz, the gradient of y), with y = <C_t, h_t> + D*u recomputed."""
    z = z_raw.to(tl.float32)
    y = Dv * u
    for n in tl.static_range(BLOCK_N):
        y += hc[n] * Ct[n]
    sz = _sigmoid(z)
    return dy * y * sz * (1.0 + z * (1.0 - sz)), dy * z * sz


@triton.jit
def _adjoint_step(u, dt, x, dy, Bt, Ct, hp, hc, q, dA_acc, A2, Dv, zero, m_d, BLOCK_N: tl.constexpr,
                  SOFTPLUS: tl.constexpr):
    """One step back through the recurrence (the module docstring's pass 2), everything a lane owns: u, delta (dt) and
    delta + bias (x) of the step, the gradient of y (0 where m_d is off), B_t and C_t, h_{t-1} (hp) and h_t (hc), and
    the carried a_{t+1}*g_{t+1} (q) and dA sums. -> (du, ddelta, q for step t-1, dA sums, dB_t's and dC_t's parts
    before the sum over lanes)."""
    dtu = dt * u
    gB = zero
    gAhb = zero
    nq = ()
    nA = ()
    dBp = ()
    dCp = ()
    for n in tl.static_range(BLOCK_N):
        g = Ct[n] * dy + q[n]                        # g_t = C_t*dy_t + a_{t+1}*g_{t+1}
        qn = tl.exp2(dt * A2[n]) * g                 # a_t*g_t, for step t-1
        ghb = qn * hp[n]                             # g_t * a_t * h_{t-1}
        nq = nq + (qn,)
        nA = nA + (dA_acc[n] + ghb * dt,)
        gB += g * Bt[n]
        gAhb += ghb * A2[n]
        dBp = dBp + (g * dtu,)
        dCp = dCp + (hc[n] * dy,)
    ddt = gAhb * LN2 + u * gB
    du = dt * gB + Dv * dy
    if SOFTPLUS:
        ddt = ddt * _sigmoid(x)
    return du, tl.where(m_d, ddt, 0.0), nq, nA, dBp, dCp


@triton.jit
def _store_state(ptr, lane, h, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """A chunk's end state into the scratch: BLOCK_N rows of BLOCK_D values in the scratch's dtype."""
    for n in tl.static_range(BLOCK_N):
        tl.store(ptr + n * BLOCK_D + lane, h[n].to(ptr.dtype.element_ty))


@triton.jit
def _load_state(ptr, lane, mask, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """_store_state's state back as BLOCK_N channel vectors; zeros where mask is off (the first chunk)."""
    h = ()
    for n in tl.static_range(BLOCK_N):
        h = h + (tl.load(ptr + n * BLOCK_D + lane, mask=mask, other=0.0).to(tl.float32),)
    return h


@triton.jit
def _chunk_end(h, steps, B_regs, bias, A2, mask_d, bc, lane, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_N: tl.constexpr, PACKED: tl.constexpr, SOFTPLUS: tl.constexpr, SHARED: tl.constexpr):
    """The state after a whole chunk (every step in the sequence) from the state before it: steps are _lane_loads'
    (u, delta, ...) per step, B_regs its B as _spread loads it; with SHARED, B_t goes through shared memory at bc
    (as in the forward)."""
    if SHARED:
        _store_bc(bc, lane, (B_regs[0],))
    for k in tl.static_range(CHUNK):
        dt, _ = _delta(steps[k][1], bias, mask_d, SOFTPLUS)
        Bt = _bc_step(bc, B_regs, k, False, SHARED, BLOCK_D, BLOCK_N, PACKED)
        dtu = dt * steps[k][0].to(tl.float32)
        nh = ()
        for n in tl.static_range(BLOCK_N):
            nh = nh + (tl.exp2(dt * A2[n]) * h[n] + Bt[n] * dtu,)
        h = nh
    return h


@triton.jit
def _bwd_kernel(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr,
                du_ptr, ddt_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, ck_ptr,
                Dim, L, scale,
                s_ub, s_ud, s_ul, s_tb, s_td, s_tl, s_Ad, s_An, s_Bb, s_Bn, s_Bl, s_Cb, s_Cn, s_Cl,
                s_zb, s_zd, s_zl, s_ob, s_od, s_ol,
                s_dub, s_dud, s_dul, s_dtb, s_dtd, s_dtl, s_dzb, s_dzd, s_dzl,
                N: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                LOG2N: tl.constexpr, CHUNK: tl.constexpr, PACKED: tl.constexpr, DZ_ADD: tl.constexpr,
                PASS: tl.constexpr):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    lane, offs_d, mask_d, offs_c, A2, bias, Dv = _setup(pid_d, Dim, A_ptr, D_ptr, bias_ptr, s_Ad, s_An, N, BLOCK_D,
                                                        BLOCK_N, HAS_D, HAS_BIAS)
    u_ptr += pid_b * s_ub + offs_c * s_ud  # per-lane pointers: the loads below add only the step's offset
    dt_ptr += pid_b * s_tb + offs_c * s_td
    z_ptr += pid_b * s_zb + offs_c * s_zd
    dout_ptr += pid_b * s_ob + offs_c * s_od
    B_ptr += pid_b * s_Bb
    C_ptr += pid_b * s_Cb
    du_ptr += pid_b * s_dub
    ddt_ptr += pid_b * s_dtb
    dz_ptr += pid_b * s_dzb
    dz_in = dz_ptr + offs_c * s_dzd  # per-lane pointers of the dz to add to (DZ_ADD)
    dB_ptr += pid_b * L * N
    dC_ptr += pid_b * L * N
    n_chunks = tl.cdiv(L, CHUNK)
    SLOT: tl.constexpr = BLOCK_N * BLOCK_D  # scratch values a state takes; the start of every chunk but the first
    ck_ptr += (pid_b * tl.num_programs(0) + pid_d) * (n_chunks - 1) * SLOT

    # Pass 1: the state at the end of every chunk but the last; the next chunk's loads go out before this one's
    # state is computed and stored.
    if PASS == 1:
        SHARED_B: tl.constexpr = SMEM and BLOCK_N == 16 and PACKED and CHUNK == BC_STEPS
        bc = 0
        if SHARED_B:  # the chunk's B_t in shared memory, as in the forward
            bc = _shared_buffer(BCBUF_ASM, lane)
        h = ()
        for n in tl.static_range(BLOCK_N):
            h = h + (tl.zeros((BLOCK_D,), tl.float32),)
        nxt = (_lane_loads(u_ptr, dt_ptr, z_ptr, dout_ptr, 0, L, s_ul, s_tl, 0, 0, CHUNK, False, False,
                           REVERSE),
               _spread(B_ptr, s_Bl, s_Bn, 0, L, lane, CHUNK, N, BLOCK_N, PACKED, REVERSE))
        for c in range(0, n_chunks - 1):
            cur = nxt
            t0 = (c + 1) * CHUNK
            nxt = (_lane_loads(u_ptr, dt_ptr, z_ptr, dout_ptr, t0, L, s_ul, s_tl, 0, 0, CHUNK, False, False,
                               REVERSE),
                   _spread(B_ptr, s_Bl, s_Bn, t0, L, lane, CHUNK, N, BLOCK_N, PACKED, REVERSE))
            h = _chunk_end(h, cur[0], cur[1], bias, A2, mask_d, bc, lane, CHUNK, BLOCK_D, BLOCK_N, PACKED,
                           SOFTPLUS, SHARED_B)
            _store_state(ck_ptr + c * SLOT, lane, h, BLOCK_D, BLOCK_N)

    # Pass 2: chunks from last to first; the next one's stored state and loads go out before this one computes.
    if PASS == 2:
        zero = tl.zeros((BLOCK_D,), tl.float32)
        q = ()       # a_{t+1} * g_{t+1}
        dA_acc = ()
        for n in tl.static_range(BLOCK_N):
            q = q + (zero,)
            dA_acc = dA_acc + (zero,)
        dD_acc = zero
        dbias_acc = zero
        state = (lane >> (5 - LOG2N)) & ((1 << LOG2N) - 1)
        lead = ((lane & ((1 << (5 - LOG2N)) - 1)) == 0) & (state < N)
        SHARED: tl.constexpr = SMEM and BLOCK_N == 16
        if SHARED:  # this lane's row of the chunk's states, and the table of the sums over the lanes
            hrow = _shared_buffer(HBUF_ASM, lane) + lane * HROW
            table = _shared_buffer(TBUF_ASM, lane)
            col_addr = table + lane * 4
            row_addr = table + lane * SMEM_ROW_BYTES
        SHARED_BC: tl.constexpr = SHARED and PACKED and CHUNK == BC_STEPS
        bc = 0
        if SHARED_BC:  # the chunk's B_t and C_t in shared memory, as in the forward
            bc = _shared_buffer(BCBUF_ASM, lane)
        c = n_chunks - 1
        nxt = (_load_state(ck_ptr + tl.maximum(c - 1, 0) * SLOT, lane, c > 0, BLOCK_D, BLOCK_N),
               _lane_loads(u_ptr, dt_ptr, z_ptr, dout_ptr, c * CHUNK, L, s_ul, s_tl, s_zl, s_ol, CHUNK, HAS_Z,
                           True, REVERSE),
               _spread(B_ptr, s_Bl, s_Bn, c * CHUNK, L, lane, CHUNK, N, BLOCK_N, PACKED, REVERSE),
               _spread(C_ptr, s_Cl, s_Cn, c * CHUNK, L, lane, CHUNK, N, BLOCK_N, PACKED, REVERSE),
               _dz_loads(dz_in, c * CHUNK, L, s_dzl, CHUNK, DZ_ADD, REVERSE))
        for i in range(0, n_chunks):
            c = n_chunks - 1 - i
            cur = nxt
            cn = tl.maximum(c - 1, 0)  # (at the first chunk this reloads it: harmless, unused)
            nxt = (_load_state(ck_ptr + tl.maximum(cn - 1, 0) * SLOT, lane, cn > 0, BLOCK_D, BLOCK_N),
                   _lane_loads(u_ptr, dt_ptr, z_ptr, dout_ptr, cn * CHUNK, L, s_ul, s_tl, s_zl, s_ol, CHUNK,
                               HAS_Z, True, REVERSE),
                   _spread(B_ptr, s_Bl, s_Bn, cn * CHUNK, L, lane, CHUNK, N, BLOCK_N, PACKED, REVERSE),
                   _spread(C_ptr, s_Cl, s_Cn, cn * CHUNK, L, lane, CHUNK, N, BLOCK_N, PACKED, REVERSE),
                   _dz_loads(dz_in, cn * CHUNK, L, s_dzl, CHUNK, DZ_ADD, REVERSE))
            ld = cur[1]
            h = cur[0]
            if SHARED_BC:  # (its barrier first: the last chunk's loads from the buffer are all done)
                _store_bc(bc, lane, (cur[2][0], cur[3][0]))
            hs = ()    # hs[k] = h_{t-1} of the chunk's k-th step t, where not in shared memory
            kept = ()  # each step's u, delta and delta + bias (fp32), kept for the way back
            for k in tl.static_range(CHUNK):
                m_d = mask_d & (c * CHUNK + k < L)
                u = ld[k][0].to(tl.float32)
                dt, x = _delta(ld[k][1], bias, m_d, SOFTPLUS)
                Bt = _bc_step(bc, cur[2], k, False, SHARED_BC, BLOCK_D, BLOCK_N, PACKED)
                dtu = dt * u
                if SHARED:
                    _store_row(hrow + k * (BLOCK_D * HROW), h)
                else:
                    hs = hs + (h,)
                nh = ()
                for n in tl.static_range(BLOCK_N):
                    nh = nh + (tl.exp2(dt * A2[n]) * h[n] + Bt[n] * dtu,)
                h = nh
                kept = kept + ((u, dt, x),)
            hc = h  # h_t of the step the way back is at; h_{t-1} comes from the chunk's states
            for k in tl.static_range(CHUNK - 1, -1, -1):
                t = c * CHUNK + k
                p = _clamped(t, L, REVERSE)
                live = t < L
                m_d = mask_d & live
                u, dt, x = kept[k]
                if SHARED:
                    hp = _load_row(hrow + k * (BLOCK_D * HROW))
                else:
                    hp = hs[k]
                Bt = _bc_step(bc, cur[2], k, False, SHARED_BC, BLOCK_D, BLOCK_N, PACKED)
                Ct = _bc_step(bc, cur[3], k, True, SHARED_BC, BLOCK_D, BLOCK_N, PACKED)
                dy = tl.where(m_d, ld[k][3].to(tl.float32) * scale, 0.0)  # 0 past the sequence: g passes through
                if HAS_Z:
                    dz, dy = _gate_back(dy, ld[k][2], u, Ct, hc, Dv, BLOCK_N)
                    if DZ_ADD:  # + the other direction's dz, read a chunk ahead (its backward ran before this one)
                        dz += cur[4][k].to(tl.float32)
                    tl.store(dz_ptr + p * s_dzl + offs_d * s_dzd, dz.to(dz_ptr.dtype.element_ty), mask=m_d)
                du, ddt, q, dA_acc, dBp, dCp = _adjoint_step(u, dt, x, dy, Bt, Ct, hp, hc, q, dA_acc, A2, Dv,
                                                             zero, m_d, BLOCK_N, SOFTPLUS)
                hc = hp
                if HAS_D:
                    dD_acc += dy * u
                dbias_acc += ddt
                tl.store(du_ptr + p * s_dul + offs_d * s_dud, du.to(du_ptr.dtype.element_ty), mask=m_d)
                tl.store(ddt_ptr + p * s_dtl + offs_d * s_dtd, ddt.to(ddt_ptr.dtype.element_ty), mask=m_d)
                # dB_t and dC_t: sums over the channels, scattered over the lanes, added to what other blocks add
                if SHARED:
                    dBC = tl.where(lane < 16, dB_ptr, dC_ptr) + p * N + (lane & 15)
                    tl.atomic_add(dBC, _sum_rows_over_lanes(dBp, dCp, col_addr, row_addr),
                                  mask=live & ((lane & 15) < N), sem="relaxed")
                else:
                    m_s = lead & live
                    tl.atomic_add(dB_ptr + p * N + state, _sum_over_lanes(dBp, lane, LOG2N), mask=m_s,
                                  sem="relaxed")
                    tl.atomic_add(dC_ptr + p * N + state, _sum_over_lanes(dCp, lane, LOG2N), mask=m_s,
                                  sem="relaxed")

        for n in tl.static_range(BLOCK_N):
            tl.store(dA_ptr + pid_b * N * Dim + n * Dim + offs_d, dA_acc[n], mask=mask_d & (n < N))
        tl.store(dD_ptr + pid_b * Dim + offs_d, dD_acc, mask=mask_d)
        tl.store(dbias_ptr + pid_b * Dim + offs_d, dbias_acc, mask=mask_d)


# ------------------------------------------------------------------------------------------------ launches

def _empty_like_bdl(x):
    Bsz, Dim, L = x.shape
    if x.stride(1) == 1 and x.stride(2) != 1:
        return torch.empty(Bsz, L, Dim, dtype=x.dtype, device=x.device).transpose(1, 2)
    return torch.empty(Bsz, Dim, L, dtype=x.dtype, device=x.device)


def _partials(u, A):
    """The backward kernel's per-batch partial sums, fp32: dA (B, N, D), dD (B, D), dbias (B, D)."""
    Bsz, Dim, _ = u.shape
    f32 = dict(dtype=torch.float32, device=u.device)
    return torch.empty(Bsz, A.shape[1], Dim, **f32), torch.empty(Bsz, Dim, **f32), torch.empty(Bsz, Dim, **f32)


def _packed(B, C):
    """Whether B and C can be read as pairs of bf16 in 32-bit words (each time step's values contiguous and aligned;
    the model's x_proj output qualifies)."""
    def ok(x):
        return x.dtype == torch.bfloat16 and x.stride(1) == 1 and x.data_ptr() % 4 == 0 and \
            x.stride(0) % 2 == 0 and x.stride(2) % 2 == 0
    return B.shape[1] % 2 == 0 and ok(B) and ok(C)


def _meta(u, A, B, C, D, z, delta_bias, delta_softplus, reverse):
    N = A.shape[1]
    block_n = triton.next_power_of_2(N)
    return dict(N=N, BLOCK_N=block_n, BLOCK_D=LANES, HAS_D=D is not None, HAS_Z=z is not None,
                HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus), REVERSE=bool(reverse),
                PACKED=_packed(B, C))


def _forward_launch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, out_add=None, out_scale=1.0):
    """-> (grid, arguments, compile-time constants, out) of the forward kernel's launch."""
    Bsz, Dim, L = u.shape
    out = _empty_like_bdl(u)
    meta = _meta(u, A, B, C, D, z, delta_bias, delta_softplus, reverse)
    grid = (triton.cdiv(Dim, LANES), Bsz)
    z_strides = z.stride() if z is not None else (0, 0, 0)
    add_strides = out_add.stride() if out_add is not None else (0, 0, 0)
    args = (u, delta, A, B, C, D if D is not None else u, z if z is not None else u,
            delta_bias if delta_bias is not None else u, out_add if out_add is not None else u, out, Dim, L,
            float(out_scale), *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(), *z_strides,
            *add_strides, *out.stride())
    return grid, args, dict(meta, HAS_ADD=out_add is not None, GROUP=GROUP, num_warps=1), out


def _backward_launch(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, out_scale=1.0,
                     dz_out=None, dBC=None):
    """-> (grid, arguments, compile-time constants but PASS, output buffers) of the backward kernel's two launches,
    one per pass (the registers tool, tools/scan_regs.py, compiles exactly these without a GPU). dz_out: z's gradient
    from the other direction's backward (the scan pair's), which pass 2 adds its own to (DZ_ADD), in place. dBC: a
    zeroed, contiguous (2, B, L, N) fp32 buffer for the dB and dC the kernel adds into (the scan pair zeroes both
    directions' with one launch); by default one of its own."""
    Bsz, Dim, L = u.shape
    if dz_out is not None and (z is None or dz_out.shape != z.shape or dz_out.dtype != z.dtype):
        raise ValueError("dz_out must be z's gradient: z's shape and dtype")
    meta = _meta(u, A, B, C, D, z, delta_bias, delta_softplus, reverse)
    N, block_n = meta["N"], meta["BLOCK_N"]
    chunk = min(CHUNK, L)
    if chunk > MAX_CHUNK:  # (the states' shared buffer holds MAX_CHUNK)
        raise ValueError(f"CHUNK {chunk} is above {MAX_CHUNK}")
    grid = (triton.cdiv(Dim, LANES), Bsz)
    f32 = dict(dtype=torch.float32, device=u.device)
    du, ddelta = _empty_like_bdl(u), _empty_like_bdl(delta)
    dz = _empty_like_bdl(z) if z is not None and dz_out is None else dz_out
    if dBC is None:
        dBC = torch.zeros(2, Bsz, L, N, **f32)
    dB, dC = dBC.unbind(0)
    dA, dD, dbias = _partials(u, A)
    slots = triton.cdiv(L, chunk) - 1
    ck_dtype = torch.float32 if u.dtype == torch.float32 else torch.bfloat16
    ck = torch.empty(max(slots * grid[0] * Bsz * block_n * LANES, 1), dtype=ck_dtype, device=u.device)
    z_strides = z.stride() if z is not None else (0, 0, 0)
    args = (u, delta, A, B, C, D if D is not None else u, z if z is not None else u,
            delta_bias if delta_bias is not None else u, dout,
            du, ddelta, dz if dz is not None else du, dB, dC, dA, dD, dbias, ck,
            Dim, L, float(out_scale), *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(), *z_strides,
            *dout.stride(), *du.stride(), *ddelta.stride(), *(dz.stride() if dz is not None else (0, 0, 0)))
    meta = dict(meta, LOG2N=block_n.bit_length() - 1, CHUNK=chunk, DZ_ADD=dz_out is not None, num_warps=1)
    return grid, args, meta, (du, ddelta, dz, dBC, dA, dD, dbias)


def _forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, out_add=None, out_scale=1.0):
    grid, args, meta, out = _forward_launch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, out_add,
                                            out_scale)
    _fwd_kernel[grid](*args, **meta)
    return out


def _backward_buffers(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, out_scale=1.0, dz_out=None,
                      dBC=None):
    """The backward kernel's two passes -> its output buffers as the kernel leaves them (_finish's input)."""
    grid, args, meta, buffers = _backward_launch(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse,
                                                 out_scale, dz_out, dBC)
    _bwd_kernel[grid](*args, **meta, PASS=1)
    _bwd_kernel[grid](*args, **meta, PASS=2)
    return buffers


def _finish(du, ddelta, dz, dBC, dA, dD, dbias, A, B, C, D, delta_bias):
    """The backward kernel's buffers -> the gradients in _backward's order, in the inputs' dtypes: per-batch partials
    summed, dA (B, N, D) -> (D, N), dB and dC (B, L, N) -> (B, N, L) views. Plain torch ops, kept out of the custom
    ops so that torch.compile traces them into the backward graph and fuses them: run eagerly inside an op, these
    sums, copies and casts were 8 of the 12 launches of a direction's backward (docs/SPEED.md)."""
    dA = dA.sum(0).t().to(A.dtype)
    dB, dC = (g.transpose(1, 2).to(x.dtype) for g, x in zip(dBC.unbind(0), (B, C)))
    dD = dD.sum(0).to(D.dtype) if D is not None else None
    dbias = dbias.sum(0).to(delta_bias.dtype) if delta_bias is not None else None
    return du, ddelta, dA, dB, dC, dD, dz, dbias


def _backward(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, out_scale=1.0, dz_out=None):
    buffers = _backward_buffers(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, out_scale, dz_out)
    return _finish(*buffers, A, B, C, D, delta_bias)


def _device(u):
    return torch.cuda.device(u.device) if u.is_cuda else contextlib.nullcontext()


def _check(u, delta, A, B, C, D, z, delta_bias, out_add=None):
    """The scan's input checks (ValueError), made before anything launches."""
    Bsz, Dim, L = u.shape
    N = A.shape[1]
    if delta.shape != u.shape or (z is not None and z.shape != u.shape) or \
            (out_add is not None and out_add.shape != u.shape):
        raise ValueError("u, delta, z and out_add must all be (B, D, L)")
    if A.shape != (Dim, N) or A.is_complex():
        raise ValueError(f"A must be a real (D, N) = ({Dim}, N) tensor, got {tuple(A.shape)} {A.dtype}")
    if N > LANES:
        raise ValueError(f"at most {LANES} states, got {N}")
    if B.shape != (Bsz, N, L) or C.shape != (Bsz, N, L):
        raise ValueError(f"B and C must be (B, N, L) = ({Bsz}, {N}, {L})")
    if (D is not None and D.shape != (Dim,)) or (delta_bias is not None and delta_bias.shape != (Dim,)):
        raise ValueError(f"D and delta_bias must be ({Dim},)")
    if Bsz > 65535:  # the batch is the second grid axis
        raise ValueError(f"batch {Bsz} is above 65535; split it")


def _listed(grads, like):
    """Gradients as a custom op returns them: a list of tensors, an absent one as an empty tensor."""
    return [like.new_empty(0) if g is None else g for g in grads]


def _given(grads, inputs):
    """A custom op's listed gradients back for autograd: None for the inputs that were absent."""
    return tuple(None if x is None else g for g, x in zip(grads, inputs))


def scan_op(name, forward, backward):
    """-> a selective scan function (``selective_scan_triton``'s signature and checks) running ``forward`` and
    ``backward`` (``_forward``'s and ``_backward_buffers``'s signatures) as the custom ops vim::<name>_fwd and _bwd,
    so that torch.compile treats them as opaque calls and autograd knows the backward. The backward's buffers are
    finished (_finish) outside the op, where torch.compile fuses that work."""
    def fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
            delta_bias: Optional[Tensor], delta_softplus: bool, reverse: bool, out_add: Optional[Tensor],
            out_scale: float) -> Tensor:
        with _device(u):
            return forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, out_add, out_scale)

    def bwd(dout: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
            z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool, reverse: bool,
            out_scale: float) -> List[Tensor]:
        with _device(u):
            buffers = backward(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, out_scale)
        return _listed(buffers, u)

    fwd_op = torch.library.custom_op(f"vim::{name}_fwd", fwd, mutates_args=())
    bwd_op = torch.library.custom_op(f"vim::{name}_bwd", bwd, mutates_args=())

    @fwd_op.register_fake
    def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, out_add, out_scale):
        return _empty_like_bdl(u)

    @bwd_op.register_fake
    def _(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, out_scale):
        Bsz, _, L = u.shape
        dBC = torch.empty(2, Bsz, L, A.shape[1], dtype=torch.float32, device=u.device)
        return _listed((_empty_like_bdl(u), _empty_like_bdl(delta), None if z is None else _empty_like_bdl(z), dBC,
                        *_partials(u, A)), u)

    def setup_context(ctx, inputs, output):
        *tensors, ctx.delta_softplus, ctx.reverse, out_add, ctx.out_scale = inputs
        ctx.has_add = out_add is not None
        ctx.save_for_backward(*tensors)

    def scan_backward(ctx, dout):
        u, delta, A, B, C, D, z, delta_bias = inputs = ctx.saved_tensors
        buffers = bwd_op(dout, u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, ctx.reverse, ctx.out_scale)
        grads = _finish(*buffers, A, B, C, D, delta_bias)
        # out_add's gradient is dout itself: passed on, not copied
        return (*_given(grads, inputs), None, None, dout if ctx.has_add else None, None)

    fwd_op.register_autograd(scan_backward, setup_context=setup_context)

    def scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, reverse=False,
             out_scale=1.0, out_add=None):
        _check(u, delta, A, B, C, D, z, delta_bias, out_add)
        return fwd_op(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), bool(reverse), out_add,
                      float(out_scale))

    scan.__doc__ = f"""Selective scan with mamba-ssm's ``selective_scan_fn`` signature (shapes and semantics in
    models/scan_triton.py's docstring) and the output epilogue ``out_scale * out + out_add``, by the {name} kernels.
    Differentiable w.r.t. u, delta, A, B, C, D, z, delta_bias and out_add. Returns (B, D, L) in u's dtype, stored
    (B, L, D)-contiguous when u's channels are contiguous (a ``.transpose(1, 2)`` view), else contiguous."""
    return scan


selective_scan_triton = scan_op("selective_scan", _forward, _backward_buffers)


# ------------------------------------------------------------------------------------------------ the scan pair

def _pair_forward(u_f, dt_f, A_f, B_f, C_f, D_f, bias_f, u_b, dt_b, A_b, B_b, C_b, D_b, bias_b, z, delta_softplus):
    """The mixer's two scans: the forward direction's output halved (a temporary), then the backward direction's
    (reverse) halved and added to it."""
    y_f = _forward(u_f, dt_f, A_f, B_f, C_f, D_f, z, bias_f, delta_softplus, False, None, 0.5)
    return _forward(u_b, dt_b, A_b, B_b, C_b, D_b, z, bias_b, delta_softplus, True, y_f, 0.5)


def _pair_backward(dout, u_f, dt_f, A_f, B_f, C_f, D_f, bias_f, u_b, dt_b, A_b, B_b, C_b, D_b, bias_b, z,
                   delta_softplus):
    """Both directions' backwards, the same dout for both (each halves it as it reads it): the backward direction's
    first, which writes dz, then the forward direction's, which adds its own dz into that buffer as it stores it.
    -> the kernels' buffers, which _pair_grads finishes: each direction's du, ddelta and per-batch dA, dD and dbias,
    then dz, and both directions' dB and dC in one buffer (2, 2, B, L, N), zeroed by one launch."""
    Bsz, _, L = u_f.shape
    dBC = torch.zeros(2, 2, Bsz, L, A_f.shape[1], dtype=torch.float32, device=z.device)
    du_b, ddt_b, dz, _, dA_b, dD_b, dbias_b = _backward_buffers(dout, u_b, dt_b, A_b, B_b, C_b, D_b, z, bias_b,
                                                                delta_softplus, True, 0.5, dBC=dBC[1])
    du_f, ddt_f, _, _, dA_f, dD_f, dbias_f = _backward_buffers(dout, u_f, dt_f, A_f, B_f, C_f, D_f, z, bias_f,
                                                               delta_softplus, False, 0.5, dz_out=dz, dBC=dBC[0])
    return [du_f, ddt_f, dA_f, dD_f, dbias_f, du_b, ddt_b, dA_b, dD_b, dbias_b, dz, dBC]


@torch.library.custom_op("vim::selective_scan_pair_fwd", mutates_args=())
def _pair_fwd_op(u_f: Tensor, dt_f: Tensor, A_f: Tensor, B_f: Tensor, C_f: Tensor, D_f: Optional[Tensor],
                 bias_f: Optional[Tensor], u_b: Tensor, dt_b: Tensor, A_b: Tensor, B_b: Tensor, C_b: Tensor,
                 D_b: Optional[Tensor], bias_b: Optional[Tensor], z: Tensor, delta_softplus: bool) -> Tensor:
    with _device(z):
        return _pair_forward(u_f, dt_f, A_f, B_f, C_f, D_f, bias_f, u_b, dt_b, A_b, B_b, C_b, D_b, bias_b, z,
                             delta_softplus)


@torch.library.custom_op("vim::selective_scan_pair_bwd", mutates_args=())
def _pair_bwd_op(dout: Tensor, u_f: Tensor, dt_f: Tensor, A_f: Tensor, B_f: Tensor, C_f: Tensor,
                 D_f: Optional[Tensor], bias_f: Optional[Tensor], u_b: Tensor, dt_b: Tensor, A_b: Tensor, B_b: Tensor,
                 C_b: Tensor, D_b: Optional[Tensor], bias_b: Optional[Tensor], z: Tensor,
                 delta_softplus: bool) -> List[Tensor]:
    with _device(z):
        return _pair_backward(dout, u_f, dt_f, A_f, B_f, C_f, D_f, bias_f, u_b, dt_b, A_b, B_b, C_b, D_b, bias_b, z,
                              delta_softplus)


@_pair_fwd_op.register_fake
def _(u_f, dt_f, A_f, B_f, C_f, D_f, bias_f, u_b, dt_b, A_b, B_b, C_b, D_b, bias_b, z, delta_softplus):
    return _empty_like_bdl(u_b)  # (the second scan's output)


@_pair_bwd_op.register_fake
def _(dout, u_f, dt_f, A_f, B_f, C_f, D_f, bias_f, u_b, dt_b, A_b, B_b, C_b, D_b, bias_b, z, delta_softplus):
    Bsz, _, L = u_f.shape
    dBC = torch.empty(2, 2, Bsz, L, A_f.shape[1], dtype=torch.float32, device=z.device)
    return [_empty_like_bdl(u_f), _empty_like_bdl(dt_f), *_partials(u_f, A_f), _empty_like_bdl(u_b),
            _empty_like_bdl(dt_b), *_partials(u_b, A_b), _empty_like_bdl(z), dBC]


def _pair_setup_context(ctx, inputs, output):
    *tensors, ctx.delta_softplus = inputs
    ctx.save_for_backward(*tensors)  # the inputs, as the two single scans save them (z once, as shared there)


def _pair_grads(ctx, dout):
    """The pair's gradients: the op's kernels, then their buffers finished (_finish) outside it, where torch.compile
    traces and fuses the sums, transposes and casts."""
    u_f, dt_f, A_f, B_f, C_f, D_f, bias_f, u_b, dt_b, A_b, B_b, C_b, D_b, bias_b, z = tensors = ctx.saved_tensors
    du_f, ddt_f, dA_f, dD_f, dbias_f, du_b, ddt_b, dA_b, dD_b, dbias_b, dz, dBC = _pair_bwd_op(
        dout, *tensors, ctx.delta_softplus)
    grads_f = _finish(du_f, ddt_f, dz, dBC[0], dA_f, dD_f, dbias_f, A_f, B_f, C_f, D_f, bias_f)
    grads_b = _finish(du_b, ddt_b, dz, dBC[1], dA_b, dD_b, dbias_b, A_b, B_b, C_b, D_b, bias_b)
    # the inputs' order: each direction's u, delta, A, B, C, D, delta_bias, then z (both directions' dz, summed)
    return (*grads_f[:6], grads_f[7], *grads_b[:6], grads_b[7], dz, None)


_pair_fwd_op.register_autograd(_pair_grads, setup_context=_pair_setup_context)


def selective_scan_pair_triton(u_f, dt_f, A_f, B_f, C_f, D_f, bias_f, u_b, dt_b, A_b, B_b, C_b, D_b, bias_b, z,
                               delta_softplus=True):
    """Vim's two scan directions over one gate z as one op: the mixer's

        y = selective_scan_triton(u_f, dt_f, A_f, B_f, C_f, D_f, z, bias_f, delta_softplus, out_scale=0.5)
        y = selective_scan_triton(u_b, dt_b, A_b, B_b, C_b, D_b, z, bias_b, delta_softplus, reverse=True,
                                  out_scale=0.5, out_add=y)

    by the same kernels (D and delta_bias may be None). Differentiable w.r.t. every tensor input, with the two calls'
    gradients, z's summed over the directions by the second backward's kernel as it stores it (module docstring): in
    16-bit z, rounded once, not once per direction and again for the sum. Returns (B, D, L) laid out as
    selective_scan_triton lays out its output."""
    if z is None:
        raise ValueError("the scan pair needs z (its backward adds the directions' gradients of z)")
    for u, delta, A, B, C, D, delta_bias in ((u_f, dt_f, A_f, B_f, C_f, D_f, bias_f),
                                             (u_b, dt_b, A_b, B_b, C_b, D_b, bias_b)):
        _check(u, delta, A, B, C, D, z, delta_bias)
    return _pair_fwd_op(u_f, dt_f, A_f, B_f, C_f, D_f, bias_f, u_b, dt_b, A_b, B_b, C_b, D_b, bias_b, z,
                        bool(delta_softplus))

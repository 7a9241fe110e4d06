"""The selective scan in Triton with later steps' loads in flight while a step computes (``--scan triton_prefetch``).

Same signature, semantics, work split and arithmetic as ``models.scan_triton`` (whose docstring describes them); what
differs is only how the data reaches the registers. Nsight Compute found the current kernels waiting on their loads
(docs/SPEED.md): the forward two thirds of the time, the backward 42%, because each step's or chunk's loads are
issued just before they are needed and the backward has no registers left to issue them earlier. Here:

* B_t and C_t, the same for every lane, are loaded spread over the lanes: lane l holds 32-bit word l mod W of step
  l div W (W words a step: 8 for 16 bf16 states), so one register per lane holds 32 / W steps' worth, where today's
  kernel holds W registers a step. A step's words reach every lane by warp shuffles (``_word``).
* The registers that frees hold the next group's loads: the forward loads GROUP steps at once, one group ahead; the
  backward's pass 2 loads the next chunk (its stored state, u, delta, dout, z, B, C) before it computes this one, as
  pass 1 already did.

This is a candidate for replacing ``models.scan_triton``: ``--scan triton`` stays the default until this one beats it
at every measured shape (``tools/scan_ab.py``).
"""
import triton
import triton.language as tl

import models.scan_triton as st
from models.scan_triton import (_adjoint_step, _clamped, _delta, _gate_back, _setup, _sigmoid, _sum_over_lanes,
                                scan_op)

CHUNK = 3  # backward: steps whose states stay in registers together (as models.scan_triton's)
GROUP = 4  # forward: steps loaded together, one group ahead


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
    """Per step of t0 .. t0+K-1 (clamped to the sequence): (u, delta, z, output gradient) as stored, from per-lane
    pointers; z and the gradient are u's value where absent (never used then)."""
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
def _fwd_kernel(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr,
                Dim, L,
                s_ub, s_ud, s_ul, s_tb, s_td, s_tl, s_Ad, s_An, s_Bb, s_Bn, s_Bl, s_Cb, s_Cn, s_Cl,
                s_zb, s_zd, s_zl, s_ob, s_od, s_ol,
                N: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                PACKED: tl.constexpr, GROUP: tl.constexpr):
    pid_b = tl.program_id(1).to(tl.int64)
    lane = tl.arange(0, BLOCK_D)
    offs_d = tl.program_id(0) * BLOCK_D + lane
    mask_d = offs_d < Dim
    offs_c = tl.minimum(offs_d, Dim - 1)  # channels past Dim read the last one's data, with delta 0
    A2, bias, Dv = _setup(A_ptr, D_ptr, bias_ptr, s_Ad, s_An, offs_d, mask_d, N, BLOCK_N, HAS_D, HAS_BIAS)
    u_ptr += pid_b * s_ub + offs_c * s_ud  # per-lane pointers: the loads below add only the step's offset
    dt_ptr += pid_b * s_tb + offs_c * s_td
    z_ptr += pid_b * s_zb + offs_c * s_zd
    B_ptr += pid_b * s_Bb
    C_ptr += pid_b * s_Cb
    out_ptr += pid_b * s_ob
    h = ()
    for n in tl.static_range(BLOCK_N):
        h = h + (tl.zeros((BLOCK_D,), tl.float32),)
    nxt = (_lane_loads(u_ptr, dt_ptr, z_ptr, u_ptr, 0, L, s_ul, s_tl, s_zl, 0, GROUP, HAS_Z, False, REVERSE),
           _spread(B_ptr, s_Bl, s_Bn, 0, L, lane, GROUP, N, BLOCK_N, PACKED, REVERSE),
           _spread(C_ptr, s_Cl, s_Cn, 0, L, lane, GROUP, N, BLOCK_N, PACKED, REVERSE))
    for g in range(0, tl.cdiv(L, GROUP)):
        cur = nxt
        t0 = (g + 1) * GROUP  # the next group's loads go out before this group computes
        nxt = (_lane_loads(u_ptr, dt_ptr, z_ptr, u_ptr, t0, L, s_ul, s_tl, s_zl, 0, GROUP, HAS_Z, False,
                           REVERSE),
               _spread(B_ptr, s_Bl, s_Bn, t0, L, lane, GROUP, N, BLOCK_N, PACKED, REVERSE),
               _spread(C_ptr, s_Cl, s_Cn, t0, L, lane, GROUP, N, BLOCK_N, PACKED, REVERSE))
        steps = cur[0]
        for k in tl.static_range(GROUP):
            t = g * GROUP + k
            live = t < L
            p = _clamped(t, L, REVERSE)
            u_r = steps[k][0]
            dt_r = steps[k][1]
            z_r = steps[k][2]
            u = u_r.to(tl.float32)
            dt, _ = _delta(dt_r, bias, mask_d & live, SOFTPLUS)  # 0 past the sequence: the state stays
            Bt = _step_bc(cur[1], k, BLOCK_D, BLOCK_N, PACKED)
            Ct = _step_bc(cur[2], k, BLOCK_D, BLOCK_N, PACKED)
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
            tl.store(out_ptr + p * s_ol + offs_d * s_od, y.to(out_ptr.dtype.element_ty), mask=mask_d & live)


@triton.jit
def _bwd_kernel(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr,
                du_ptr, ddt_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, ck_ptr,
                Dim, L,
                s_ub, s_ud, s_ul, s_tb, s_td, s_tl, s_Ad, s_An, s_Bb, s_Bn, s_Bl, s_Cb, s_Cn, s_Cl,
                s_zb, s_zd, s_zl, s_ob, s_od, s_ol,
                s_dub, s_dud, s_dul, s_dtb, s_dtd, s_dtl, s_dzb, s_dzd, s_dzl,
                N: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                LOG2N: tl.constexpr, CHUNK: tl.constexpr, PACKED: tl.constexpr):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    lane = tl.arange(0, BLOCK_D)
    offs_d = pid_d * BLOCK_D + lane
    mask_d = offs_d < Dim
    offs_c = tl.minimum(offs_d, Dim - 1)  # channels past Dim read the last one's data, with delta 0
    A2, bias, Dv = _setup(A_ptr, D_ptr, bias_ptr, s_Ad, s_An, offs_d, mask_d, N, BLOCK_N, HAS_D, HAS_BIAS)
    u_ptr += pid_b * s_ub + offs_c * s_ud  # per-lane pointers: the loads below add only the step's offset
    dt_ptr += pid_b * s_tb + offs_c * s_td
    z_ptr += pid_b * s_zb + offs_c * s_zd
    dout_ptr += pid_b * s_ob + offs_c * s_od
    B_ptr += pid_b * s_Bb
    C_ptr += pid_b * s_Cb
    du_ptr += pid_b * s_dub
    ddt_ptr += pid_b * s_dtb
    dz_ptr += pid_b * s_dzb
    dB_ptr += pid_b * L * N
    dC_ptr += pid_b * L * N
    n_chunks = tl.cdiv(L, CHUNK)
    SLOT: tl.constexpr = BLOCK_N * BLOCK_D
    ck_ptr += (pid_b * tl.num_programs(0) + pid_d) * (n_chunks - 1) * SLOT

    # Pass 1: the state at the end of every chunk but the last; the next chunk's loads go out before this one's
    # state is computed and stored.
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
        steps = cur[0]
        for k in tl.static_range(CHUNK):
            dt, _ = _delta(steps[k][1], bias, mask_d, SOFTPLUS)  # every step of these chunks is in the sequence
            Bt = _step_bc(cur[1], k, BLOCK_D, BLOCK_N, PACKED)
            dtu = dt * steps[k][0].to(tl.float32)
            nh = ()
            for n in tl.static_range(BLOCK_N):
                nh = nh + (tl.exp2(dt * A2[n]) * h[n] + Bt[n] * dtu,)
            h = nh
        for n in tl.static_range(BLOCK_N):
            tl.store(ck_ptr + c * SLOT + n * BLOCK_D + lane, h[n])

    # Pass 2: chunks from last to first; the next one's stored state and loads go out before this one computes.
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
    c = n_chunks - 1
    h0 = ()
    for n in tl.static_range(BLOCK_N):
        h0 = h0 + (tl.load(ck_ptr + tl.maximum(c - 1, 0) * SLOT + n * BLOCK_D + lane, mask=c > 0, other=0.0),)
    nxt = (h0,
           _lane_loads(u_ptr, dt_ptr, z_ptr, dout_ptr, c * CHUNK, L, s_ul, s_tl, s_zl, s_ol, CHUNK, HAS_Z,
                       True, REVERSE),
           _spread(B_ptr, s_Bl, s_Bn, c * CHUNK, L, lane, CHUNK, N, BLOCK_N, PACKED, REVERSE),
           _spread(C_ptr, s_Cl, s_Cn, c * CHUNK, L, lane, CHUNK, N, BLOCK_N, PACKED, REVERSE))
    for i in range(0, n_chunks):
        c = n_chunks - 1 - i
        cur = nxt
        cn = tl.maximum(c - 1, 0)  # (at the first chunk this reloads it: harmless, unused)
        h0 = ()
        for n in tl.static_range(BLOCK_N):
            h0 = h0 + (tl.load(ck_ptr + tl.maximum(cn - 1, 0) * SLOT + n * BLOCK_D + lane, mask=cn > 0, other=0.0),)
        nxt = (h0,
               _lane_loads(u_ptr, dt_ptr, z_ptr, dout_ptr, cn * CHUNK, L, s_ul, s_tl, s_zl, s_ol, CHUNK,
                           HAS_Z, True, REVERSE),
               _spread(B_ptr, s_Bl, s_Bn, cn * CHUNK, L, lane, CHUNK, N, BLOCK_N, PACKED, REVERSE),
               _spread(C_ptr, s_Cl, s_Cn, cn * CHUNK, L, lane, CHUNK, N, BLOCK_N, PACKED, REVERSE))
        ld = cur[1]
        h = cur[0]
        hs = (h,)  # hs[k] = h_{t-1} of the chunk's k-th step t, hs[k + 1] = h_t
        kept = ()  # each step's u, delta and delta + bias (fp32), kept for the way back
        for k in tl.static_range(CHUNK):
            m_d = mask_d & (c * CHUNK + k < L)
            u = ld[k][0].to(tl.float32)
            dt, x = _delta(ld[k][1], bias, m_d, SOFTPLUS)
            Bt = _step_bc(cur[2], k, BLOCK_D, BLOCK_N, PACKED)
            dtu = dt * u
            nh = ()
            for n in tl.static_range(BLOCK_N):
                nh = nh + (tl.exp2(dt * A2[n]) * h[n] + Bt[n] * dtu,)
            h = nh
            hs = hs + (h,)
            kept = kept + ((u, dt, x),)
        for k in tl.static_range(CHUNK - 1, -1, -1):
            t = c * CHUNK + k
            p = _clamped(t, L, REVERSE)
            live = t < L
            m_d = mask_d & live
            u, dt, x = kept[k]
            Bt = _step_bc(cur[2], k, BLOCK_D, BLOCK_N, PACKED)
            Ct = _step_bc(cur[3], k, BLOCK_D, BLOCK_N, PACKED)
            dy = tl.where(m_d, ld[k][3].to(tl.float32), 0.0)  # 0 past the sequence: such a step passes g through
            if HAS_Z:
                dz, dy = _gate_back(dy, ld[k][2], u, Ct, hs[k + 1], Dv, BLOCK_N)
                tl.store(dz_ptr + p * s_dzl + offs_d * s_dzd, dz.to(dz_ptr.dtype.element_ty), mask=m_d)
            du, ddt, q, dA_acc, dBp, dCp = _adjoint_step(u, dt, x, dy, Bt, Ct, hs[k], hs[k + 1], q, dA_acc, A2, Dv,
                                                         zero, m_d, BLOCK_N, SOFTPLUS)
            if HAS_D:
                dD_acc += dy * u
            dbias_acc += ddt
            tl.store(du_ptr + p * s_dul + offs_d * s_dud, du.to(du_ptr.dtype.element_ty), mask=m_d)
            tl.store(ddt_ptr + p * s_dtl + offs_d * s_dtd, ddt.to(ddt_ptr.dtype.element_ty), mask=m_d)
            # dB_t and dC_t: sums over the channels, scattered over the lanes, added to what other blocks add
            m_s = lead & live
            tl.atomic_add(dB_ptr + p * N + state, _sum_over_lanes(dBp, lane, LOG2N), mask=m_s, sem="relaxed")
            tl.atomic_add(dC_ptr + p * N + state, _sum_over_lanes(dCp, lane, LOG2N), mask=m_s, sem="relaxed")

    for n in tl.static_range(BLOCK_N):
        tl.store(dA_ptr + pid_b * N * Dim + n * Dim + offs_d, dA_acc[n], mask=mask_d & (n < N))
    tl.store(dD_ptr + pid_b * Dim + offs_d, dD_acc, mask=mask_d)
    tl.store(dbias_ptr + pid_b * Dim + offs_d, dbias_acc, mask=mask_d)


# ------------------------------------------------------------------------------------------------ launches
# The arguments are models.scan_triton's; only the compile-time constants differ.

def _forward_launch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse):
    grid, args, meta, out = st._forward_launch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)
    return grid, args, dict(meta, GROUP=GROUP), out


def _backward_launch(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse):
    grid, args, meta, buffers = st._backward_launch(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                                    reverse, chunk=CHUNK)
    meta = {k: v for k, v in meta.items() if k != "PREFETCH"}  # this kernel always loads a chunk ahead
    return grid, args, meta, buffers


def _forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse):
    grid, args, meta, out = _forward_launch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)
    _fwd_kernel[grid](*args, **meta)
    return out


def _backward(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse):
    grid, args, meta, buffers = _backward_launch(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)
    _bwd_kernel[grid](*args, **meta)
    return st._reduce_partials(buffers, A, B, C, D, delta_bias)


selective_scan_triton_prefetch = scan_op("selective_scan_prefetch", _forward, _backward)

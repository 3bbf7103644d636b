"""Triton backward of the fused read-out (see readout_fwd.py for the forward).

With ``w`` the softmax weights over {online} + kept segments, ``r_i = scale q S_i``,
``agg = w_0 o + sum_i w_i r_i`` and ``y = o + a (agg - o)``, for an upstream ``dy``:

    dagg = a dy                      do    = (1 - a) dy + w_0 dagg
    dw_i = <dagg, r_i>               dl_i  = w_i (dw_i - <dagg, agg>)   (softmax)
    dq   = scale sum_i w_i S_i dagg  dS_i  = scale sum_t w_ti q_t dagg_t^T
    du   = g (dl_0 op + sum_i dl_i P_i)   dP_i = g sum_t dl_ti u_t   dop = g dl_0 u
    dg   = dl_0 <u, op> + sum_i dl_i <u, P_i>                     da = <dy, agg - o>
    db   = dl_0   (b the online bias, in the online logit l_0 = g <u, op> + b)

Residual has w = 1 and no gate terms. SSC's selection is piecewise constant: gradients
flow through the kept segments only. Two kernels, so that nothing needs atomics:

- ``token`` kernel, one program per (token block, batch*head): dq, do, du, dop and
  per-block partials of dg and db (summed over blocks and batch by the caller);
- ``state`` kernel, one program per (cached segment, batch*head): loops over the token
  blocks that can see the segment and accumulates dS_i and dP_i.
Both keep the whole value width in one tile (dl_i needs <dagg, r_i> over all of V).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _weights(nvis, mask_t, i, li, lse, thr, AGG: tl.constexpr, PREFIX: tl.constexpr):
    """Weight of cached state i for each token of the block (0 where not read)."""
    if AGG == 0:
        if PREFIX:
            w = tl.where(mask_t & (nvis - 1 == i), 1.0, 0.0)
        else:
            w = tl.where(mask_t & (i < nvis), 1.0, 0.0)
    else:
        keep = mask_t & (i < nvis) & (li >= thr)
        w = tl.where(keep, tl.exp(li - lse), 0.0)
    return w


@triton.jit
def readout_bwd_token_kernel(
    q_ptr, s_ptr, o_ptr, u_ptr, p_ptr, op_ptr, nv_ptr, gs_ptr, mix_ptr, ob_ptr,
    dy_ptr, agg_ptr, lse_ptr, thr_ptr,
    dq_ptr, do_ptr, du_ptr, dop_ptr, dg_ptr, db_ptr,
    T, H, G, K, V, U, NTB,
    sq_b, sq_t, sq_h, sq_k,
    ss_b, ss_n, ss_h, ss_k, ss_v,
    so_b, so_t, so_h, so_v,
    su_b, su_t, su_h, su_u,
    sp_b, sp_n, sp_h, sp_u,
    sop_b, sop_t, sop_h, sop_u,
    scale,
    AGG: tl.constexpr, PREFIX: tl.constexpr, DOT_PREC: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BU: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hq = h // G

    offs_t = pid_t * BT + tl.arange(0, BT)
    offs_k = tl.arange(0, BK)
    offs_v = tl.arange(0, BV)
    offs_u = tl.arange(0, BU)
    mask_t = offs_t < T
    mask_k = offs_k < K
    mask_v = offs_v < V
    mask_u = offs_u < U
    mask_tv = mask_t[:, None] & mask_v[None, :]

    nvis = tl.load(nv_ptr + offs_t, mask=mask_t, other=0).to(tl.int32)
    n_hi = tl.max(nvis, 0)
    q = tl.load(q_ptr + b * sq_b + offs_t[:, None] * sq_t + hq * sq_h + offs_k[None, :] * sq_k,
                mask=mask_t[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
    o = tl.load(o_ptr + b * so_b + offs_t[:, None] * so_t + h * so_h + offs_v[None, :] * so_v,
                mask=mask_tv, other=0.0).to(tl.float32)
    # dy, dq, do, du, dop: contiguous [B, T, H, X]
    dy = tl.load(dy_ptr + ((b * T + offs_t[:, None]) * H + h) * V + offs_v[None, :], mask=mask_tv, other=0.0)
    dy = dy.to(tl.float32)
    a = tl.load(mix_ptr + h).to(tl.float32)
    dagg = a * dy
    s_base = s_ptr + b * ss_b + h * ss_h + offs_k[:, None] * ss_k + offs_v[None, :] * ss_v
    mask_s = mask_k[:, None] & mask_v[None, :]
    dq = tl.zeros([BT, BK], dtype=tl.float32)

    if AGG == 0:
        w0 = tl.full([BT], 1.0, tl.float32)
        lo = 0
        if PREFIX:
            lo = tl.maximum(tl.min(tl.where(mask_t, nvis, n_hi), 0), 1) - 1
        for i in range(lo, n_hi):
            w = _weights(nvis, mask_t, i, w0, w0, w0, AGG, PREFIX)
            S = tl.load(s_base + i * ss_n, mask=mask_s, other=0.0).to(tl.float32)
            dq += tl.dot(dagg * w[:, None], tl.trans(S), input_precision=DOT_PREC)
    else:
        g = tl.load(gs_ptr + h).to(tl.float32)
        u = tl.load(u_ptr + b * su_b + offs_t[:, None] * su_t + h * su_h + offs_u[None, :] * su_u,
                    mask=mask_t[:, None] & mask_u[None, :], other=0.0).to(tl.float32)
        opool = tl.load(op_ptr + b * sop_b + offs_t[:, None] * sop_t + h * sop_h + offs_u[None, :] * sop_u,
                        mask=mask_t[:, None] & mask_u[None, :], other=0.0).to(tl.float32)
        lse = tl.load(lse_ptr + pid_bh * T + offs_t, mask=mask_t, other=0.0)
        thr = tl.load(thr_ptr + pid_bh * T + offs_t, mask=mask_t, other=0.0)
        agg = tl.load(agg_ptr + (pid_bh * T + offs_t[:, None]) * V + offs_v[None, :], mask=mask_tv, other=0.0)
        dsum = tl.sum(dagg * agg, 1)  # <dagg, agg>
        d0 = tl.sum(u * opool, 1)
        w0 = tl.where(mask_t, tl.exp(d0 * g + tl.load(ob_ptr + h).to(tl.float32) - lse), 0.0)
        du = tl.zeros([BT, BU], dtype=tl.float32)
        dgacc = tl.zeros([BT], dtype=tl.float32)
        p_base = p_ptr + b * sp_b + h * sp_h
        for i in range(0, n_hi):
            p = tl.load(p_base + i * sp_n + offs_u * sp_u, mask=mask_u, other=0.0).to(tl.float32)
            di = tl.sum(u * p[None, :], 1)
            w = _weights(nvis, mask_t, i, di * g, lse, thr, AGG, PREFIX)
            if tl.max(w, 0) > 0.0:
                S = tl.load(s_base + i * ss_n, mask=mask_s, other=0.0).to(tl.float32)
                r = tl.dot(q, S, input_precision=DOT_PREC) * scale
                dl = w * (tl.sum(dagg * r, 1) - dsum)
                dq += tl.dot(dagg * w[:, None], tl.trans(S), input_precision=DOT_PREC)
                du += (dl * g)[:, None] * p[None, :]
                dgacc += dl * di
        # the online memory's gate logit is l0 = g d0 + online_bias
        dl0 = w0 * (tl.sum(dagg * o, 1) - dsum)
        du += (dl0 * g)[:, None] * opool
        dop = (dl0 * g)[:, None] * u
        dgacc += dl0 * d0
        offs_tu = ((b * T + offs_t[:, None]) * H + h) * U + offs_u[None, :]
        mask_tu = mask_t[:, None] & mask_u[None, :]
        tl.store(du_ptr + offs_tu, du, mask=mask_tu)
        tl.store(dop_ptr + offs_tu, dop, mask=mask_tu)
        tl.store(dg_ptr + pid_bh * NTB + pid_t, tl.sum(tl.where(mask_t, dgacc, 0.0), 0))
        tl.store(db_ptr + pid_bh * NTB + pid_t, tl.sum(tl.where(mask_t, dl0, 0.0), 0))  # dl0/db = 1

    dq = dq * scale
    tl.store(dq_ptr + ((b * T + offs_t[:, None]) * H + h) * K + offs_k[None, :], dq,
             mask=mask_t[:, None] & mask_k[None, :])
    do = (1.0 - a) * dy + w0[:, None] * dagg
    tl.store(do_ptr + ((b * T + offs_t[:, None]) * H + h) * V + offs_v[None, :], do, mask=mask_tv)


@triton.jit
def readout_bwd_state_kernel(
    q_ptr, s_ptr, u_ptr, p_ptr, nv_ptr, gs_ptr, mix_ptr,
    dy_ptr, agg_ptr, lse_ptr, thr_ptr,
    ds_ptr, dp_ptr,
    T, N, H, G, K, V, U,
    sq_b, sq_t, sq_h, sq_k,
    ss_b, ss_n, ss_h, ss_k, ss_v,
    su_b, su_t, su_h, su_u,
    sp_b, sp_n, sp_h, sp_u,
    scale,
    AGG: tl.constexpr, PREFIX: tl.constexpr, DOT_PREC: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BU: tl.constexpr,
):
    i = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hq = h // G

    offs_k = tl.arange(0, BK)
    offs_v = tl.arange(0, BV)
    offs_u = tl.arange(0, BU)
    mask_k = offs_k < K
    mask_v = offs_v < V
    mask_u = offs_u < U
    mask_s = mask_k[:, None] & mask_v[None, :]
    a = tl.load(mix_ptr + h).to(tl.float32)

    ds = tl.zeros([BK, BV], dtype=tl.float32)
    dp = tl.zeros([BU], dtype=tl.float32)
    if AGG != 0:
        g = tl.load(gs_ptr + h).to(tl.float32)
        S = tl.load(s_ptr + b * ss_b + i * ss_n + h * ss_h + offs_k[:, None] * ss_k + offs_v[None, :] * ss_v,
                    mask=mask_s, other=0.0).to(tl.float32)
        p = tl.load(p_ptr + b * sp_b + i * sp_n + h * sp_h + offs_u * sp_u, mask=mask_u, other=0.0).to(tl.float32)

    for t0 in range(0, T, BT):
        offs_t = t0 + tl.arange(0, BT)
        mask_t = offs_t < T
        nvis = tl.load(nv_ptr + offs_t, mask=mask_t, other=0).to(tl.int32)
        if tl.max(nvis, 0) > i:  # some token of this block can read segment i
            mask_tv = mask_t[:, None] & mask_v[None, :]
            q = tl.load(q_ptr + b * sq_b + offs_t[:, None] * sq_t + hq * sq_h + offs_k[None, :] * sq_k,
                        mask=mask_t[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + ((b * T + offs_t[:, None]) * H + h) * V + offs_v[None, :], mask=mask_tv,
                         other=0.0).to(tl.float32)
            dagg = a * dy
            if AGG == 0:
                none = tl.zeros([BT], dtype=tl.float32)  # no logits in residual mode
                w = _weights(nvis, mask_t, i, none, none, none, AGG, PREFIX)
                ds += tl.dot(tl.trans(q * w[:, None]), dagg, input_precision=DOT_PREC)
            else:
                u = tl.load(u_ptr + b * su_b + offs_t[:, None] * su_t + h * su_h + offs_u[None, :] * su_u,
                            mask=mask_t[:, None] & mask_u[None, :], other=0.0).to(tl.float32)
                lse = tl.load(lse_ptr + pid_bh * T + offs_t, mask=mask_t, other=0.0)
                thr = tl.load(thr_ptr + pid_bh * T + offs_t, mask=mask_t, other=0.0)
                li = tl.sum(u * p[None, :], 1) * g
                w = _weights(nvis, mask_t, i, li, lse, thr, AGG, PREFIX)
                if tl.max(w, 0) > 0.0:
                    agg = tl.load(agg_ptr + (pid_bh * T + offs_t[:, None]) * V + offs_v[None, :], mask=mask_tv,
                                  other=0.0)
                    r = tl.dot(q, S, input_precision=DOT_PREC) * scale
                    dl = w * (tl.sum(dagg * r, 1) - tl.sum(dagg * agg, 1))
                    ds += tl.dot(tl.trans(q * w[:, None]), dagg, input_precision=DOT_PREC)
                    dp += tl.sum(dl[:, None] * u, 0) * g

    # dS and dP: contiguous [B, N, H, K, V] (K-first whatever the input layout) and [B, N, H, U]
    tl.store(ds_ptr + (((b * N + i) * H + h) * K + offs_k[:, None]) * V + offs_v[None, :], ds * scale, mask=mask_s)
    if AGG != 0:
        tl.store(dp_ptr + ((b * N + i) * H + h) * U + offs_u, dp, mask=mask_u)

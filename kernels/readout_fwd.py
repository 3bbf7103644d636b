"""Triton forward of the fused Memory Caching read-out.

One program handles a block of ``BT`` tokens of one (batch, head) and a block of ``BV``
value columns. It loops over the cached states the block may read and never
materialises the per-segment reads ``[T, N, V]`` that the reference builds:

pass 1 (gated / ssc; only the pooled keys, U-wide, are read):
    gate logits ``l_i = gate_scale * <u_t, pooled_i>`` of every visible segment, the SSC
    threshold (k-th largest logit, kept in a tiny per-token top-k register array), and
    the softmax max ``m`` and denominator ``Z`` over {online} + kept segments, computed
    online (running max, rescaled sum).
pass 2 (the states, K x V each):
    ``acc += w_i * scale * (q @ S_i)`` with the final softmax weights ``w_i``, so the
    accumulator is never rescaled; under SSC a state no token of the block keeps is not
    loaded at all.

The weights are known before the heavy reads, so this is an online softmax over the
logits followed by one weighted accumulation: numerically the same as rescaling the
accumulator on the fly, with one multiply per state less.

Residual aggregation has weight 1 for every visible segment. With ``PREFIX`` the caller
passes prefix sums ``P_j = S_0 + ... + S_j`` and a token reads the single state
``P_{n_visible-1}``: one K x V read per distinct ``n_visible`` in the block instead of N.

SSC tie-breaking: every segment whose logit is >= the k-th largest visible logit is kept,
so exact ties at the threshold keep more than k segments (the reference does the same).
"""
from __future__ import annotations

import triton
import triton.language as tl

RESIDUAL, GATED, SSC = 0, 1, 2


@triton.jit
def _gate_logit(u_blk, p_ptr, offs_u, mask_u, g):
    """<u_t, pooled_i> * gate_scale for every token of the block: ``[BT]`` fp32."""
    p = tl.load(p_ptr + offs_u, mask=mask_u, other=0.0).to(tl.float32)
    return tl.sum(u_blk * p[None, :], 1) * g


@triton.jit
def readout_fwd_kernel(
    q_ptr, s_ptr, o_ptr, u_ptr, p_ptr, op_ptr, nv_ptr, gs_ptr, mix_ptr, ob_ptr,
    y_ptr, agg_ptr, lse_ptr, thr_ptr,
    T, H, G, K, V, U,
    sq_b, sq_t, sq_h, sq_k,
    ss_b, ss_n, ss_h, ss_k, ss_v,
    so_b, so_t, so_h, so_v,
    su_b, su_t, su_h, su_u,
    sp_b, sp_n, sp_h, sp_u,
    sop_b, sop_t, sop_h, sop_u,
    sy_b, sy_t, sy_h, sy_v,
    scale,
    AGG: tl.constexpr, TOP_K: tl.constexpr, TKP: tl.constexpr, PREFIX: tl.constexpr,
    SAVE: tl.constexpr, CAST_F32: tl.constexpr, DOT_PREC: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BU: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_v = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    hq = h // G  # head groups: G heads share one query head

    offs_t = pid_t * BT + tl.arange(0, BT)
    offs_k = tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    offs_u = tl.arange(0, BU)
    mask_t = offs_t < T
    mask_k = offs_k < K
    mask_v = offs_v < V
    mask_u = offs_u < U

    nvis = tl.load(nv_ptr + offs_t, mask=mask_t, other=0).to(tl.int32)
    n_hi = tl.max(nvis, 0)

    q = tl.load(q_ptr + b * sq_b + offs_t[:, None] * sq_t + hq * sq_h + offs_k[None, :] * sq_k,
                mask=mask_t[:, None] & mask_k[None, :], other=0.0)
    if CAST_F32:
        q = q.to(tl.float32)
    o = tl.load(o_ptr + b * so_b + offs_t[:, None] * so_t + h * so_h + offs_v[None, :] * so_v,
                mask=mask_t[:, None] & mask_v[None, :], other=0.0).to(tl.float32)
    s_base = s_ptr + b * ss_b + h * ss_h + offs_k[:, None] * ss_k + offs_v[None, :] * ss_v
    mask_s = mask_k[:, None] & mask_v[None, :]
    acc = tl.zeros([BT, BV], dtype=tl.float32)

    if AGG == 0:
        w0 = tl.full([BT], 1.0, tl.float32)
        if PREFIX:
            # a token with n visible segments reads P_{n-1} only
            n_lo = tl.min(tl.where(mask_t, nvis, n_hi), 0)
            for j in range(tl.maximum(n_lo, 1) - 1, n_hi):
                S = tl.load(s_base + j * ss_n, mask=mask_s, other=0.0)
                if CAST_F32:
                    S = S.to(tl.float32)
                r = tl.dot(q, S, input_precision=DOT_PREC) * scale
                acc += tl.where((nvis - 1 == j)[:, None], r, 0.0)
        else:
            for i in range(0, n_hi):
                S = tl.load(s_base + i * ss_n, mask=mask_s, other=0.0)
                if CAST_F32:
                    S = S.to(tl.float32)
                r = tl.dot(q, S, input_precision=DOT_PREC) * scale
                acc += tl.where((i < nvis)[:, None], r, 0.0)
    else:
        g = tl.load(gs_ptr + h).to(tl.float32)
        u = tl.load(u_ptr + b * su_b + offs_t[:, None] * su_t + h * su_h + offs_u[None, :] * su_u,
                    mask=mask_t[:, None] & mask_u[None, :], other=0.0).to(tl.float32)
        opool = tl.load(op_ptr + b * sop_b + offs_t[:, None] * sop_t + h * sop_h + offs_u[None, :] * sop_u,
                        mask=mask_t[:, None] & mask_u[None, :], other=0.0).to(tl.float32)
        l0 = tl.sum(u * opool, 1) * g + tl.load(ob_ptr + h).to(tl.float32)  # per-head online bias
        p_base = p_ptr + b * sp_b + h * sp_h
        thr = tl.full([BT], float("-inf"), tl.float32)
        if AGG == 2:
            # running top-k of the logits; padded columns hold +inf so they are never the min
            col = tl.arange(0, TKP)
            topv = tl.where(col[None, :] < TOP_K, float("-inf"), float("inf")) + tl.zeros([BT, TKP], tl.float32)
            for i in range(0, n_hi):
                li = _gate_logit(u, p_base + i * sp_n, offs_u * sp_u, mask_u, g)
                li = tl.where(i < nvis, li, float("-inf"))
                # the slot of the minimum takes max(minimum, candidate)
                cur = tl.min(topv, 1)
                amin = tl.argmin(topv, 1)
                topv = tl.where(col[None, :] == amin[:, None], tl.maximum(cur, li)[:, None], topv)
            thr = tl.min(topv, 1)
        # online softmax statistics over {online} + kept segments
        m = l0
        z = tl.full([BT], 1.0, tl.float32)
        for i in range(0, n_hi):
            li = _gate_logit(u, p_base + i * sp_n, offs_u * sp_u, mask_u, g)
            keep = (i < nvis) & (li >= thr)
            li = tl.where(keep, li, float("-inf"))
            m_new = tl.maximum(m, li)
            z = z * tl.exp(m - m_new) + tl.exp(li - m_new)
            m = m_new
        lse = m + tl.log(z)
        w0 = tl.exp(l0 - lse)
        for i in range(0, n_hi):
            li = _gate_logit(u, p_base + i * sp_n, offs_u * sp_u, mask_u, g)
            keep = (i < nvis) & (li >= thr)
            w = tl.where(keep, tl.exp(li - lse), 0.0)
            if tl.max(w, 0) > 0.0:  # SSC: a state no token of the block keeps is never loaded
                S = tl.load(s_base + i * ss_n, mask=mask_s, other=0.0)
                if CAST_F32:
                    S = S.to(tl.float32)
                r = tl.dot(q, S, input_precision=DOT_PREC) * scale
                acc += w[:, None] * r
        if SAVE:
            if pid_v == 0:
                tl.store(lse_ptr + pid_bh * T + offs_t, lse, mask=mask_t)
                tl.store(thr_ptr + pid_bh * T + offs_t, thr, mask=mask_t)

    agg = w0[:, None] * o + acc
    a = tl.load(mix_ptr + h).to(tl.float32)
    y = o + a * (agg - o)
    mask_o = mask_t[:, None] & mask_v[None, :]
    tl.store(y_ptr + b * sy_b + offs_t[:, None] * sy_t + h * sy_h + offs_v[None, :] * sy_v,
             y.to(y_ptr.dtype.element_ty), mask=mask_o)
    if SAVE:
        # agg in [B, H, T, V] fp32, for the backward
        tl.store(agg_ptr + (pid_bh * T + offs_t[:, None]) * V + offs_v[None, :], agg, mask=mask_o)

"""Decode step: one new token reads N cached states (inference only, no backward).

With one token the block-of-tokens kernel would leave most of a 16-row tile empty and
give only B*H programs, each streaming all N states. Here the work is split three ways
(flash-decoding style):

1. ``weights``: one program per (batch, head) computes the N gate logits in chunks of
   BN segments, the SSC threshold (a running top-k merged chunk by chunk), the softmax
   statistics, and writes the normalised weights ``[B*H, N]`` and the online weight;
2. ``reads``: one program per (batch*head, split of SPLIT segments) accumulates
   ``sum_i w_i scale q^T S_i`` over its split (matrix-vector, K in chunks) into a
   partial ``[B*H, NS, V]``; zero-weight states are skipped;
3. ``combine``: ``y = o + a (w_0 o + sum of partials - o)``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .readout_op import per_head


@triton.jit
def decode_weights_kernel(
    u_ptr, p_ptr, op_ptr, nv_ptr, gs_ptr, ob_ptr, w_ptr, w0_ptr,
    N, H, U,
    su_b, su_h, su_u, sp_b, sp_n, sp_h, sp_u, sop_b, sop_h, sop_u,
    AGG: tl.constexpr, TOP_K: tl.constexpr, TKP: tl.constexpr, BN: tl.constexpr, BU: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    nvis = tl.load(nv_ptr).to(tl.int32)
    offs_n = tl.arange(0, BN)
    offs_u = tl.arange(0, BU)
    mask_u = offs_u < U
    if AGG == 0:
        for n0 in range(0, N, BN):
            n = n0 + offs_n
            tl.store(w_ptr + pid * N + n, tl.where(n < nvis, 1.0, 0.0), mask=n < N)
        tl.store(w0_ptr + pid, 1.0)
    else:
        g = tl.load(gs_ptr + h).to(tl.float32)
        u = tl.load(u_ptr + b * su_b + h * su_h + offs_u * su_u, mask=mask_u, other=0.0).to(tl.float32)
        opool = tl.load(op_ptr + b * sop_b + h * sop_h + offs_u * sop_u, mask=mask_u, other=0.0).to(tl.float32)
        l0 = tl.sum(u * opool, 0) * g + tl.load(ob_ptr + h).to(tl.float32)  # per-head online bias
        thr = float("-inf")
        if AGG == 2:
            col = tl.arange(0, TKP)
            topv = tl.where(col < TOP_K, float("-inf"), float("inf"))
            for n0 in range(0, nvis, BN):
                n = n0 + offs_n
                mn = n < nvis
                p = tl.load(p_ptr + b * sp_b + n[:, None] * sp_n + h * sp_h + offs_u[None, :] * sp_u,
                            mask=mn[:, None] & mask_u[None, :], other=0.0).to(tl.float32)
                lc = tl.where(mn, tl.sum(p * u[None, :], 1) * g, float("-inf"))
                # merge the chunk's top-k into the running top-k (replace the minimum)
                for _ in range(TOP_K):
                    mx = tl.max(lc, 0)
                    lc = tl.where(offs_n == tl.argmax(lc, 0), float("-inf"), lc)
                    # the slot of the minimum takes max(minimum, candidate)
                    topv = tl.where(col == tl.argmin(topv, 0), tl.maximum(tl.min(topv, 0), mx), topv)
            thr = tl.min(topv, 0)
        m = l0
        z = l0 * 0.0 + 1.0
        for n0 in range(0, nvis, BN):
            n = n0 + offs_n
            mn = n < nvis
            p = tl.load(p_ptr + b * sp_b + n[:, None] * sp_n + h * sp_h + offs_u[None, :] * sp_u,
                        mask=mn[:, None] & mask_u[None, :], other=0.0).to(tl.float32)
            lc = tl.sum(p * u[None, :], 1) * g
            lc = tl.where(mn & (lc >= thr), lc, float("-inf"))
            m_new = tl.maximum(m, tl.max(lc, 0))
            z = z * tl.exp(m - m_new) + tl.sum(tl.exp(lc - m_new), 0)
            m = m_new
        lse = m + tl.log(z)
        for n0 in range(0, N, BN):
            n = n0 + offs_n
            mn = n < nvis
            p = tl.load(p_ptr + b * sp_b + n[:, None] * sp_n + h * sp_h + offs_u[None, :] * sp_u,
                        mask=mn[:, None] & mask_u[None, :], other=0.0).to(tl.float32)
            lc = tl.sum(p * u[None, :], 1) * g
            w = tl.where(mn & (lc >= thr), tl.exp(lc - lse), 0.0)
            tl.store(w_ptr + pid * N + n, w, mask=n < N)
        tl.store(w0_ptr + pid, tl.exp(l0 - lse))


@triton.jit
def decode_reads_kernel(
    q_ptr, s_ptr, w_ptr, part_ptr,
    N, H, G, K, V, NS,
    sq_b, sq_h, sq_k, ss_b, ss_n, ss_h, ss_k, ss_v,
    scale, SPLIT,
    BKC: tl.constexpr, BV: tl.constexpr,
):
    pid = tl.program_id(0)
    sid = tl.program_id(1)
    b = pid // H
    h = pid % H
    hq = h // G
    offs_k = tl.arange(0, BKC)
    offs_v = tl.arange(0, BV)
    mask_v = offs_v < V
    acc = tl.zeros([BV], dtype=tl.float32)
    for i in range(sid * SPLIT, tl.minimum(sid * SPLIT + SPLIT, N)):
        w = tl.load(w_ptr + pid * N + i)
        if w != 0.0:
            r = tl.zeros([BV], dtype=tl.float32)
            for k0 in range(0, K, BKC):
                kk = k0 + offs_k
                mk = kk < K
                qk = tl.load(q_ptr + b * sq_b + hq * sq_h + kk * sq_k, mask=mk, other=0.0).to(tl.float32)
                S = tl.load(s_ptr + b * ss_b + i * ss_n + h * ss_h + kk[:, None] * ss_k + offs_v[None, :] * ss_v,
                            mask=mk[:, None] & mask_v[None, :], other=0.0).to(tl.float32)
                r += tl.sum(qk[:, None] * S, 0)
            acc += w * r
    tl.store(part_ptr + (pid * NS + sid) * V + offs_v, acc * scale, mask=mask_v)


@triton.jit
def decode_combine_kernel(
    o_ptr, part_ptr, w0_ptr, mix_ptr, y_ptr,
    H, V, NS,
    so_b, so_h, so_v, sy_b, sy_h, sy_v,
    BV: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    offs_v = tl.arange(0, BV)
    mask_v = offs_v < V
    acc = tl.zeros([BV], dtype=tl.float32)
    for s in range(0, NS):
        acc += tl.load(part_ptr + (pid * NS + s) * V + offs_v, mask=mask_v, other=0.0)
    o = tl.load(o_ptr + b * so_b + h * so_h + offs_v * so_v, mask=mask_v, other=0.0).to(tl.float32)
    w0 = tl.load(w0_ptr + pid)
    a = tl.load(mix_ptr + h).to(tl.float32)
    agg = w0 * o + acc
    y = o + a * (agg - o)
    tl.store(y_ptr + b * sy_b + h * sy_h + offs_v * sy_v, y.to(y_ptr.dtype.element_ty), mask=mask_v)


def readout_decode(q, states, online, u, pooled, online_pool, n_visible, *, agg, top_k, scale, gate_scale, mix,
                   online_bias=0.0, layout="kv", split: int | None = None):
    """One token (T == 1): inputs as ``readout_triton`` (already checked; ``online_bias`` a
    float or ``[H]``); returns ``[B,1,H,V]``."""
    B, T, Hq, K = q.shape
    H, V = online.shape[2:]
    N = states.shape[1]
    U = u.shape[-1]
    assert T == 1, "decode path reads one token"
    dev = q.device
    w = torch.empty(B * H, N, device=dev, dtype=torch.float32)
    w0 = torch.empty(B * H, device=dev, dtype=torch.float32)
    BU = max(16, triton.next_power_of_2(U))
    decode_weights_kernel[(B * H,)](
        u, pooled, online_pool, n_visible, gate_scale, per_head(online_bias, H, dev), w, w0,
        N, H, U,
        u.stride(0), u.stride(2), u.stride(3), *pooled.stride(), online_pool.stride(0), online_pool.stride(2),
        online_pool.stride(3),
        AGG=agg, TOP_K=int(top_k), TKP=max(2, triton.next_power_of_2(max(1, top_k))), BN=16 if agg else 64, BU=BU,
    )
    if split is None:
        # enough programs to fill the GPU: about 4 per SM for B*H*NS programs
        sms = torch.cuda.get_device_properties(dev).multi_processor_count if q.is_cuda else 4
        split = max(1, min(N, triton.cdiv(B * H * N, 4 * sms)))
    ns = triton.cdiv(N, split)
    part = torch.empty(B * H, ns, V, device=dev, dtype=torch.float32)
    sb, sn, sh, s3, s4 = states.stride()
    sk, sv = (s3, s4) if layout == "kv" else (s4, s3)
    BV = max(16, triton.next_power_of_2(V))
    decode_reads_kernel[(B * H, ns)](
        q, states, w, part,
        N, H, H // Hq, K, V, ns,
        q.stride(0), q.stride(2), q.stride(3), sb, sn, sh, sk, sv,
        float(scale), int(split),
        BKC=min(32, max(16, triton.next_power_of_2(K))), BV=BV,
    )
    y = torch.empty_like(online)
    decode_combine_kernel[(B * H,)](
        online, part, w0, mix, y,
        H, V, ns,
        online.stride(0), online.stride(2), online.stride(3), y.stride(0), y.stride(2), y.stride(3),
        BV=BV,
    )
    return y

"""The Triton read-out as a differentiable op: argument checks, launches, autograd.

``readout_triton`` has exactly the signature of ``mc_retrofit.core.readout_reference``
(the oracle) plus two optional knobs. Gradients flow to q, states, online, u, pooled,
online_pool, gate_scale, mix and online_bias (the parameters gate-only fine-tuning trains are
mix = ``cache_weight``, the temperature inside gate_scale, ``online_bias`` and the connector
producing u).

Extensions over the reference:
- head groups: q may have ``Hq`` heads with ``H % Hq == 0``; head h reads with query
  head ``h // (H // Hq)`` (no ``repeat_interleave`` copy of the queries needed);
- residual aggregation through prefix sums of the states (one state read per token
  instead of N), chosen when the call has several token blocks.
"""
from __future__ import annotations

import os

import torch
import triton

from mc_retrofit.core import ReadInputs
from mc_retrofit.errors import MCError

from .readout_bwd import readout_bwd_state_kernel, readout_bwd_token_kernel
from .readout_fwd import readout_fwd_kernel

AGG_CODES = {"residual": 0, "gated": 1, "ssc": 2}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _p2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(x)))


def dot_precision(*tensors) -> str:
    """fp32 dots: TF32 tensor cores on GPU (10-bit mantissa, like the accumulation error
    of the bf16 model itself), exact IEEE under the interpreter. Override with
    ``MC_RETROFIT_DOT_PRECISION=ieee|tf32|tf32x3``."""
    env = os.environ.get("MC_RETROFIT_DOT_PRECISION")
    if env:
        return env
    return "ieee" if interpreting() else "tf32"


def per_head(value, H: int, device) -> torch.Tensor:
    """A float or ``[H]`` tensor as a contiguous fp32 ``[H]`` (the kernels load ``ptr + h``,
    so an expanded stride-0 view would read past its one element); differentiable."""
    t = torch.as_tensor(value, device=device)
    t = t.float() if t.dtype != torch.float32 else t
    return t.expand(H).contiguous() if t.dim() == 0 else t.contiguous()


def check_args(q, states, online, u, pooled, online_pool, n_visible, aggregation, top_k, gate_scale, mix, layout,
               online_bias=None):
    """Validate shapes; returns (B, T, H, Hq, N, K, V, U). Raises MCError (one line)."""
    if aggregation not in AGG_CODES:
        raise MCError(f"aggregation must be one of {', '.join(AGG_CODES)}, not {aggregation!r}")
    if layout not in ("kv", "vk"):
        raise MCError(f"layout must be 'kv' or 'vk', not {layout!r}")
    if q.dim() != 4 or online.dim() != 4:
        raise MCError(f"q and online must be [B,T,H,K] and [B,T,H,V], got {tuple(q.shape)} and {tuple(online.shape)}")
    B, T, Hq, K = q.shape
    H, V = online.shape[2], online.shape[3]
    if online.shape[:2] != (B, T) or H % Hq:
        raise MCError(f"online {tuple(online.shape)} does not match q {tuple(q.shape)} (heads must be a multiple of q's)")
    if states.dim() != 5 or states.shape[0] != B or states.shape[2] != H:
        raise MCError(f"states must be [B,N,H,K,V] or [B,N,H,V,K] with B={B}, H={H}, got {tuple(states.shape)}")
    kv = tuple(states.shape[3:]) if layout == "kv" else tuple(states.shape[3:])[::-1]
    if kv != (K, V):
        raise MCError(f"states {tuple(states.shape)} in layout {layout!r} do not hold [K={K}, V={V}] matrices")
    N = states.shape[1]
    if n_visible.shape != (T,):
        raise MCError(f"n_visible must be [T={T}], got {tuple(n_visible.shape)}")
    U = 1
    if aggregation != "residual":
        if u is None or pooled is None or online_pool is None:
            raise MCError(f"{aggregation} aggregation needs u, pooled and online_pool")
        U = u.shape[-1]
        if u.shape != (B, T, H, U) or online_pool.shape != (B, T, H, U) or pooled.shape != (B, N, H, U):
            raise MCError(
                f"gate inputs must be u/online_pool [B,T,H,U] and pooled [B,N,H,U]; got {tuple(u.shape)}, "
                f"{tuple(online_pool.shape)}, {tuple(pooled.shape)}")
        if aggregation == "ssc" and top_k < 1:
            raise MCError(f"top_k must be >= 1, not {top_k}")
    if max(K, V, U) > 256:
        raise MCError(f"the Triton read-out supports K, V, U <= 256, got K={K}, V={V}, U={U}")
    if gate_scale.numel() != H or mix.numel() != H:
        raise MCError(f"gate_scale and mix must have one value per head ({H})")
    if online_bias is not None and online_bias.numel() != H:
        raise MCError(f"online_bias must be a number or have one value per head ({H}), got {online_bias.numel()}")
    return B, T, H, Hq, N, K, V, U


def _state_strides(states, layout):
    sb, sn, sh, s3, s4 = states.stride()
    return (sb, sn, sh, s3, s4) if layout == "kv" else (sb, sn, sh, s4, s3)


def _gate_tensors(q, u, pooled, online_pool, aggregation):
    """Residual reads no gate input: pass q as a never-read placeholder."""
    if aggregation == "residual":
        dummy = q.new_zeros(1, 1, 1, 1)
        return dummy, dummy, dummy
    return u, pooled, online_pool


def launch_forward(q, states, online, u, pooled, online_pool, n_visible, gate_scale, mix, online_bias, *, agg, top_k,
                   scale, layout, prefix, save):
    B, T, Hq, K = q.shape
    H, V = online.shape[2:]
    N = states.shape[1]
    U = u.shape[-1]
    G = H // Hq
    BT = 16 if (interpreting() or T <= 16) else (32 if T <= 32 else 64)
    BV = _p2(V) if interpreting() else min(64, _p2(V))
    y = torch.empty_like(online)
    f32 = dict(device=q.device, dtype=torch.float32)
    agg_buf = torch.empty(B, H, T, V, **f32) if save else y
    lse = torch.empty(B, H, T, **f32) if save and agg else y
    thr = torch.empty(B, H, T, **f32) if save and agg else y
    tkp = max(2, triton.next_power_of_2(max(1, top_k)))
    # mixed or fp32 inputs: fp32 dot. Triton 3.9's interpreter computes bf16 x bf16 dots
    # wrongly (garbage magnitudes), so under the interpreter bf16 is cast as well.
    cast = q.dtype != states.dtype or q.dtype == torch.float32 or (interpreting() and q.dtype == torch.bfloat16)
    grid = (triton.cdiv(T, BT), B * H, triton.cdiv(V, BV))
    readout_fwd_kernel[grid](
        q, states, online, u, pooled, online_pool, n_visible, gate_scale, mix, online_bias,
        y, agg_buf, lse, thr,
        T, H, G, K, V, U,
        *q.stride(), *_state_strides(states, layout), *online.stride(), *u.stride(), *pooled.stride(),
        *online_pool.stride(), *y.stride(),
        float(scale),
        AGG=agg, TOP_K=int(top_k), TKP=tkp, PREFIX=bool(prefix), SAVE=bool(save), CAST_F32=cast,
        DOT_PREC=dot_precision(), BT=BT, BK=_p2(K), BV=BV, BU=_p2(U),
    )
    return y, agg_buf, lse, thr


def launch_backward(dy, q, states, online, u, pooled, online_pool, n_visible, gate_scale, mix, online_bias, agg_buf,
                    lse, thr, *, agg, scale, layout, prefix):
    B, T, Hq, K = q.shape
    H, V = online.shape[2:]
    N = states.shape[1]
    U = u.shape[-1]
    G = H // Hq
    BT = 16 if (interpreting() or T <= 16) else 32
    dy = dy.contiguous()
    f32 = dict(device=q.device, dtype=torch.float32)
    dq = torch.empty(B, T, H, K, **f32)
    do = torch.empty(B, T, H, V, **f32)
    du = torch.empty(B, T, H, U, **f32) if agg else dq
    dop = torch.empty(B, T, H, U, **f32) if agg else dq
    ntb = triton.cdiv(T, BT)
    dg = torch.zeros(B * H, ntb, **f32)
    db = torch.zeros(B * H, ntb, **f32)
    ds = torch.empty(B, N, H, K, V, **f32)
    dp = torch.empty(B, N, H, U, **f32) if agg else ds
    blocks = dict(BT=BT, BK=_p2(K), BV=_p2(V), BU=_p2(U))
    sstr = _state_strides(states, layout)
    prec = dot_precision()
    readout_bwd_token_kernel[(ntb, B * H)](
        q, states, online, u, pooled, online_pool, n_visible, gate_scale, mix, online_bias,
        dy, agg_buf, lse, thr,
        dq, do, du, dop, dg, db,
        T, H, G, K, V, U, ntb,
        *q.stride(), *sstr, *online.stride(), *u.stride(), *pooled.stride(), *online_pool.stride(),
        float(scale),
        AGG=agg, PREFIX=bool(prefix), DOT_PREC=prec, **blocks,
    )
    if N > 0:
        readout_bwd_state_kernel[(N, B * H)](
            q, states, u, pooled, n_visible, gate_scale, mix,
            dy, agg_buf, lse, thr,
            ds, dp,
            T, N, H, G, K, V, U,
            *q.stride(), *sstr, *u.stride(), *pooled.stride(),
            float(scale),
            AGG=agg, PREFIX=bool(prefix), DOT_PREC=prec, **blocks,
        )
    if G > 1:
        dq = dq.view(B, T, Hq, G, K).sum(3)
    if layout == "vk":
        ds = ds.transpose(-1, -2)
    # da = <dy, agg - o> summed over batch, tokens and values
    dmix = (dy.float() * (agg_buf.permute(0, 2, 1, 3) - online.float())).sum((0, 1, 3))
    if not agg:
        return dq, ds, do, None, None, None, None, dmix, None
    dgs = dg.view(B, H, ntb).sum((0, 2))
    dob = db.view(B, H, ntb).sum((0, 2))  # d online_bias: dl0 summed over batch and tokens
    return dq, ds, do, du, dp, dop, dgs, dmix, dob


class _Readout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, states, online, u, pooled, online_pool, gate_scale, mix, online_bias, n_visible, opts):
        y, agg_buf, lse, thr = launch_forward(q, states, online, u, pooled, online_pool, n_visible, gate_scale, mix,
                                              online_bias, save=True, **opts)
        ctx.save_for_backward(q, states, online, u, pooled, online_pool, n_visible, gate_scale, mix, online_bias,
                              agg_buf, lse, thr)
        ctx.opts = opts
        return y

    @staticmethod
    def backward(ctx, dy):
        q, states, online, u, pooled, online_pool, n_visible, gate_scale, mix, online_bias, agg_buf, lse, thr = (
            ctx.saved_tensors)
        o = ctx.opts
        dq, ds, do, du, dp, dop, dgs, dmix, dob = launch_backward(
            dy, q, states, online, u, pooled, online_pool, n_visible, gate_scale, mix, online_bias, agg_buf, lse, thr,
            agg=o["agg"], scale=o["scale"], layout=o["layout"], prefix=o["prefix"])
        cast = lambda g, like: None if g is None else g.to(like.dtype)  # noqa: E731
        return (cast(dq, q), cast(ds, states), cast(do, online), cast(du, u), cast(dp, pooled), cast(dop, online_pool),
                cast(dgs, gate_scale), cast(dmix, mix), cast(dob, online_bias), None, None)


def readout_triton(x: ReadInputs, *, residual_prefix: bool | None = None, decode: bool | None = None):
    """Triton read-out; same inputs (:class:`mc_retrofit.core.ReadInputs`) and contract as
    ``mc_retrofit.core.readout_reference``.

    ``residual_prefix``: residual through prefix sums of the states (None: when the call
    has more than two token blocks). ``decode``: the one-token kernel (None: when T == 1
    and no gradient is needed).
    """
    q, states, online, u, pooled, online_pool, n_visible = (
        x.q, x.states, x.online, x.u, x.pooled, x.online_pool, x.n_visible)
    aggregation, top_k, scale, gate_scale, mix, online_bias, layout = (
        x.aggregation, x.top_k, x.scale, x.gate_scale, x.mix, x.online_bias, x.layout)
    N = 0 if states is None else states.shape[1]
    if N == 0:
        return online  # nothing cached: exactly the model's own output
    gate_scale = torch.as_tensor(gate_scale, device=q.device)
    if gate_scale.dim() == 0:
        gate_scale = gate_scale.expand(online.shape[2]).contiguous()  # the kernels load gs_ptr + h
    mix = torch.as_tensor(mix, device=q.device)
    online_bias = per_head(online_bias, online.shape[2], q.device)  # a float: the same value for every head
    B, T, H, Hq, N, K, V, U = check_args(q, states, online, u, pooled, online_pool, n_visible, aggregation, top_k,
                                         gate_scale, mix, layout, online_bias)
    agg = AGG_CODES[aggregation]
    if agg == 2 and top_k >= N:
        agg = 1  # keeping every segment is the gated read-out
    u, pooled, online_pool = _gate_tensors(q, u, pooled, online_pool, aggregation)
    n_visible = n_visible.to(q.device)
    grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (q, states, online, u, pooled, online_pool, gate_scale, mix, online_bias))
    if decode is None:
        decode = T == 1 and not grad
    if decode:
        from .decode import readout_decode

        return readout_decode(q, states, online, u, pooled, online_pool, n_visible, agg=agg, top_k=top_k,
                              scale=scale, gate_scale=gate_scale, mix=mix, online_bias=online_bias, layout=layout)
    if residual_prefix is None:
        residual_prefix = agg == 0 and T > 2 * 64
    prefix = bool(residual_prefix) and agg == 0
    if prefix:
        states = states.float().cumsum(1)  # differentiable: dS_i = sum_{j >= i} dP_j
    opts = dict(agg=agg, top_k=int(top_k), scale=float(scale), layout=layout, prefix=prefix)
    if not grad:
        return launch_forward(q, states, online, u, pooled, online_pool, n_visible, gate_scale, mix, online_bias,
                              save=False, **opts)[0]
    return _Readout.apply(q, states, online, u, pooled, online_pool, gate_scale, mix, online_bias, n_visible, opts)

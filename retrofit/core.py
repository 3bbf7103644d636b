"""The Memory Caching math in plain PyTorch: segmentation, gates, aggregation.

This is the reference path: it runs on any device and is the oracle for the Triton
kernels in ``mc_retrofit.kernels``. Shapes use these letters:

    B batch, T tokens in this call, N cached segments, H heads,
    K key/query width, V value width, U gate-input width (usually K).

A cached state is read the way a linear memory is read: ``r_{t,i} = scale * q_t^T S_i``
with ``S_i`` in K-first layout ``[K, V]`` (V-first families pass a transposed view).
Token ``t`` may read the states ``0 .. n_visible[t]-1``: the segments completed before
its own segment began (causality).

Gate logits (``gated`` and ``ssc``):
    cached i:  l_{t,i} = gate_scale * <u_t, pool_i>
    online:    l_{t,0} = gate_scale * <u_t, pool_t^online> + online_bias
with ``online_bias`` one value per head (the gate's trainable ``online_bias``, or a float),
``pool_i`` the mean of segment i's keys and ``pool_t^online`` the causal running
mean of the keys of t's own segment so far. ``gate_scale = 1 / (sqrt(U) * temperature)``.

The output mixes the aggregate into the model's own output with a per-head weight ``a``:
``y = o + a * (agg - o)``; ``a = 0`` returns ``o`` exactly (the base model).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Tokens per block in the reference read-out: bounds the [block, N, H, V] intermediate.
_BLOCK = 128


def segment_pieces(pos: int, seg_fill: int, length: int, segmentation: str, segment_size: int):
    """Split a call of ``length`` tokens into pieces that each lie in one segment.

    ``pos`` is the number of tokens seen before this call and ``seg_fill`` how many of
    them belong to the still-open segment. Returns ``(close_before, pieces)`` where
    ``pieces`` is a list of ``(start, end, closes)`` in call coordinates, ``closes``
    saying that the segment ends with this piece (its end state gets cached), and
    ``close_before`` that the open segment from the previous call is closed (cached)
    before the first token of this call.

    ``constant``: boundaries at absolute multiples of ``segment_size``; a call that ends
    exactly on a boundary closes its last segment (so split prefill equals one prefill).
    ``log``: the call's tokens follow the binary expansion of ``length`` (largest first);
    the last piece stays open. A multi-token call first closes the open segment left
    by a previous call; a single-token call (decoding) joins it.
    """
    if length <= 0:
        return False, []
    if segmentation == "constant":
        pieces = []
        start = 0
        fill = seg_fill
        while start < length:
            end = min(length, start + segment_size - fill)
            closes = (fill + end - start) == segment_size
            pieces.append((start, end, closes))
            fill = 0 if closes else fill + end - start
            start = end
        return False, pieces
    if segmentation == "log":
        close_before = length > 1 and seg_fill > 0
        sizes = [1 << b for b in range(length.bit_length() - 1, -1, -1) if length >> b & 1]
        pieces, start = [], 0
        for j, size in enumerate(sizes):
            pieces.append((start, start + size, j < len(sizes) - 1))
            start += size
        return close_before, pieces
    raise ValueError(f"unknown segmentation {segmentation!r}")


def batch_pieces(reals, fills, starts, length: int, segmentation: str, segment_size: int):
    """:func:`segment_pieces` for a batch whose rows keep their own segment clocks.

    Row ``r`` has seen ``reals[r]`` real tokens, ``fills[r]`` of them in its open segment,
    and its real tokens in this call start at ``starts[r]`` (left padding before it).
    Returns ``(close_before_rows, spans)``: the rows whose open segment closes before the
    call, and ``(start, end, closing_rows)`` spans that split the call at every row's
    segment ends, so that no row crosses a boundary inside a span.
    """
    close_before, ends = [], {}
    for r, (real, fill, start) in enumerate(zip(reals, fills, starts)):
        before, pieces = segment_pieces(real, fill, length - start, segmentation, segment_size)
        if before:
            close_before.append(r)
        for _, end, closes in pieces:
            if closes:
                ends.setdefault(start + end, []).append(r)
    cuts = sorted(set(ends) | {length}) if length > 0 else []
    spans, a = [], 0
    for b in cuts:
        spans.append((a, b, ends.get(b, [])))
        a = b
    return close_before, spans


def gate_weights(
    u: torch.Tensor,
    pooled: torch.Tensor | None,
    online_pool: torch.Tensor,
    n_visible: torch.Tensor,
    aggregation: str,
    top_k: int,
    gate_scale: torch.Tensor,
    online_bias: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """Aggregation weights over {online, cached 0..N-1}: ``[B, T, H, 1 + N]`` (fp32).

    u ``[B,T,H,U]``; pooled ``[B,N,H,U]`` (or None when N = 0); online_pool ``[B,T,H,U]``;
    n_visible ``[T]`` or, when rows differ (padded batches), ``[B, T]`` (int); gate_scale ``[H]``;
    online_bias a float or ``[H]`` (the gate's trainable per-head bias). Invisible or unselected segments get
    weight exactly 0. ``residual`` gives weight 1 to the online memory and every visible
    cached segment.
    """
    B, T, H, _ = u.shape
    N = 0 if pooled is None else pooled.shape[1]
    device = u.device
    nv = n_visible.to(device)
    nv = nv if nv.dim() == 2 else nv[None]  # [1 or B, T]
    visible = (torch.arange(N, device=device) < nv[..., None])[:, :, None, :]  # [1 or B, T, 1, N]
    if aggregation == "residual":
        cached = visible.to(torch.float32).expand(B, T, H, N)
        return torch.cat([torch.ones(B, T, H, 1, device=device), cached], dim=-1)
    scale = gate_scale.to(device=device, dtype=torch.float32)[None, None, :]  # [1,1,H]
    uf = u.float()
    if isinstance(online_bias, torch.Tensor):  # per head, broadcast over [B, T]; differentiable
        online_bias = online_bias.to(device=device, dtype=torch.float32)
    l_online = (uf * online_pool.float()).sum(-1) * scale + online_bias  # [B,T,H]
    if N == 0:
        return torch.ones(B, T, H, 1, device=device)
    l_cached = torch.einsum("bthu,bnhu->bthn", uf, pooled.float()) * scale[..., None]
    l_cached = l_cached.masked_fill(~visible, float("-inf"))
    if aggregation == "ssc" and top_k < N:
        # Keep the top_k visible segments by router score; the rest drop out (-inf).
        kth = torch.topk(l_cached, top_k, dim=-1).values[..., -1:]
        l_cached = l_cached.masked_fill(l_cached < kth, float("-inf"))
    logits = torch.cat([l_online[..., None], l_cached], dim=-1)
    return torch.softmax(logits, dim=-1)


@dataclass(frozen=True)
class ReadInputs:
    """The read-out's inputs, named once: what :func:`readout_reference`, the dispatch
    ``mc_retrofit.kernels.readout`` and the Triton read-out all take.

    q ``[B,T,H,K]`` (the read query); states ``[B,N,H,K,V]`` (layout ``kv``) or
    ``[B,N,H,V,K]`` (``vk``), or None; online ``[B,T,H,V]`` (the model's own read of its
    online memory); u, pooled, online_pool, n_visible, gate_scale as in
    :func:`gate_weights`; mix ``[H]`` (the cache weight ``a``); scale the read's ``scale``;
    online_bias a float or ``[H]`` (the gate's ``online_bias``).
    """

    q: torch.Tensor
    states: torch.Tensor | None
    online: torch.Tensor
    u: torch.Tensor | None
    pooled: torch.Tensor | None
    online_pool: torch.Tensor | None
    n_visible: torch.Tensor
    aggregation: str
    top_k: int
    scale: float
    gate_scale: torch.Tensor
    mix: torch.Tensor
    online_bias: float | torch.Tensor = 0.0
    layout: str = "kv"


def readout_reference(x: ReadInputs) -> torch.Tensor:
    """Fused MC read-out, reference version: ``y = o + mix * (agg - o)`` (inputs: :class:`ReadInputs`).

    Returns ``[B,T,H,V]`` in ``online``'s dtype; everything inside is fp32.
    """
    q, states, online, u, pooled, online_pool, n_visible = (
        x.q, x.states, x.online, x.u, x.pooled, x.online_pool, x.n_visible)
    N = 0 if states is None else states.shape[1]
    if N == 0 or int(n_visible.max()) == 0:
        return online  # no cached segment is read: exactly the model's own output
    out = torch.empty_like(online)
    mixf = x.mix.float().to(online.device)[None, None, :, None]
    for a in range(0, q.shape[1], _BLOCK):
        b = min(q.shape[1], a + _BLOCK)
        nv = n_visible[..., a:b]
        n = int(nv.max())
        o = online[:, a:b].float()
        if n == 0:
            out[:, a:b] = online[:, a:b]
            continue
        w = gate_weights(
            u[:, a:b], pooled[:, :n], online_pool[:, a:b], nv, x.aggregation, x.top_k, x.gate_scale, x.online_bias
        )
        S = states[:, :n].float()
        eq = "bthk,bnhkv->bthnv" if x.layout == "kv" else "bthk,bnhvk->bthnv"
        reads = torch.einsum(eq, q[:, a:b].float(), S) * x.scale  # [B,t,H,n,V]
        agg = w[..., :1] * o + (w[..., 1:, None] * reads).sum(-2)
        out[:, a:b] = (o + mixf * (agg - o)).to(online.dtype)
    return out


def default_gate_scale(u_dim: int, temperature: torch.Tensor) -> torch.Tensor:
    """``1 / (sqrt(U) * temperature)`` per head."""
    return 1.0 / (math.sqrt(u_dim) * temperature)

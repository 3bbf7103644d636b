"""The segment loop every linear-memory adapter shares.

An adapter hands over its layer's query and keys in a common shape plus a callable
that runs the family's own recurrence over a slice of tokens from a given state. The
loop runs segment by segment (checkpoint mode: the state is carried, never reset),
caches each boundary state with its mean-pooled keys, and lets every token read the
segments completed before its own.
"""
from __future__ import annotations

import os
from typing import Callable

import torch

from .core import batch_pieces, readout_reference
from .errors import MCError
from .layer import LayerRun
from .memory import LayerMemory

# run_piece(start, end, state) -> (online output [B, end-start, H, V], state after end)
RunPiece = Callable[[int, int, object], tuple[torch.Tensor, object]]
# capture(state, segment_size) -> (online output [B, T, H, V], final state, boundary states
# [B, T // segment_size, ...] cached-state layout): the whole call in one pass
Capture = Callable[[object, int], tuple[torch.Tensor, object, torch.Tensor]]


def use_one_pass(device: torch.device) -> bool:
    """One-pass capture (one family-op call + one read-out per layer call) on CUDA, where
    per-segment kernel launches dominate; the per-segment loop elsewhere.
    ``MC_RETROFIT_ONE_PASS=1``/``0`` forces it on/off (tests run both on CPU)."""
    flag = os.environ.get("MC_RETROFIT_ONE_PASS", "").lower()
    if flag in ("1", "true", "yes"):
        return True
    if flag in ("0", "false", "no"):
        return False
    return device.type == "cuda"


def readout(*args, **kwargs):
    """Dispatch point for the fused read-out (Triton on CUDA when available)."""
    try:
        from mc_retrofit.kernels import readout as kernel_readout
    except ImportError:  # kernels package not importable: reference path
        return readout_reference(*args, **kwargs)
    return kernel_readout(*args, **kwargs)


def linear_read(q: torch.Tensor, *, scale: float, layout: str):
    """The read for linear memories: ``scale * q_t^T S_i``, aggregated with the gates.

    q ``[B,T,H,K]``; cached states are ``[B,H,K,V]`` (``layout='kv'``) or ``[B,H,V,K]``."""

    def read(run: LayerRun, o, a, b, u, online_pool, n_visible):
        mem, gate, cfg = run.memory, run.gate, run.gate.config
        return readout(
            q[:, a:b], mem.states, o, u, mem.pooled, online_pool, n_visible,
            aggregation=cfg.aggregation, top_k=cfg.top_k, scale=scale,
            gate_scale=gate.gate_scale(), mix=gate.cache_weight, online_bias=cfg.online_bias, layout=layout,
        )

    return read


def run_segments(
    run: LayerRun,
    query: torch.Tensor,
    k: torch.Tensor,
    run_piece: RunPiece,
    state,
    snapshot: Callable[[object], torch.Tensor],
    read,
    capture: Capture | None = None,
):
    """Memory Caching over one call of a layer.

    query ``[B,T,H,U]`` is the parameter-free gate input (the layer's own query); k
    ``[B,T,H,U]`` the keys that summarise a segment (head groups already expanded);
    ``state`` the recurrent state entering the call (family layout, or None);
    ``snapshot(state)`` a detached copy of it to cache; ``read(run, o, a, b, u,
    online_pool, n_visible)`` combines the online output ``o`` of tokens ``a:b`` with the
    cached memories (see :func:`linear_read`). ``capture`` (optional, see :data:`Capture`)
    lets a call that starts on a segment boundary run in one pass instead of one op call
    per segment (:func:`use_one_pass`). Returns (output, final state).

    A layer whose cache weights are all exactly 0 returns the base model's output bit for
    bit: the family's op runs over the whole call at once, as in the base model (the
    segment loop splits the family's scan at the boundaries, which reorders its sums:
    about 1e-6 off). When the gates are being trained from 0 (``finetune``'s start), the
    segment loop runs as well and supplies the gradient (its value still the base model's exactly).
    """
    run.memory.bind(k.shape[0])
    if _all_zero(run.gate):
        base_y, base_state = _run_whole(run, k, run_piece, state, read)
        if not _needs_grad(run.gate):
            run.memory.pass_over(k.shape[1], run.valid)
            return base_y, base_state
        y, _ = _run_mc(run, query, k, run_piece, state, snapshot, read, capture)
        # Value: the base model's, exactly (y - y.detach() is exactly 0 for finite y).
        # Gradient: the MC formula's (d y / d cache_weight = agg - o), as without this path.
        # The state returned is the base model's; the memory holds the loop's segments.
        return base_y.detach() + (y - y.detach()), base_state
    return _run_mc(run, query, k, run_piece, state, snapshot, read, capture)


def _all_zero(gate) -> bool:
    """Every cache weight of the layer is exactly 0 (NaN is not: it must show)."""
    return not bool(gate.cache_weight.detach().ne(0).any())


def _needs_grad(gate) -> bool:
    return torch.is_grad_enabled() and any(p.requires_grad for p in gate.parameters())


def _run_whole(run: LayerRun, k, run_piece: RunPiece, state, read):
    """The base model's computation: the family's op over the whole call, read against an
    empty memory (which returns the online output as it is, never looking at the gate
    inputs, hence the Nones)."""
    T = k.shape[1]
    o, state = run_piece(0, T, state)
    empty = LayerRun(gate=run.gate, memory=LayerMemory(), hidden=run.hidden, cache=None, valid=run.valid)
    nv = torch.zeros(T, dtype=torch.long, device=k.device)
    return read(empty, o, 0, T, None, None, nv), state


def _run_mc(run: LayerRun, query, k, run_piece: RunPiece, state, snapshot, read, capture):
    gate, mem, cfg = run.gate, run.memory, run.gate.config
    B, T = k.shape[:2]
    if mem.gap:
        raise MCError(f"layer {gate.layer_idx}: this cache was filled while the layer's cache weights were 0, so it "
                      f"holds no cached segment of its first {mem.gap} tokens; after changing a cache weight, start "
                      "a new cache (a fresh forward or generate call)")
    u = gate.gate_input(query, run.hidden)
    valid = run.valid  # [B, T] real tokens of a left-padded batch, or None
    if capture is not None and _one_pass_applies(mem, cfg, valid, T, k.device):
        return _run_one_pass(run, k, u, state, read, capture)
    starts = [0] * B if valid is None else (T - valid.sum(1)).tolist()
    close_before, spans = batch_pieces(mem.real, mem.seg_fill, starts, T, cfg.segmentation, cfg.segment_size)
    if close_before and state is not None:
        mem.close(snapshot(state), close_before)
    outs = []
    for a, b, closing in spans:
        o, state = run_piece(a, b, state)
        v = None if valid is None else valid[:, a:b]
        nv = mem.visible(b - a, k.device)
        online_pool = mem.running_pool(k[:, a:b], v)
        outs.append(read(run, o, a, b, u[:, a:b], online_pool, nv))
        mem.add_keys(k[:, a:b], v)
        if closing:
            mem.close(snapshot(state), closing)
    return (outs[0] if len(outs) == 1 else torch.cat(outs, 1)), state


def _one_pass_applies(mem, cfg, valid, T: int, device) -> bool:
    C = cfg.segment_size
    return (
        cfg.segmentation == "constant" and valid is None and T >= C and mem.uniform
        and not any(mem.seg_fill)  # every row's clock on a boundary
        # a cap that bites inside the call would hide segments from later tokens of it
        and (mem.max_segments is None or mem.n + T // C <= mem.max_segments)
        and use_one_pass(device)
    )


def _run_one_pass(run: LayerRun, k, u, state, read, capture):
    """The whole call at once: the family op once, the boundary states from the capture,
    then one read-out where token t sees the segments closed before its own."""
    mem, C = run.memory, run.gate.config.segment_size
    B, T, H, U = k.shape
    n_full, n_seg = T // C, -(-T // C)
    o, final, bounds = capture(state, C)
    kf = k.float()
    if n_seg * C > T:
        kf = torch.cat([kf, kf.new_zeros(B, n_seg * C - T, H, U)], 1)
    kf = kf.view(B, n_seg, C, H, U)
    count = torch.arange(1, C + 1, device=k.device, dtype=torch.float32)[None, None, :, None, None]
    online_pool = (kf.cumsum(2) / count).reshape(B, n_seg * C, H, U)[:, :T]
    n_before = mem.n
    mem.extend(bounds, kf[:, :n_full].mean(2), n_full * C)
    nv = n_before + torch.arange(T, device=k.device) // C
    y = read(run, o, 0, T, u, online_pool, nv)
    if T > n_full * C:  # the open tail segment
        mem.add_keys(k[:, n_full * C:])
    return y, final


def check_finite_output(module, args, output):
    """Forward hook on a converted model's backbone (``model.base_model``, which both the
    LM forward and the evaluation's own forward run): one line instead of NaN/inf.

    A huge cache weight (``y = o + a (agg - o)`` with ``a = 1e30``) overflows a few layers
    later, far from any MC layer, so the check sits on the backbone's output. It costs one
    reduction per forward. A model whose cache weights are all 0 is the base model bit for
    bit: its non-finite output is the base model's own and passes unchanged."""
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None:
        hidden = getattr(output, "logits", None)
    if hidden is None and isinstance(output, (tuple, list)) and output:
        hidden = output[0]
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point() or bool(torch.isfinite(hidden).all()):
        return None
    from .layer import MCGate

    gates = [m for m in module.modules() if isinstance(m, MCGate)]
    if all(_all_zero(g) for g in gates):
        return None
    broken = [g.layer_idx for g in gates if not all(bool(torch.isfinite(p).all()) for p in g.parameters())]
    if broken:
        raise MCError(f"the model's output is not finite (NaN/inf): the gate parameters of layers {broken} are not "
                      "finite; load the converted model again or re-run finetune with a smaller --lr")
    top = max(gates, key=lambda g: float(g.cache_weight.detach().abs().max()))
    raise MCError(f"the model's output is not finite (NaN/inf) with Memory Caching on: cache weights reach "
                  f"{float(top.cache_weight.detach().abs().max()):.3g} (layer {top.layer_idx}), and cached reads "
                  "weighted that much overflow; use cache weights of order 1 (0 is the base model), or check the "
                  "input and dtype")

"""The segment loop every adapter shares.

An adapter's op wrapper hands over one :class:`Recurrence`: its layer's query and keys in a
common shape, the state entering the call, and the family's own recurrence over a slice of
tokens (``run``), the copy a cached segment keeps (``snapshot``), the read of the cached
memories (``read``; :class:`LinearRecurrence` for memories read by ``q^T S``) and,
optionally, every boundary state in one pass (``capture``). The loop runs segment by
segment (checkpoint mode: the state is carried, never reset), caches each boundary state
with its mean-pooled keys, and lets every token read the segments completed before its own.
The read-out's inputs are :class:`mc_retrofit.core.ReadInputs`, dispatched by
``mc_retrofit.kernels.readout`` (Triton on CUDA, the reference elsewhere).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from mc_retrofit.kernels import readout

from .core import ReadInputs, batch_pieces
from .devices import on_device
from .errors import MCError
from .layer import LayerRun
from .memory import LayerMemory


@dataclass
class Span:
    """What the loop hands a family's read for tokens ``start:end`` of the call."""

    online: object  # the family op's own output for these tokens (``[B, t, H, V]`` for linear memories)
    start: int
    end: int
    u: torch.Tensor | None  # gate input ``[B, t, H, U]`` (None when nothing cached is read)
    online_pool: torch.Tensor | None  # running mean of the open segment's keys ``[B, t, H, U]``
    n_visible: torch.Tensor  # cached segments each token may read: ``[t]`` or ``[B, t]``


class Recurrence:
    """One call of a family's recurrent op, as the segment loop sees it.

    An adapter's op wrapper builds one per call: ``query`` ``[B,T,H,U]`` is the
    parameter-free gate input (the layer's own query), ``keys`` ``[B,T,H,U]`` what a
    segment's summary pools (head groups already expanded), ``state`` the recurrent
    state entering the call (family layout, or None). Subclasses implement :meth:`run`
    and :meth:`read`; :meth:`snapshot` and :meth:`capture` have defaults.
    """

    def __init__(self, query: torch.Tensor, keys: torch.Tensor, state=None):
        self.query, self.keys, self.state = query, keys, state

    def run(self, start: int, end: int, state) -> tuple[object, object]:
        """The family op over tokens ``start:end`` from ``state``: (online output, state after ``end``)."""
        raise NotImplementedError

    def snapshot(self, state) -> torch.Tensor:
        """The copy of ``state`` a cached segment keeps (fp32, ``[B, ...]``)."""
        return state.float().clone()

    def read(self, run: LayerRun, span: Span) -> torch.Tensor:
        """Combine ``span.online`` with the cached memories of ``run.memory``."""
        raise NotImplementedError

    def capture(self, state, segment_size: int):
        """The whole call in one pass: (online output ``[B,T,H,V]``, final state, boundary
        states ``[B, T // segment_size, ...]`` in :meth:`snapshot`'s layout), or None when
        this call cannot be captured (the loop then runs segment by segment)."""
        return None


class LinearRecurrence(Recurrence):
    """A linear memory read by its query: ``scale * q_t^T S_i``, aggregated with the gates.

    Cached states are ``[B,H,K,V]`` (``layout='kv'``) or ``[B,H,V,K]`` (``'vk'``)."""

    scale: float = 1.0
    layout: str = "kv"

    def read(self, run, span):
        mem, gate, cfg = run.memory, run.gate, run.gate.config
        return readout(ReadInputs(
            q=self.query[:, span.start:span.end], states=mem.states, online=span.online, u=span.u,
            pooled=mem.pooled, online_pool=span.online_pool, n_visible=span.n_visible,
            aggregation=cfg.aggregation, top_k=cfg.top_k, scale=self.scale, gate_scale=gate.gate_scale(),
            mix=gate.cache_weight, online_bias=gate.online_bias, layout=self.layout,
        ))


class Stepped(LinearRecurrence):
    """A one-token call whose op already ran (decoding ops update their state in place):
    ``run`` hands back its output and state."""

    def __init__(self, query, keys, state, online, *, layout="kv"):
        super().__init__(query, keys, state)
        self.online, self.layout = online, layout

    def run(self, start, end, state):
        return self.online, state


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


def run_segments(run: LayerRun, rec: Recurrence):
    """Memory Caching over one call of a layer, for the family call ``rec``. Returns (output, final state).

    The loop runs segment by segment (checkpoint mode: the state is carried, never reset),
    caches each boundary state (:meth:`Recurrence.snapshot`) with its mean-pooled keys,
    and lets every token read the segments completed before its own
    (:meth:`Recurrence.read`). A call that starts on a segment boundary runs in one pass
    instead, when the family can capture its boundary states (:meth:`Recurrence.capture`,
    :func:`use_one_pass`).

    A layer whose cache weights are all exactly 0 returns the base model's output bit for
    bit: the family's op runs over the whole call at once, as in the base model (the
    segment loop splits the family's scan at the boundaries, which reorders its sums:
    about 1e-6 off). When the gates are being trained from 0 (``finetune``'s start), the
    segment loop runs as well and supplies the gradient (its value still the base model's exactly).

    Runs with the layer's GPU as the current device: under a device map the layer may sit
    on another GPU than the current one, and Triton launches on the current device.
    """
    with on_device(rec.keys.device):
        return _run_segments(run, rec)


def _run_segments(run: LayerRun, rec: Recurrence):
    run.memory.bind(rec.keys.shape[0])
    if _all_zero(run.gate):
        base_y, base_state = _run_whole(run, rec)
        if not _needs_grad(run.gate):
            run.memory.pass_over(rec.keys.shape[1], run.valid)
            return base_y, base_state
        y, _ = _run_mc(run, rec)
        # Value: the base model's, exactly (y - y.detach() is exactly 0 for finite y).
        # Gradient: the MC formula's (d y / d cache_weight = agg - o), as without this path.
        # The state returned is the base model's; the memory holds the loop's segments.
        return base_y.detach() + (y - y.detach()), base_state
    return _run_mc(run, rec)


def _all_zero(gate) -> bool:
    """Every cache weight of the layer is exactly 0 (NaN is not: it must show)."""
    return not bool(gate.cache_weight.detach().ne(0).any())


def _needs_grad(gate) -> bool:
    return torch.is_grad_enabled() and any(p.requires_grad for p in gate.parameters())


def _run_whole(run: LayerRun, rec: Recurrence):
    """The base model's computation: the family's op over the whole call, read against an
    empty memory (which returns the online output as it is, never looking at the gate
    inputs, hence the Nones)."""
    T = rec.keys.shape[1]
    o, state = rec.run(0, T, rec.state)
    empty = LayerRun(gate=run.gate, memory=LayerMemory(), hidden=run.hidden, cache=None, valid=run.valid)
    nv = torch.zeros(T, dtype=torch.long, device=rec.keys.device)
    return rec.read(empty, Span(o, 0, T, None, None, nv)), state


def _run_mc(run: LayerRun, rec: Recurrence):
    gate, mem, cfg = run.gate, run.memory, run.gate.config
    k, state = rec.keys, rec.state
    B, T = k.shape[:2]
    if mem.gap:
        raise MCError(f"layer {gate.layer_idx}: this cache was filled while the layer's cache weights were 0, so it "
                      f"holds no cached segment of its first {mem.gap} tokens; after changing a cache weight, start "
                      "a new cache (a fresh forward or generate call)")
    u = gate.gate_input(rec.query, run.hidden)
    valid = run.valid  # [B, T] real tokens of a left-padded batch, or None
    if _one_pass_applies(mem, cfg, valid, T, k.device):
        captured = rec.capture(state, cfg.segment_size)
        if captured is not None:
            return _run_one_pass(run, rec, u, captured)
    starts = [0] * B if valid is None else (T - valid.sum(1)).tolist()
    close_before, spans = batch_pieces(mem.real, mem.seg_fill, starts, T, cfg.segmentation, cfg.segment_size)
    if close_before and state is not None:
        mem.close(rec.snapshot(state), close_before)
    outs = []
    for a, b, closing in spans:
        o, state = rec.run(a, b, state)
        v = None if valid is None else valid[:, a:b]
        nv = mem.visible(b - a, k.device)
        online_pool = mem.running_pool(k[:, a:b], v)
        outs.append(rec.read(run, Span(o, a, b, u[:, a:b], online_pool, nv)))
        mem.add_keys(k[:, a:b], v)
        if closing:
            mem.close(rec.snapshot(state), closing)
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


def _run_one_pass(run: LayerRun, rec: Recurrence, u, captured):
    """The whole call at once: the family op once, the boundary states from the capture,
    then one read-out where token t sees the segments closed before its own."""
    mem, C, k = run.memory, run.gate.config.segment_size, rec.keys
    B, T, H, U = k.shape
    n_full, n_seg = T // C, -(-T // C)
    o, final, bounds = captured
    kf = k.float()
    if n_seg * C > T:
        kf = torch.cat([kf, kf.new_zeros(B, n_seg * C - T, H, U)], 1)
    kf = kf.view(B, n_seg, C, H, U)
    count = torch.arange(1, C + 1, device=k.device, dtype=torch.float32)[None, None, :, None, None]
    online_pool = (kf.cumsum(2) / count).reshape(B, n_seg * C, H, U)[:, :T]
    n_before = mem.n
    mem.extend(bounds, kf[:, :n_full].mean(2), n_full * C)
    nv = n_before + torch.arange(T, device=k.device) // C
    y = rec.read(run, Span(o, 0, T, u, online_pool, nv))
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

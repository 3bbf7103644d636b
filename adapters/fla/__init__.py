"""What every flash-linear-attention (fla) adapter shares.

An fla family is described by :class:`OpSpec` (one per wrapped core op: which
arguments run along time, and how the op's inputs give the read query, the key
summary, the scale and the state layout) and a :class:`FlaAdapter` subclass (model
class, layer class, the ops to wrap). The wrapped op runs the original op segment by
segment through :func:`mc_retrofit.segments.run_segments`, chaining ``initial_state``,
caching each boundary state (an fp32 **clone**: fla's recurrent kernels may update a
state in place), and adding ``scale * q_t^T S_i`` reads of the cached states to the
op's output, i.e. before the layer's own output norm, gate and projection.

The memory hangs on fla's ``Cache`` (``past_key_values``), so chunked prefill and
decoding with a cache continue the same segments.
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Callable

import torch

from ... import compat
from ..base import Adapter, StateInfo, expand_heads, op_patch
from ...errors import MCError
from ...layer import current
from ...kernels.capture import gated_linear_boundary_states
from ...segments import LinearRecurrence, run_segments
from . import chunk


def import_fla():
    """``import fla`` (registers its model classes), version-checked, with its leaf ops
    routed to PyTorch for CPU tensors (so a loaded model runs on CPU before conversion)."""
    from . import cpu as fla_cpu

    fla_cpu.check_version()
    import fla  # noqa: F401

    compat.install(support_patches())
    return fla


def support_patches() -> list:
    """What any fla model needs replaced to run here, converted or not: the CPU routing
    and the generation fix (``compat``'s "fla-cpu" and "compat" layers)."""
    from . import cpu as fla_cpu

    return [*fla_cpu.patches(), compat.FLA_GENERATION]


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The normalisation fla's kernels apply with ``use_qk_l2norm_in_kernel`` (fp32)."""
    xf = x.float()
    return xf * torch.rsqrt(xf.square().sum(-1, keepdim=True) + eps)


@dataclass
class OpSpec:
    """How Memory Caching reads one fla core op.

    time_args: the op's arguments shaped ``[B, T, ...]`` (sliced per segment piece);
    query(args) -> ``[B,T,H,K]``: the query the op reads its state with, after whatever
        the kernel does to it (l2norm, head repeat), in the state's head count;
    keys(args) -> ``[B,T,H,K]``: what a segment's summary pools (same heads as query);
    scale(args) -> the op's read scale; layout: ``kv`` (``[B,H,K,V]``) or ``vk``;
    prepare(args) -> None: refuse options the segment loop cannot honour.

    One-pass boundary capture (:meth:`FlaRecurrence.capture`), one of:
    linear(args) -> ``dict(k, v, g, gk, gv)``: the op's recurrence as a gated linear one,
        ``S_t = diag(e^{g_t + gk_t}) S_{t-1} diag(e^{gv_t}) + k_t v_t^T`` (K-first, natural-log
        decays, ``[B,T,H,...]``), for ``kernels.capture.gated_linear_boundary_states``;
    chunkwise: on CPU the op's fla_cpu reference runs chunkwise and records the states
        (``adapters.fla.chunk.capturing``; the delta rules, whose states are not linear in v).
    """

    time_args: tuple[str, ...]
    query: Callable[[dict], torch.Tensor]
    keys: Callable[[dict], torch.Tensor]
    scale: Callable[[dict], float]
    layout: Callable[[dict], str]
    prepare: Callable[[dict], None] | None = None
    fp32_state: bool = False  # the op asserts an fp32 initial state (GLA's chunk op)
    positional: tuple[str, ...] = ()  # passed positionally (callers name them differently)
    linear: Callable[[dict], dict] | None = None
    chunkwise: bool = False


def _bind(original, args, kwargs) -> dict:
    target = getattr(original, "__mc_cpu_original__", original)
    sig = inspect.signature(target)
    bound = sig.bind_partial(*args, **kwargs)
    out = {}
    for name, value in bound.arguments.items():
        if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        else:
            out[name] = value
    return out


class FlaRecurrence(LinearRecurrence):
    """One call of an fla core op: ``call`` its bound arguments (without ``initial_state``)."""

    def __init__(self, spec: OpSpec, original, call: dict, state):
        super().__init__(spec.query(call), spec.keys(call), state)
        self.spec, self.original, self.call = spec, original, call
        self.scale, self.layout = spec.scale(call), spec.layout(call)

    def run(self, a, b, state):
        piece = dict(self.call)
        if self.spec.fp32_state and state is not None:
            state = state.float()
        for name in self.spec.time_args:
            if piece.get(name) is not None:
                piece[name] = piece[name][:, a:b]
        lead = [piece.pop(n) for n in self.spec.positional]
        return self.original(*lead, **piece, initial_state=state)

    def snapshot(self, state):
        return state.detach().float().clone()  # fla's recurrent kernels may update a state in place

    def capture(self, state, segment_size):
        T, v_first = self.keys.shape[1], self.layout == "vk"
        flip = (lambda s: s.transpose(-1, -2)) if v_first else (lambda s: s)  # noqa: E731  the op's layout <-> K-first
        if self.spec.linear is not None:
            o, final = self.run(0, T, state)
            h0 = None if state is None else flip(state.detach().float())
            bounds, _ = gated_linear_boundary_states(**self.spec.linear(self.call), initial_state=h0,
                                                     segment_size=segment_size)
        elif self.spec.chunkwise and not self.keys.is_cuda:
            with chunk.capturing(segment_size) as sink:
                o, final = self.run(0, T, state)
            if len(sink.states) != T // segment_size:  # the reference kept its recurrent form: no states
                return None
            bounds = torch.stack(sink.states, 1)
        else:  # the delta rules on CUDA: not wired (their fla state kernels are unverified here)
            return None
        return o, final, flip(bounds.detach()).contiguous()


class PackedFlaRecurrence(FlaRecurrence):
    """A left-padded batch that fla's layer unpadded (its ``attention_mask`` -> ``cu_seqlens``,
    real tokens packed into batch 1), seen by the segment loop as the padded ``[B, T]`` batch
    (pads zero, ``valid [B, T]``: each row's segment clock starts at its first real token).
    Each piece runs the op packed again (every row's real tokens of the piece, from that row's
    own state), so a pad never enters a recurrence: no family needs a neutral pad value."""

    def __init__(self, spec, original, call, state, valid):
        self.valid = valid
        super().__init__(spec, original, call, state)

    def run(self, a, b, state):
        v = self.valid[:, a:b]
        B, rows = v.shape[0], v.any(1).nonzero().flatten()
        if len(rows) == 0:  # every row still in its padding: nothing runs, the state stays
            return self.call["v"].new_zeros(v.shape + self.call["v"].shape[2:]), state
        piece = dict(self.call)
        for name in self.spec.time_args:
            if piece.get(name) is not None:
                piece[name] = piece[name][:, a:b][v][None]
        lens = v.sum(1)[rows]
        piece["cu_seqlens"] = torch.cat([lens.new_zeros(1), lens.cumsum(0)])
        init = None if state is None else state[rows]
        if self.spec.fp32_state and init is not None:
            init = init.float()
        lead = [piece.pop(n) for n in self.spec.positional]
        o, final = self.original(*lead, **piece, initial_state=init)
        out = o.new_zeros(v.shape + o.shape[2:])
        out[v] = o[0]
        if len(rows) == B:
            return out, final
        # rows without a token in this piece keep their state (zero before their first token)
        full = final.new_zeros((B,) + final.shape[1:]) if state is None else state.to(final.dtype).clone()
        full[rows] = final
        return out, full


def _packed_rows(run, call: dict, spec: OpSpec):
    """``call``'s time arguments ``[1, n, ...]`` (fla's layer unpadded a batch by its mask) as
    padded rows ``[B, T, ...]`` (zeros at pads), and the real tokens ``[B, T]`` (None: all real).
    Refuses ``cu_seqlens`` that are not the layer's own unpadding of the running call."""
    cu = call.pop("cu_seqlens")
    for extra in ("cu_seqlens_cpu", "chunk_indices"):
        call.pop(extra, None)
    if run.hidden is None:
        raise MCError("Memory Caching could not see this fla layer's input, so it cannot unpack its packed "
                      "(cu_seqlens) call; pass hidden_states to the layer positionally or by name")
    B, T = run.hidden.shape[:2]
    valid = run.valid
    lens = torch.full((B,), T, dtype=torch.long) if valid is None else valid.sum(1).cpu()
    if cu.numel() != B + 1 or not torch.equal(cu.cpu().long(), torch.cat([lens.new_zeros(1), lens.cumsum(0)])):
        raise MCError("Memory Caching does not support packed variable-length input (cu_seqlens) passed to fla "
                      "layers; pass a left-padded batch with its attention_mask instead")
    for name in spec.time_args:
        x = call.get(name)
        if x is None:
            continue
        if valid is None:
            call[name] = x.reshape((B, T) + x.shape[2:])
        else:
            rows = x.new_zeros((B, T) + x.shape[2:])
            rows[valid] = x[0]
            call[name] = rows
    return valid


def mc_op(spec: OpSpec):
    """An ``op_patch`` factory: the original op unless a Memory Caching layer runs; inside
    one, the segment loop of :func:`run_segments` with the family's linear read."""

    def make(original):
        def wrapper(*args, **kwargs):
            run = current()
            if run is None:
                return original(*args, **kwargs)
            call = _bind(original, args, kwargs)
            packed = call.get("cu_seqlens") is not None
            valid = _packed_rows(run, call, spec) if packed else None
            if spec.prepare is not None:
                spec.prepare(call)
            want_final = bool(call.get("output_final_state", False))
            init = call.pop("initial_state", None)
            call["output_final_state"] = True
            rec = (FlaRecurrence(spec, original, call, init) if valid is None
                   else PackedFlaRecurrence(spec, original, call, init, valid))
            y, final = run_segments(run, rec)
            if packed:  # back to fla's packed layout: [1, real tokens, ...]
                y = y.reshape((1, -1) + y.shape[2:]) if valid is None else y[valid][None]
            return y, (final if want_final else None)

        return wrapper

    return make


def default_scale(args: dict, key: str = "q") -> float:
    s = args.get("scale")
    return args[key].shape[-1] ** -0.5 if s is None else float(s)


class FlaAdapter(Adapter):
    """An fla family: ``layer_module`` (where the core ops are module globals),
    ``layer_class`` (the mixer), ``ops`` (op name -> OpSpec), ``model_class_name``."""

    layer_module: str = ""
    layer_class: str = ""
    model_class_name: str = ""
    ops: dict[str, OpSpec] = {}
    # fla's layers honour a left-padded attention_mask (packed with cu_seqlens, or pads zeroed
    # as RWKV-6/7 do), and the op wrapper unpacks packed calls into rows (PackedFlaRecurrence):
    # every fla family takes left padding (tests/adapters/test_fla_padding.py)
    supports_padding = True

    def model_class(self):
        import_fla()
        return getattr(importlib.import_module("fla.models"), self.model_class_name)

    def _layer_cls(self):
        import_fla()
        return getattr(importlib.import_module(self.layer_module), self.layer_class)

    def mixers(self, model):
        cls = self._layer_cls()
        found = [m for m in model.modules() if isinstance(m, cls)]
        for m in found:
            self.check_mixer(m)
        return list(enumerate(found))

    def check_mixer(self, mixer) -> None:
        """Refuse (one-line MCError) or switch a layer mode Memory Caching cannot read."""

    @staticmethod
    def switch_mode(mixer, bad: str, good: str, why: str) -> None:
        """Run a layer in mode ``good`` instead of ``bad`` (same outputs), with a warning."""
        if getattr(mixer, "mode", None) == bad:
            import warnings

            warnings.warn(f"{type(mixer).__name__} attn_mode {bad!r} {why}; Memory Caching runs it in {good!r} mode "
                          "(same outputs)", stacklevel=3)
            mixer.mode = good

    cache_names = ("past_key_values",)  # fla 0.6 models and layers
    mixer_cache_names = ("past_key_values",)

    def support_patches(self):
        return support_patches()  # below the op wrappers: their "original" is the CPU/GPU dispatcher

    def op_patches(self):
        return [op_patch(self.layer_module, name, mc_op(spec), self.family) for name, spec in self.ops.items()]

    # -- dimensions, from a model built on the meta device (no memory, no weights)
    def gate_dims(self, mixer, config):
        return self.state_dims(mixer)[0], self.state_dims(mixer)[1]

    def state_dims(self, mixer) -> tuple[int, int, int]:
        """(heads of the state, K, V)."""
        return mixer.num_heads, mixer.head_k_dim, mixer.head_v_dim

    def state_shape(self, mixer) -> tuple[int, ...]:
        h, k, v = self.state_dims(mixer)
        return (h, k, v)

    def state_info(self, config):
        cls = self.model_class()
        with torch.device("meta"):
            model = cls(config)
        mixers = self.mixers(model)
        if not mixers:
            raise MCError(f"this {self.family} config has no {self.layer_class} layers to cache")
        mixer = mixers[0][1]
        h, k, _ = self.state_dims(mixer)
        return StateInfo(shapes=[self.state_shape(mixer)], bytes_per_element=4, key_dim=k, heads=h)


def expand(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Repeat grouped heads (dim 2) up to ``heads`` (GVA / kv groups)."""
    return expand_heads(x, heads, dim=2)

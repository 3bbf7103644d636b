"""The per-layer side of Memory Caching: gate parameters and the running-layer context.

Adapters never rewrite a family's layer code. ``convert`` attaches an :class:`MCGate` to
each wrapped mixer and registers a forward pre-hook that publishes "this layer is
running" (a ContextVar). The family's core op, wrapped at module level by the adapter,
looks the context up: inside a wrapped layer it runs segment by segment and adds the
cached reads; anywhere else it is the original op, untouched.
"""
from __future__ import annotations

import contextvars
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import MCConfig
from .errors import MCError
from .memory import LayerMemory

_ACTIVE: contextvars.ContextVar["LayerRun | None"] = contextvars.ContextVar("mc_active_layer", default=None)


class MCGate(nn.Module):
    """The only new parameters Memory Caching adds to a layer.

    cache_weight ``[H]``: mix ``a`` in ``y = o + a (agg - o)`` (0 = the base model).
    log_temperature ``[H]``: gate temperature, ``log`` so it stays positive when tuned.
    online_bias ``[H]``: added to the online memory's gate logit (starts at ``config.online_bias``).
    connector (``gate_source='learned'``): ``W_u``, d_model -> H * U, zero-initialised.
    down, up (``gate_source='lowrank'``): ``A`` d_model -> r (small random, seeded by the layer
    index so conversion never draws from the global RNG), ``B`` r -> H * U (zero): the gate
    input is the query plus ``x A B``, exactly the query gates until ``B`` is tuned.
    """

    # the submodules that map the layer input into the gate input (``learned``, ``lowrank``);
    # the rest are per-head scalars. ``finetune(connector_lr=)`` tunes the two at different rates.
    CONNECTOR_MODULES = ("connector", "down", "up")

    def __init__(self, config: MCConfig, layer_idx: int, num_heads: int, key_dim: int, hidden_size: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.cache_weight = nn.Parameter(torch.full((num_heads,), float(config.cache_weight)))
        self.log_temperature = nn.Parameter(torch.full((num_heads,), math.log(config.temperature)))
        self.online_bias = nn.Parameter(torch.full((num_heads,), float(config.online_bias)))
        self.connector = self.down = self.up = None
        if config.gate_source == "learned":
            self.connector = nn.Linear(hidden_size, num_heads * key_dim, bias=False)
            nn.init.zeros_(self.connector.weight)
        elif config.gate_source == "lowrank":
            self.down = nn.Linear(hidden_size, config.gate_rank, bias=False)
            self.up = nn.Linear(config.gate_rank, num_heads * key_dim, bias=False)
            with torch.no_grad():
                g = torch.Generator().manual_seed(layer_idx)
                self.down.weight.copy_(torch.randn(self.down.weight.shape, generator=g) / math.sqrt(hidden_size))
                self.up.weight.zero_()

    def _apply(self, fn, recurse=True):
        # The gates stay float32 whatever the model is cast to (``model.to(torch.bfloat16)``,
        # ``.half()``): their logits and softmax are fp32 math, and a bf16 cache weight could not
        # even hold the values a tuned gate takes. The device part of ``fn`` applies as usual.
        def keep_fp32(t):
            out = fn(t)
            return out.float() if out.is_floating_point() and out.dtype != torch.float32 else out

        return super()._apply(keep_fp32, recurse)

    def gate_scale(self) -> torch.Tensor:
        return 1.0 / (math.sqrt(self.key_dim) * self.log_temperature.exp())

    def gate_input(self, query: torch.Tensor, hidden: torch.Tensor | None) -> torch.Tensor:
        """``u_t``: the layer's own query, ``q_t + x_t A B`` (lowrank) or ``x_t W_u`` (learned);
        float32 whatever the model's dtype (the gate logits are fp32 math). The layer input is
        moved to the gate's device: under a device map the pre-hook sees it before accelerate
        moves it to the layer."""
        if self.connector is None and self.up is None:
            return query.float()
        if hidden is None:
            raise RuntimeError(f"{self.config.gate_source} gate needs the layer input; the pre-hook did not record it")
        B, T = hidden.shape[:2]
        first = self.down if self.up is not None else self.connector
        x = hidden.to(device=first.weight.device, dtype=first.weight.dtype)
        if self.up is not None:
            return query.float() + self.up(self.down(x)).view(B, T, self.num_heads, self.key_dim)
        return self.connector(x).view(B, T, self.num_heads, self.key_dim)

    def extra_repr(self) -> str:
        c = self.config
        return f"layer={self.layer_idx}, heads={self.num_heads}, aggregation={c.aggregation}, gate_source={c.gate_source}"


@dataclass
class LayerRun:
    """What a wrapped op needs to know about the layer that called it."""

    gate: MCGate
    memory: LayerMemory
    hidden: torch.Tensor | None  # the mixer's input (for the learned connector)
    cache: Any  # the family's cache object for this call, if any
    valid: torch.Tensor | None = None  # [B, T] real tokens of a left-padded call (None: all real)


def current() -> LayerRun | None:
    return _ACTIVE.get()


def memory_for(holder: Any, layer_idx: int, config: MCConfig) -> LayerMemory:
    """The layer's memory: attached to the call's cache object so it lives as long as
    the recurrent state does; a fresh one when the call has no cache."""
    if holder is None:
        return LayerMemory(config.max_cached_segments, config.cache_policy)
    store = getattr(holder, "_mc_memory", None)
    if store is None:
        store = {}
        setattr(holder, "_mc_memory", store)
    if layer_idx not in store:
        store[layer_idx] = LayerMemory(config.max_cached_segments, config.cache_policy)
    return store[layer_idx]


def call_validity(mask: torch.Tensor | None, length: int, memory: LayerMemory) -> torch.Tensor | None:
    """The real tokens ``[B, length]`` of this call from an ``attention_mask`` (``[B, length]``
    or the whole sequence so far, ``[B, seen + length]``), or None when every token is real.

    Only left padding has a meaning for a recurrence (a row starts late); anything else is
    refused here rather than silently giving a row a result it would not get alone."""
    if mask is None:
        return None
    if mask.dim() != 2 or mask.shape[1] < length:
        raise MCError(f"attention_mask of shape {tuple(mask.shape)} does not cover the {length} tokens of this call")
    valid = mask[:, -length:].bool()
    if bool(valid.all()):
        return None
    if not bool((valid[:, 1:] >= valid[:, :-1]).all()):
        raise MCError("Memory Caching supports left padding only (padding_side='left'): "
                      "this attention_mask has padding after a real token")
    late = [r for r in range(valid.shape[0]) if not bool(valid[r].all()) and memory.real and memory.real[r] > 0]
    if late:
        raise MCError(f"rows {late} have padding after real tokens of an earlier call: pad on the left of the "
                      "first call only")
    return valid


def attach(mixer: nn.Module, gate: MCGate, cache_of, padding: bool = False) -> list:
    """Attach ``gate`` to ``mixer`` and the hooks that publish the running layer.

    ``cache_of(args, kwargs)`` returns the object the memory hangs on (or None).
    ``padding``: the family honours a left-padded ``attention_mask`` (its own recurrence
    ignores pads), so MC keeps a segment clock per row; otherwise padded calls are refused."""
    mixer.mc_gate = gate

    # The hooks find the gate through the module they run on, never through this closure:
    # copy.deepcopy copies a module's hooks by reference (functions are atomic to it), so a
    # closed-over gate would make a copy run on the original's parameters.
    def pre(module, args, kwargs):
        gate = module.mc_gate
        mask = kwargs.get("attention_mask")
        hidden = args[0] if args else next(iter(kwargs.values()), None)
        if mask is not None and not padding and not bool(mask.all()):
            raise MCError(f"padded batches are not supported with Memory Caching for {gate.config.family or 'this family'}: "
                          "run sequences of different lengths one at a time (or in equal-length batches)")
        holder = cache_of(args, kwargs)
        memory = memory_for(holder, gate.layer_idx, gate.config)
        valid = call_validity(mask, hidden.shape[1], memory) if padding and hidden is not None else None
        run = LayerRun(gate=gate, memory=memory, hidden=hidden, cache=holder, valid=valid)
        module._mc_token = _ACTIVE.set(run)

    def post(module, args, kwargs, output):
        token = getattr(module, "_mc_token", None)
        if token is not None:
            _ACTIVE.reset(token)
            module._mc_token = None

    return [
        mixer.register_forward_pre_hook(pre, with_kwargs=True),
        mixer.register_forward_hook(post, with_kwargs=True, always_call=True),
    ]


def detach(mixer: nn.Module) -> None:
    """Undo :func:`attach` on ``mixer`` (its hooks go with their handles): the gate and the
    running-layer token the pre-hook leaves are removed."""
    del mixer.mc_gate
    mixer.__dict__.pop("_mc_token", None)

"""What every family adapter provides, and the one place module-level ops get wrapped."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from ..layer import current


@dataclass
class StateInfo:
    """One layer's recurrent state, for ``inspect``: the tensors a cached segment keeps."""

    shapes: list[tuple[int, ...]]  # per batch element
    bytes_per_element: int  # of the cached copy (mc-retrofit caches states in fp32)
    key_dim: int  # width of a pooled key summary per head
    heads: int

    @property
    def state_bytes(self) -> int:
        n = 0
        for s in self.shapes:
            size = 1
            for d in s:
                size *= d
            n += size
        return n * self.bytes_per_element

    @property
    def summary_bytes(self) -> int:
        return self.heads * self.key_dim * 4


class Adapter:
    """A model family. Subclasses set the class attributes and implement the methods."""

    family: str = ""
    model_types: tuple[str, ...] = ()
    description: str = ""  # query / key summary / read, for the docs
    # The family's own layer honours a left-padded attention_mask (pads leave the state
    # untouched), so Memory Caching can keep a segment clock per row.
    supports_padding: bool = False
    # The formats the family also publishes checkpoints in besides transformers' layout
    # (``mc_retrofit.formats.ForeignFormat``: e.g. mamba_ssm's config.json and weight names).
    foreign_formats: tuple = ()
    # The online memory's gate-logit bias a conversion starts from when the user leaves
    # ``MCConfig.online_bias`` unset: 0 lets the gates weigh cached states as the paper's
    # Memory Caching does; a family whose model breaks under that weight declares more.
    default_online_bias: float = 0.0

    def model_class(self):
        raise NotImplementedError

    def matches(self, config) -> bool:
        return getattr(config, "model_type", None) in self.model_types

    def mixers(self, model: nn.Module) -> list[tuple[int, nn.Module]]:
        """(layer index, mixer module) for every recurrent layer, in order."""
        raise NotImplementedError

    def gate_dims(self, mixer: nn.Module, config) -> tuple[int, int]:
        """(heads, key width) of the gates of one mixer."""
        raise NotImplementedError

    # The keywords this family's model forward / recurrent layer (mixer) forward have
    # taken the recurrent cache under, newest first (transformers 5.24 renamed
    # ``cache_params`` and the hybrids' ``past_key_values`` to ``cache``); ``compat``
    # picks the one the installed library takes, or refuses with the tested window.
    cache_names: tuple[str, ...] = ("cache", "cache_params")
    mixer_cache_names: tuple[str, ...] = ("cache", "cache_params")

    # The family's forward writes its cache in place, layer by layer, into tensors it has
    # already read from (transformers' Mamba ``conv_states``/``ssm_states``, RWKV-4's
    # ``state`` list): once the cache holds values that depend on the gates, autograd refuses
    # the backward ("modified by an inplace operation"). Truncated backpropagation through the
    # cache then saves every tensor the forward keeps for the backward as a copy taken when it
    # was used (exactly the value the op computed with; one copy of the chunk's activations).
    writes_cache_in_place: bool = False

    def cache_reader(self, mixer: nn.Module):
        """``reader(args, kwargs)``: the object a call of ``mixer`` hangs its memory on (the
        family's cache), or None. The keyword is resolved once, here, for the installed
        library version."""
        from .. import compat

        name = compat.argument_name(type(mixer).forward, self.mixer_cache_names, f"{type(mixer).__name__}.forward")
        return functools.partial(_cache_keyword, name)

    # Where the family's core ops are module globals, and op name -> wrapper factory (a
    # ``passthrough``-decorated function): what Memory Caching wraps.
    op_module: str = ""
    op_wrappers: dict = {}

    def op_patches(self) -> list:
        """The family's module-level ops Memory Caching wraps (:func:`op_patch` each)."""
        return [op_patch(self.op_module, name, make, self.family) for name, make in self.op_wrappers.items()]

    def support_patches(self) -> list:
        """Foreign symbols the family needs replaced to run at all here, converted or not
        (fla's CPU routing): installed when its model class is asked for."""
        return []

    def patches(self) -> list:
        """Every foreign symbol this family has mc-retrofit replace (``mc_retrofit.compat.Patch``)."""
        return [*self.support_patches(), *self.op_patches()]

    def install(self) -> None:
        """Install :meth:`patches` (idempotent; support first: the op wrappers sit on top of it)."""
        from .. import compat

        compat.install(self.patches())

    def state_info(self, config) -> StateInfo:
        raise NotImplementedError

    def recurrent_layers(self, config) -> list[int]:
        """Indices of the recurrent layers, from the config alone (for ``inspect``)."""
        return list(range(config.num_hidden_layers))

    def prepare_save(self, model: nn.Module) -> None:
        """Bring weights into their saved form (e.g. undo in-place inference rescaling)."""

    def load_kwargs(self) -> dict:
        return {}


def _cache_keyword(name: str, args, kwargs):
    return kwargs.get(name)


def op_patch(module_name: str, name: str, make, family: str):
    """The "mc"-layer patch that replaces ``module_name.name`` by ``make(original)``. The
    wrapper must pass straight through to the original when no wrapped layer is running."""
    from .. import compat

    def wrapped(original):
        return functools.update_wrapper(make(original), original)

    return compat.Patch(module_name, name, wrapped, layer="mc", group=family,
                        why=f"Memory Caching reads and extends {family}'s recurrence through it")


def passthrough(make_mc):
    """Decorator for op wrappers: call the original op unless a wrapped layer runs."""

    def make(original):
        def wrapper(*args, **kwargs):
            run = current()
            if run is None:
                return original(*args, **kwargs)
            return make_mc(original, run, *args, **kwargs)

        return wrapper

    return make


def expand_heads(x: torch.Tensor, heads: int, dim: int = 2) -> torch.Tensor:
    """Repeat grouped tensors (GVA / n_groups) so every head has its own copy."""
    groups = x.shape[dim]
    return x if groups == heads else x.repeat_interleave(heads // groups, dim=dim)

"""Build and load small models of every supported family with the families' stock classes.

transformers families (mamba2, mamba) load by explicit class, because ``import fla``
re-registers the ``mamba``/``mamba2`` model types. fla families (delta_net, gated_deltanet,
retnet, gla, rwkv7) need a GPU, or ``mc_retrofit.adapters.fla.cpu`` to route fla's Triton ops to
torch on CPU; :func:`speed_context` makes CPU training of Mamba and the fla families fast.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

import fast_scan  # recipes/ is on sys.path wherever this module is imported

from mc_retrofit.adapters.fla import chunk as fast_chunk
from mc_retrofit.errors import MCError

# Small defaults: a few hundred K parameters at vocab 256 and hidden 128.
DEFAULTS: dict[str, dict] = {
    "mamba2": dict(hidden_size=128, num_hidden_layers=4, num_heads=8, head_dim=32, state_size=32, n_groups=1,
                   expand=2, chunk_size=64, tie_word_embeddings=True),
    "mamba": dict(hidden_size=128, num_hidden_layers=4, state_size=16, expand=2, tie_word_embeddings=True),
    "delta_net": dict(hidden_size=128, num_hidden_layers=4, num_heads=4, expand_k=1.0, expand_v=1.0,
                      hidden_ratio=2, tie_word_embeddings=True),
    "gated_deltanet": dict(hidden_size=128, num_hidden_layers=4, num_heads=4, head_dim=32, expand_v=1.0,
                           hidden_ratio=2, tie_word_embeddings=True),
    "retnet": dict(hidden_size=128, num_hidden_layers=4, num_heads=4, expand_k=1.0, expand_v=1.0, hidden_ratio=2,
                   tie_word_embeddings=True),
    "gla": dict(hidden_size=128, num_hidden_layers=4, num_heads=4, expand_k=0.5, expand_v=1.0, hidden_ratio=2,
                tie_word_embeddings=True),
    "rwkv7": dict(hidden_size=128, num_hidden_layers=4, head_dim=32, hidden_ratio=2, decay_low_rank_dim=16,
                  gate_low_rank_dim=32, a_low_rank_dim=16, v_low_rank_dim=8, tie_word_embeddings=True),
}

FAMILIES = tuple(DEFAULTS)


def enable_fla_cpu() -> None:
    """Route fla's Triton ops to torch on CPU, or say clearly why fla cannot run here."""
    if torch.cuda.is_available():
        return
    try:
        from mc_retrofit.adapters.fla import cpu as fla_cpu
    except ImportError:
        raise MCError("fla families need a CUDA GPU or mc_retrofit.adapters.fla.cpu (not installed)") from None
    fla_cpu.enable()


def speed_context(family: str):
    """While training/measuring on CPU: Mamba's linear-time-backward scan (fast_scan) and the
    fla families' chunkwise recurrences (fast_chunk); the same math as the stock CPU paths."""
    if family == "mamba":
        return fast_scan.patched()
    if is_fla(family) and not torch.cuda.is_available():
        return fast_chunk.patched()
    return contextlib.nullcontext()


def adapter(family: str):
    """The package's adapter for ``family``: the one registry of what each family is."""
    if family not in DEFAULTS:
        raise MCError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    from mc_retrofit.adapters import adapter_by_family

    return adapter_by_family(family)


def is_fla(family: str) -> bool:
    from mc_retrofit.adapters.fla import FlaAdapter

    return isinstance(adapter(family), FlaAdapter)


def classes(family: str):
    """(config class, model class) of ``family``, from its adapter (which loads fla's
    classes with the CPU routing in place, and transformers' by explicit class)."""
    model_cls = adapter(family).model_class()
    return model_cls.config_class, model_cls


def build(family: str, vocab_size: int = 256, seed: int = 0, **overrides):
    """A freshly initialised causal LM of ``family`` (defaults above, then ``overrides``)."""
    config_cls, model_cls = classes(family)
    kw = {**DEFAULTS[family], "vocab_size": vocab_size, "use_cache": False, **overrides}
    if is_fla(family):
        # fla's fused kernels are Triton: keep the plain torch paths so CPU training works.
        kw = {"fuse_norm": False, "fuse_swiglu": False, "fuse_cross_entropy": False, **kw}
        kw.setdefault("bos_token_id", 0)
        kw.setdefault("eos_token_id", 0)
    else:
        kw.setdefault("pad_token_id", 0)
        kw.setdefault("bos_token_id", 0)
        kw.setdefault("eos_token_id", 0)
    torch.manual_seed(seed)
    return model_cls(config_cls(**kw))


def family_of(path: str | Path) -> str:
    from mc_retrofit.adapters import adapter_for
    from mc_retrofit.model import read_hf_config

    family = adapter_for(read_hf_config(Path(path))).family
    if family not in DEFAULTS:
        raise MCError(f"{path}: family {family!r} is not one this recipe trains ({', '.join(FAMILIES)})")
    return family


def load(path: str | Path):
    """Load a checkpoint this recipe wrote (any family), in eval mode."""
    _, model_cls = classes(family_of(path))
    return model_cls.from_pretrained(str(path)).eval()


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())

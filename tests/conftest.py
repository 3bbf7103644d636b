"""Shared test fixtures: tiny models built from configs (nothing is downloaded) and
the real checkpoints under ../shared (tests that need them skip without it)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_flush_denormal(True)  # tiny random models hit denormals on CPU
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # one thread per xdist worker: oversubscribed cores run 10-100x slower

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MC_RETROFIT_SHARED", ROOT.parent / "shared"))
CHECKPOINTS = SHARED / "checkpoints"
DATA = SHARED / "data" / "gutenberg"


def shared_path(*parts) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} not available (../shared is absent)")
    return p


def count_calls(monkeypatch, owner, name: str) -> list:
    """Replace ``owner.name`` for the test by a spy that appends to the list returned on every
    call (so a test knows the path it meant to test really ran)."""
    calls, original = [], getattr(owner, name)

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, spy)
    return calls


def spans(*sizes: int) -> list[tuple[int, int]]:
    """Consecutive call spans of the given sizes from position 0: ``spans(8, 5)`` = [(0, 8), (8, 13)]."""
    out, a = [], 0
    for n in sizes:
        out.append((a, a + n))
        a += n
    return out


def logits_in_calls(model, x, calls, cache=None, call_kwargs=None):
    """``x [B, T]`` run as the calls ``calls`` (``[(start, end), ...]``) through one cache with
    ``mc_retrofit.forward_with_cache``, starting from ``cache``: (the calls' logits joined along
    the sequence, the final cache). ``call_kwargs(start, end, cache)`` gives a call's extra
    keywords (the positions some families need)."""
    import mc_retrofit

    parts = []
    for a, b in calls:
        out, cache = mc_retrofit.forward_with_cache(model, x[:, a:b], cache,
                                                    **(call_kwargs(a, b, cache) if call_kwargs else {}))
        parts.append(out.logits)
    return torch.cat(parts, 1), cache


def random_read_inputs(B: int, T: int, N: int, H: int, K: int, V: int, U: int | None = None, *, layout: str = "kv",
                       aggregation: str = "gated", top_k: int = 2, scale: float = 0.5,
                       n_visible: int | None = None):
    """A seeded :class:`mc_retrofit.core.ReadInputs` for read-out tests: ``N`` cached states,
    every token seeing ``n_visible`` of them (default all); gate inputs (u, pooled, online_pool)
    of width ``U``, or None without one."""
    from mc_retrofit.core import ReadInputs

    g = torch.Generator().manual_seed(0)
    states = torch.randn(B, N, H, K, V, generator=g)
    if layout == "vk":
        states = states.transpose(-1, -2).contiguous()
    q, online = torch.randn(B, T, H, K, generator=g), torch.randn(B, T, H, V, generator=g)
    gate = (None, None, None) if U is None else tuple(torch.randn(*shape, generator=g)
                                                      for shape in ((B, T, H, U), (B, N, H, U), (B, T, H, U)))
    visible = torch.full((T,), N if n_visible is None else n_visible)
    return ReadInputs(q=q, states=states, online=online, u=gate[0], pooled=gate[1], online_pool=gate[2],
                      n_visible=visible, aggregation=aggregation, top_k=top_k, scale=scale,
                      gate_scale=torch.ones(H), mix=torch.ones(H), layout=layout)


def tiny_model(family: str, seed: int = 0, **overrides):
    """A tiny randomly initialised model of a transformers family, in eval mode."""
    from transformers import (Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM, RwkvConfig,
                              RwkvForCausalLM)

    torch.manual_seed(seed)
    if family == "mamba2":
        cfg = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_heads=4, head_dim=16, state_size=8,
                   n_groups=2, expand=2, chunk_size=8, use_cache=False)
        model = Mamba2ForCausalLM(Mamba2Config(**{**cfg, **overrides}))
    elif family == "mamba":
        cfg = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2, use_cache=False)
        model = MambaForCausalLM(MambaConfig(**{**cfg, **overrides}))
    elif family == "rwkv4":
        cfg = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, attention_hidden_size=32,
                   intermediate_size=64, context_length=128)
        model = RwkvForCausalLM(RwkvConfig(**{**cfg, **overrides}))
    else:
        raise ValueError(family)
    return model.eval()


TRANSFORMERS_FAMILIES = ["mamba2", "mamba", "rwkv4"]

"""Tiny fla models built from configs, and the independent oracles the fla tests compare with.

The token-by-token reference runs the *base* fla model one token at a time with fla's
own ``Cache`` (so every layer's state after each token is fla's, not ours), snapshots
each MC layer's recurrent state at the segment boundaries, and recomputes every
layer's output from those snapshots with explicit aggregation: a per-layer forward hook
replaces the core op's output. It shares no code with ``run_segments``.
"""
from __future__ import annotations

import torch

import mc_retrofit

FAMILIES = ["delta_net", "gated_deltanet", "retnet", "gla", "rwkv6", "rwkv7"]

_TINY = {
    "delta_net": ("DeltaNetConfig", "DeltaNetForCausalLM", dict(num_heads=2, use_gate=True)),
    "gated_deltanet": ("GatedDeltaNetConfig", "GatedDeltaNetForCausalLM",
                       dict(num_heads=2, num_v_heads=4, head_dim=16, expand_v=1.0)),
    "retnet": ("RetNetConfig", "RetNetForCausalLM", dict(num_heads=2, num_kv_heads=1, expand_k=1.0, expand_v=1.0)),
    "gla": ("GLAConfig", "GLAForCausalLM", dict(num_heads=2, expand_k=0.5, expand_v=1.0)),
    "rwkv6": ("RWKV6Config", "RWKV6ForCausalLM", dict(num_heads=2, expand_k=0.5, expand_v=1.0, proj_low_rank_dim=8,
                                                     gate_low_rank_dim=16)),
    "rwkv7": ("RWKV7Config", "RWKV7ForCausalLM", dict(head_dim=16, decay_low_rank_dim=8, gate_low_rank_dim=16,
                                                     a_low_rank_dim=8, v_low_rank_dim=8)),
}


def tiny_fla_config(family: str, **overrides):
    import fla.models as fm

    from mc_retrofit.adapters.fla import import_fla

    import_fla()
    cfg_name, _, extra = _TINY[family]
    base = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, hidden_ratio=2, fuse_cross_entropy=False,
                fuse_norm=True, use_cache=True)
    return getattr(fm, cfg_name)(**{**base, **extra, **overrides})


def tiny_fla_model(family: str, seed: int = 0, **overrides):
    """A tiny random fla model (fp32, eval) whose weights are perturbed away from init
    (fla zero-initialises some projections, which would hide bugs)."""
    import fla.models as fm

    cfg = tiny_fla_config(family, **overrides)
    torch.manual_seed(seed)
    model = getattr(fm, _TINY[family][1])(cfg).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name:
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


# -- explicit per-family reads (written from each family's recurrence, not from the adapters)
def _l2(x):
    x = x.float()
    return x / torch.sqrt(x.square().sum(-1, keepdim=True) + 1e-6)


def _rep(x, heads):
    return x.repeat_interleave(heads // x.shape[-2], dim=-2)


def _q_read(S, q, scale, v_first):
    """``scale * q^T S`` for one token: S ``[B,H,K,V]`` (or ``[B,H,V,K]``), q ``[B,H,K]``."""
    eq = "bhvk,bhk->bhv" if v_first else "bhkv,bhk->bhv"
    return torch.einsum(eq, S.float(), q.float()) * scale


# family -> (query and summary key for a one-token call from the op's kwargs, read(S, query))
def _reads():
    def delta(kw):
        q, k = kw["q"][:, 0], kw["k"][:, 0]
        if kw.get("use_qk_l2norm_in_kernel"):
            q, k = _l2(q), _l2(k)
        return q, k, lambda S: _q_read(S, q, q.shape[-1] ** -0.5, False)

    def gdn(kw):
        hv = kw["v"].shape[2]
        q, k = _rep(_l2(kw["q"][:, 0]), hv), _rep(_l2(kw["k"][:, 0]), hv)
        return q, k, lambda S: _q_read(S, q, q.shape[-1] ** -0.5, True)

    def plain(v_first, scale1=False):
        def f(kw):
            q = kw["r"][:, 0] if "r" in kw else kw["q"][:, 0]
            return q, kw["k"][:, 0], lambda S: _q_read(S, q, 1.0 if scale1 else q.shape[-1] ** -0.5, v_first)

        return f

    return {"delta_net": delta, "gated_deltanet": gdn, "retnet": plain(False), "gla": plain(True),
            "rwkv6": plain(False, True), "rwkv7": plain(False, True)}


def token_reference(model, family: str, ids: torch.Tensor, segment_size: int, aggregation: str, top_k: int = 2,
                    read_of=None, names: tuple = (), online_bias: float = 0.0):
    """Logits of ``model`` (unconverted) fed one token at a time with fla's cache, every
    linear layer's core op output replaced by the explicit Memory Caching aggregate over
    the states fla itself produced at the segment boundaries (cloned snapshots).
    ``read_of(kw) -> (q, k, read)``: the query, key and read of one op call (default: the
    fla family's); ``names``: the op's positional argument names (transformers' hybrids call
    theirs positionally; fla's layers by keyword); ``online_bias``: added to the online
    memory's gate logit."""
    import importlib

    from mc_retrofit.adapters import adapter_for

    adapter = adapter_for(model.config)
    module = importlib.import_module(adapter.layer_module)
    read_of = read_of or _reads()[family]
    layer_cls = getattr(module, adapter.layer_class)
    order = {id(m): i for i, m in enumerate(m for m in model.modules() if isinstance(m, layer_cls))}
    book = {i: dict(states=[], pools=[], key_sum=0.0, fill=0) for i in order.values()}
    running = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a: running.__setitem__("layer", order[id(mod)]))
             for m in model.modules() if isinstance(m, layer_cls)]
    originals = {name: getattr(module, name) for name in adapter.ops}

    def make(orig):
        def op(*args, **kw):
            assert len(args) <= len(names), "positional op arguments need their names"
            kw = {**dict(zip(names, args)), **kw, "output_final_state": True}
            o, state = orig(**kw)
            b = book[running["layer"]]
            q, k, read = read_of(kw)
            b["key_sum"] = b["key_sum"] + k.float()
            b["fill"] += 1
            on = o[:, 0].float()  # [B, H, V]
            if b["states"]:
                reads = [read(S) for S in b["states"]]
                if aggregation == "residual":
                    agg = on + sum(reads)
                else:
                    gs = 1.0 / q.shape[-1] ** 0.5
                    logits = [(q.float() * (b["key_sum"] / b["fill"])).sum(-1) * gs + online_bias]
                    logits += [(q.float() * p).sum(-1) * gs for p in b["pools"]]
                    L = torch.stack(logits, -1)  # [B, H, 1 + N]
                    if aggregation == "ssc" and top_k < len(reads):
                        cached = L[..., 1:]
                        kth = cached.sort(-1, descending=True).values[..., top_k - 1:top_k]
                        L = torch.cat([L[..., :1], cached.masked_fill(cached < kth, float("-inf"))], -1)
                    w = torch.softmax(L, -1)
                    agg = w[..., 0:1] * on + sum(w[..., i + 1:i + 2] * r for i, r in enumerate(reads))
                o = agg[:, None].to(o.dtype)
            if b["fill"] == segment_size:
                b["states"].append(state.detach().float().clone())
                b["pools"].append(b["key_sum"] / b["fill"])
                b["key_sum"], b["fill"] = 0.0, 0
            return o, state

        return op

    try:
        for name, orig in originals.items():
            setattr(module, name, make(orig))
        cache, outs = None, []
        with torch.no_grad():
            for t in range(ids.shape[1]):
                out, cache = mc_retrofit.forward_with_cache(model, ids[:, t:t + 1], cache)
                outs.append(out.logits)
    finally:
        for name, orig in originals.items():
            setattr(module, name, orig)
        for h in hooks:
            h.remove()
    return torch.cat(outs, 1)


def tiny_qwen3_next(seed=0):
    """A tiny Qwen3-Next hybrid: one Gated DeltaNet layer, one full-attention layer."""
    from transformers import Qwen3NextConfig

    from mc_retrofit.adapters import adapter_by_family

    cls = adapter_by_family("qwen3_next").model_class()
    cfg = Qwen3NextConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
        linear_value_head_dim=8, intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=32,
        num_experts=2, num_experts_per_tok=1, layer_types=["linear_attention", "full_attention"])
    torch.manual_seed(seed)
    return cls(cfg).eval()

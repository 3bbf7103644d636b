"""Mamba2, Mamba and RWKV-4 (transformers) with Memory Caching, against independent oracles."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import TRANSFORMERS_FAMILIES, tiny_model
from oracles import ORACLES

import mc_retrofit
from mc_retrofit import MCConfig
from mc_retrofit.adapters import adapter_for

T = 29  # not a multiple of the segment sizes below unless stated


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def with_oracle(converted, config):
    """A copy of the converted model whose mixers are replaced by the token-by-token oracle."""
    oracle_model = copy.deepcopy(converted)
    oracle = ORACLES[config.family]
    for _, mixer in adapter_for(oracle_model.config).mixers(oracle_model):
        if not hasattr(mixer, "mc_gate"):
            continue
        if config.family == "rwkv4":
            mixer.forward = lambda hidden, state=None, use_cache=False, m=mixer: (oracle(m, hidden, config), state)
        else:
            mixer.forward = lambda hidden_states, m=mixer, **kw: oracle(m, hidden_states, config)
    return oracle_model


@pytest.mark.parametrize("family", TRANSFORMERS_FAMILIES)
@pytest.mark.parametrize("setting", ["long_segment", "cache_weight_0"])
def test_no_cache_read_equals_base(family, setting):
    base = tiny_model(family)
    x = torch.randint(0, 64, (2, T))
    ref = logits(base, x)
    cfg = MCConfig(segment_size=64) if setting == "long_segment" else MCConfig(segment_size=5, cache_weight=0.0)
    model = mc_retrofit.convert(copy.deepcopy(base), cfg)
    assert (logits(model, x) - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("family", TRANSFORMERS_FAMILIES)
def test_oracle_without_mc_equals_transformers(family):
    """The oracles themselves reproduce the family's own forward (so they can judge MC)."""
    base = tiny_model(family)
    x = torch.randint(0, 64, (2, T))
    cfg = MCConfig(segment_size=7, cache_weight=0.0)
    converted = mc_retrofit.convert(copy.deepcopy(base), cfg)
    assert (logits(with_oracle(converted, converted.mc.config), x) - logits(base, x)).abs().max() <= 1e-4


@pytest.mark.parametrize("family", TRANSFORMERS_FAMILIES)
@pytest.mark.parametrize("aggregation", ["residual", "gated", "ssc"])
@pytest.mark.parametrize("segment_size", [4, 7])
def test_mc_equals_token_by_token_oracle(family, aggregation, segment_size):
    base = tiny_model(family)
    x = torch.randint(0, 64, (3, T if segment_size == 7 else 28))
    cfg = MCConfig(segment_size=segment_size, aggregation=aggregation, top_k=2, temperature=0.05, online_bias=0.3,
                   cache_weight=0.8 if aggregation == "residual" else 1.0)
    model = mc_retrofit.convert(copy.deepcopy(base), cfg)
    with torch.no_grad():  # distinct per-head mixes so a head mix-up would show
        for gate in mc_retrofit.model.gate_modules(model).values():
            gate.cache_weight.mul_(torch.linspace(0.5, 1.0, gate.num_heads))
    got = logits(model, x)
    want = logits(with_oracle(model, model.mc.config), x)
    assert (got - logits(base, x)).abs().max() > 1e-3, "MC should change the output here"
    tol = 2e-4 if family == "rwkv4" else 1e-4
    assert (got - want).abs().max() <= tol


@pytest.mark.parametrize("family", TRANSFORMERS_FAMILIES)
def test_ssc_with_k_at_least_segments_equals_gated(family):
    base = tiny_model(family)
    x = torch.randint(0, 64, (2, T))
    gated = mc_retrofit.convert(copy.deepcopy(base), MCConfig(segment_size=6, aggregation="gated"))
    ssc = mc_retrofit.convert(copy.deepcopy(base), MCConfig(segment_size=6, aggregation="ssc", top_k=T // 6))
    assert (logits(gated, x) - logits(ssc, x)).abs().max() <= 1e-6


@pytest.mark.parametrize("family", TRANSFORMERS_FAMILIES)
def test_selected_layers_only(family):
    base = tiny_model(family)
    model = mc_retrofit.convert(copy.deepcopy(base), MCConfig(segment_size=4, layers=[1]))
    gates = mc_retrofit.model.gate_modules(model)
    assert [g.layer_idx for g in gates.values()] == [1]
    x = torch.randint(0, 64, (1, 20))
    want = logits(with_oracle(model, model.mc.config), x)
    assert (logits(model, x) - want).abs().max() <= 2e-4


def test_soup_is_an_alias_of_gated():
    assert MCConfig(aggregation="soup").aggregation == "gated"


def test_learned_gate_starts_uniform_and_trains():
    """The connector starts at zero (uniform gates) and receives gradient once mixed in."""
    base = tiny_model("mamba2")
    model = mc_retrofit.convert(copy.deepcopy(base), MCConfig(segment_size=4, gate_source="learned", cache_weight=0.5))
    x = torch.randint(0, 64, (2, 16))
    loss = model(x, labels=x).loss
    loss.backward()
    gates = list(mc_retrofit.model.gate_modules(model).values())
    assert all(g.connector.weight.grad is not None and g.connector.weight.grad.abs().sum() > 0 for g in gates)
    assert all(g.cache_weight.grad.abs().sum() > 0 for g in gates)

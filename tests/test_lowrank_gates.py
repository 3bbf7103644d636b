"""The lowrank gate source: starts exactly as the query gates, learns through both factors,
costs gate_rank * (d_model + H * U) parameters per layer, and saves and loads."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import mc_retrofit
from mc_retrofit import MCConfig, MCError
from mc_retrofit.model import gate_parameters


def _pair(family="mamba2", **kw):
    q = mc_retrofit.convert(tiny_model(family), MCConfig(segment_size=4, aggregation="gated", **kw))
    r = mc_retrofit.convert(tiny_model(family), MCConfig(segment_size=4, aggregation="gated", gate_source="lowrank",
                                                         gate_rank=3, **kw))
    return q, r


@pytest.mark.parametrize("family", ["mamba2", "mamba", "rwkv4"])
def test_lowrank_starts_as_the_query_gates(family):
    q, r = _pair(family)
    x = torch.randint(0, 64, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(q(x).logits, r(x).logits)


def test_lowrank_parameter_count_by_hand():
    _, r = _pair("mamba2")
    # tiny mamba2: d_model 32, 4 heads of key width 8 (state_size), 2 layers, rank 3
    per_layer = 3 * (32 + 4 * 8) + 3 * 4  # down + up + (cache_weight, log_temperature, online_bias) per head
    assert sum(p.numel() for _, p in gate_parameters(r)) == 2 * per_layer


def test_lowrank_learns_and_round_trips(tmp_path):
    _, r = _pair("mamba2")
    x = torch.randint(0, 64, (2, 19), generator=torch.Generator().manual_seed(1))
    r(x).logits.square().mean().backward()
    grads = {n.rsplit(".", 1)[0].rsplit(".", 1)[-1]: p.grad for n, p in gate_parameters(r)}
    assert grads["up"].abs().sum() > 0  # A is random, so B gets a gradient from the start
    with torch.no_grad():
        for n, p in gate_parameters(r):
            if n.endswith("up.weight"):
                p.normal_(0, 0.3)
    mc_retrofit.model.save_converted(r, tmp_path / "lr")
    back = mc_retrofit.load(tmp_path / "lr")
    with torch.no_grad():
        assert torch.equal(back(x).logits, r(x).logits)


def test_gate_rank_needs_lowrank_and_a_positive_int():
    with pytest.raises(MCError, match="gate_rank"):
        MCConfig(gate_source="lowrank", gate_rank=0)
    with pytest.raises(MCError, match="gate_rank"):
        MCConfig(gate_rank=True)
    assert MCConfig().ignored({"gate_rank"}) and not MCConfig(gate_source="lowrank").ignored({"gate_rank"})

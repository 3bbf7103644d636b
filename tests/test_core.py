"""The MC core on hand-computed cases and properties."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import aggregate

from mc_retrofit import MCConfig, MCError
from mc_retrofit.core import ReadInputs, gate_weights, readout_reference, segment_pieces


def test_segment_pieces_constant_hand_cases():
    assert segment_pieces(0, 0, 10, "constant", 4) == (False, [(0, 4, True), (4, 8, True), (8, 10, False)])
    # continuing a call that left 2 tokens in the open segment
    assert segment_pieces(10, 2, 5, "constant", 4) == (False, [(0, 2, True), (2, 5, False)])
    assert segment_pieces(0, 0, 8, "constant", 4) == (False, [(0, 4, True), (4, 8, True)])
    assert segment_pieces(3, 3, 1, "constant", 4) == (False, [(0, 1, True)])


def test_segment_pieces_log_hand_cases():
    assert segment_pieces(0, 0, 37, "log", 0) == (False, [(0, 32, True), (32, 36, True), (36, 37, False)])
    assert segment_pieces(37, 1, 1, "log", 0) == (False, [(0, 1, False)])  # decoding joins the open segment
    assert segment_pieces(37, 1, 2, "log", 0) == (True, [(0, 2, False)])


@given(pos=st.integers(0, 50), size=st.integers(1, 9), length=st.integers(1, 40))
def test_segment_pieces_constant_cover_and_close_at_multiples(pos, size, length):
    fill = pos % size
    _, pieces = segment_pieces(pos, fill, length, "constant", size)
    assert pieces[0][0] == 0 and pieces[-1][1] == length
    assert all(a < b for a, b, _ in pieces)
    assert all(p[1] == q[0] for p, q in zip(pieces, pieces[1:]))
    for a, b, closes in pieces:
        assert closes == ((pos + b) % size == 0)
        assert (pos + a) // size == (pos + b - 1) // size  # one segment per piece


def test_gate_weights_hand_computed():
    # one token, one head, U=2, two cached segments, scale 1
    u = torch.tensor([[[[1.0, 0.0]]]])
    pooled = torch.tensor([[[[2.0, 0.0]], [[0.0, 5.0]]]])  # [B=1, N=2, H=1, U=2]
    online_pool = torch.tensor([[[[1.0, 1.0]]]])
    nv = torch.tensor([2])
    g = torch.ones(1)
    w = gate_weights(u, pooled, online_pool, nv, "gated", 2, g, online_bias=0.5)[0, 0, 0]
    e = [math.exp(1.5), math.exp(2.0), math.exp(0.0)]
    assert torch.allclose(w, torch.tensor(e) / sum(e))
    w = gate_weights(u, pooled, online_pool, nv, "ssc", 1, g, online_bias=0.5)[0, 0, 0]
    e = [math.exp(1.5), math.exp(2.0)]
    assert torch.allclose(w, torch.tensor(e + [0.0]) / sum(e))
    w = gate_weights(u, pooled, online_pool, nv, "residual", 1, g)[0, 0, 0]
    assert w.tolist() == [1.0, 1.0, 1.0]
    w = gate_weights(u, pooled, online_pool, torch.tensor([1]), "gated", 2, g)[0, 0, 0]
    assert w[2] == 0.0  # a segment not yet completed is never read


def test_per_head_online_bias_hand_computed():
    # two heads of the hand case above; head 0's bias 0.5, head 1's bias 30 (the online read only)
    u = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    pooled = torch.tensor([[[[2.0, 0.0], [2.0, 0.0]], [[0.0, 5.0], [0.0, 5.0]]]])  # [B=1, N=2, H=2, U=2]
    online_pool = torch.ones(1, 1, 2, 2)
    nv, g = torch.tensor([2]), torch.ones(2)
    bias = torch.tensor([0.5, 30.0], requires_grad=True)
    w = gate_weights(u, pooled, online_pool, nv, "gated", 2, g, online_bias=bias)[0, 0]
    e = [math.exp(1.5), math.exp(2.0), math.exp(0.0)]
    assert torch.allclose(w[0], torch.tensor(e) / sum(e))
    assert abs(float(w[1, 0].detach()) - 1.0) < 1e-6 and float(w[1, 1:].detach().max()) < 1e-6
    # d w_0 / d b = w_0 (1 - w_0), per head: the gradient reaches the bias tensor
    w[:, 0].sum().backward()
    w0 = e[0] / sum(e)
    assert torch.allclose(bias.grad[0], torch.tensor(w0 * (1 - w0)))
    # the float gives bit for bit what a tensor holding it on every head gives
    flt = gate_weights(u, pooled, online_pool, nv, "ssc", 1, g, online_bias=0.5)
    assert torch.equal(flt, gate_weights(u, pooled, online_pool, nv, "ssc", 1, g, online_bias=torch.full((2,), 0.5)))


def test_large_online_bias_reads_the_online_memory_only():
    x = _random_inputs(1, 6, 3, 2, 4, 3, seed=4)
    nv = torch.tensor([0, 1, 2, 3, 3, 3])
    y = readout_reference(ReadInputs(*x.values(), nv, aggregation="gated", top_k=2, scale=0.5,
                                     gate_scale=torch.full((2,), 0.1), mix=torch.ones(2),
                                     online_bias=torch.tensor([30.0, 0.0])))
    assert torch.allclose(y[:, :, 0], x["online"][:, :, 0], atol=1e-6, rtol=0)
    assert (y[:, 1:, 1] - x["online"][:, 1:, 1]).abs().max() > 1e-2  # head 1 still reads its cache


def _random_inputs(B, T, N, H, K, V, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen).to(dtype)
    return dict(q=r(B, T, H, K), states=r(B, N, H, K, V) if N else None, online=r(B, T, H, V), u=r(B, T, H, K),
                pooled=r(B, N, H, K) if N else None, online_pool=r(B, T, H, K))


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 2), T=st.integers(1, 9), N=st.integers(0, 4), H=st.integers(1, 3), K=st.integers(1, 5),
       V=st.integers(1, 4), agg=st.sampled_from(["residual", "gated", "ssc"]), top_k=st.integers(1, 4),
       seed=st.integers(0, 999), vk=st.booleans())
def test_readout_matches_per_token_oracle(B, T, N, H, K, V, agg, top_k, seed, vk):
    x = _random_inputs(B, T, N, H, K, V, seed)
    nv = torch.randint(0, N + 1, (T,), generator=torch.Generator().manual_seed(seed))
    gs, mix = torch.full((H,), 1 / math.sqrt(K)), torch.rand(H, generator=torch.Generator().manual_seed(seed))
    bias = torch.arange(H) * 0.3 - 0.2  # per head, like the gate's online_bias
    states = x["states"]
    if vk and states is not None:
        states = states.transpose(-1, -2).contiguous()
    y = readout_reference(ReadInputs(x["q"], states, x["online"], x["u"], x["pooled"], x["online_pool"], nv,
                                     aggregation=agg, top_k=top_k, scale=0.5, gate_scale=gs, mix=mix, online_bias=bias,
                                     layout="vk" if vk else "kv"))
    for b in range(B):
        for t in range(T):
            n = int(nv[t])
            reads = [0.5 * torch.einsum("hk,hkv->hv", x["q"][b, t], x["states"][b, i]) for i in range(n)]
            pooled = [x["pooled"][b, i] for i in range(n)]
            want = aggregate(x["online"][b, t], reads, x["u"][b, t], pooled, x["online_pool"][b, t],
                             aggregation=agg, top_k=top_k, temperature=1.0, online_bias=bias, mix=mix)
            assert torch.allclose(y[b, t], want, atol=1e-5), (b, t)


@settings(max_examples=15, deadline=None)
@given(T=st.integers(1, 8), N=st.integers(1, 4), seed=st.integers(0, 99),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_ssc_with_k_ge_n_equals_gated_and_mix_zero_is_identity(T, N, seed, dtype):
    x = _random_inputs(2, T, N, 2, 4, 3, seed, dtype)
    nv = torch.full((T,), N)
    kw = dict(scale=1.0, gate_scale=torch.ones(2), mix=torch.ones(2))
    gated = readout_reference(ReadInputs(*x.values(), nv, aggregation="gated", top_k=1, **kw))
    ssc = readout_reference(ReadInputs(*x.values(), nv, aggregation="ssc", top_k=N, **kw))
    assert gated.dtype == dtype and torch.equal(gated, ssc)
    off = readout_reference(ReadInputs(*x.values(), nv, aggregation="gated", top_k=1, **{**kw, "mix": torch.zeros(2)}))
    assert torch.equal(off, x["online"])


def test_config_validation_messages():
    with pytest.raises(MCError, match="aggregation must be one of"):
        MCConfig(aggregation="mean")
    with pytest.raises(MCError, match="segment_size"):
        MCConfig(segment_size=0)
    with pytest.raises(MCError, match="unknown mc_config field"):
        MCConfig.from_dict({"segment_sise": 3})
    with pytest.raises(MCError, match="newer"):
        MCConfig(format_version=99)
    c = MCConfig(segmentation="log", aggregation="soup", layers=[2, 0, 2])
    assert MCConfig.from_json(c.to_json()) == c and c.layers == [0, 2]

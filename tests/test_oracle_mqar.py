"""The MQAR oracle study (recipes/studies/oracle_mqar.py) against hand-computed cases: which
cache holds the asked pair, the oracle's per-token mix, and the router's rank of that cache."""
from __future__ import annotations

import sys

import pytest
import torch

from conftest import ROOT, random_read_inputs

sys.path.insert(0, str(ROOT / "recipes" / "studies"))
import oracle_mqar  # noqa: E402


@pytest.fixture(autouse=True)
def _state():
    saved = dict(oracle_mqar.STATE)
    yield
    oracle_mqar.STATE.clear()
    oracle_mqar.STATE.update(saved)


def test_freshest_cache_is_the_segment_that_stored_the_asked_pair():
    oracle_mqar.STATE["seg"] = 4
    #                   k0  v0 k1  v1 k2  v2  .  q(k2) . q(k0) . q(k1)
    ids = torch.tensor([[5, 70, 7, 71, 9, 72, 1, 9, 3, 5, 2, 7]])
    targets = torch.full_like(ids, -100)
    targets[0, 7], targets[0, 9], targets[0, 11] = 72, 70, 71
    j = oracle_mqar.freshest_cache(ids, targets, n_pairs=3)
    want = torch.full_like(ids, -1)
    want[0, 7] = 1  # pair 2's value sits at position 5: segment 5 // 4 = 1
    want[0, 9] = 0  # pair 0's value at position 1: segment 0
    want[0, 11] = 0  # pair 1's value at position 3, the last of segment 0
    assert torch.equal(j, want)
    oracle_mqar.STATE["lag"] = 1  # written a token later: pair 1 reaches only the next cache
    want[0, 11] = 1
    assert torch.equal(oracle_mqar.freshest_cache(ids, targets, n_pairs=3), want)


def _inputs(k: int, layout: str = "kv"):
    return random_read_inputs(2, 4, k, 2, 3, 5, 3, layout=layout, aggregation="ssc")  # B, T, N=k, H, K, V, U


def test_oracle_mixes_each_query_tokens_own_cache():
    seg, k = 4, 3  # this call is segment 3: positions 12..15, caches 0..2 visible
    oracle_mqar.STATE.update(seg=seg, w=0.25)
    j = torch.full((2, 16), -1)
    j[0, 13], j[1, 12], j[1, 15] = 2, 0, 3  # sequence 1, position 15: its pair's cache is not visible yet
    oracle_mqar.STATE["j"] = j
    for layout in ("kv", "vk"):
        x = _inputs(k, layout)
        got = oracle_mqar.oracle_readout(x)
        want = x.online.clone()
        for b, t, jj in ((0, 1, 2), (1, 0, 0)):
            S = x.states[b, jj] if layout == "kv" else x.states[b, jj].transpose(-1, -2)
            read = torch.stack([0.5 * x.q[b, t, h] @ S[h] for h in range(2)])  # q^T S_j, per head
            want[b, t] = 0.75 * x.online[b, t] + 0.25 * read
        assert torch.allclose(got, want, atol=1e-6)
    oracle_mqar.STATE["w"] = 0.0
    assert torch.equal(oracle_mqar.oracle_readout(x), x.online)


def test_router_rank_of_the_freshest_cache():
    seg, k = 4, 3
    oracle_mqar.STATE.update(seg=seg, ranks=[[]])
    j = torch.full((2, 16), -1)
    j[0, 13], j[1, 12] = 2, 0
    oracle_mqar.STATE["j"] = j
    x = _inputs(k)
    out = oracle_mqar.measure(x)
    from mc_retrofit.core import readout_reference

    assert torch.equal(out, readout_reference(x))  # measuring changes nothing
    got = oracle_mqar.STATE["ranks"][0][0]
    want = []
    for b, t, jj in ((0, 1, 2), (1, 0, 0)):  # row-major order of the query tokens, then heads
        for h in range(2):
            scores = [float(x.u[b, t, h] @ x.pooled[b, n, h]) for n in range(k)]
            want.append(sum(s > scores[jj] for s in scores))
    assert got.tolist() == want

"""Perplexity by position and length against a direct computation from the model's own
full logits; window choice; sharded runs merge to the unsharded result."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import mc_retrofit
from mc_retrofit.errors import MCError
from mc_retrofit import distributed as dist
from mc_retrofit.eval import forward, perplexity

from conftest import tiny_model


def _docs(n=3, size=700, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(f"doc{i}", torch.randint(0, 256, (size + 37 * i,), generator=g)) for i in range(n)]


@pytest.fixture(scope="module")
def model():
    return tiny_model("mamba2", vocab_size=256)


def test_token_nll_equals_cross_entropy_of_full_logits(model, monkeypatch):
    monkeypatch.setattr(forward, "HEAD_SLICE", 7)  # exercise the sliced output head
    ids = torch.randint(0, 256, (2, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    direct = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1), reduction="none")
    got = forward.token_nll(model, ids)
    torch.testing.assert_close(got, direct.view(2, 49), atol=1e-5, rtol=1e-5)


def test_records_and_summary_match_a_direct_computation(model):
    docs = _docs()
    windows = perplexity.make_windows(docs, [40, 96], windows=3, seed=5)
    recs = perplexity.score_windows(model, windows, bucket=16, device="cpu", batch_size=2, variant="base")
    summary = perplexity.summarise(recs, ["base"])
    for L in (40, 96):
        ws = [w for w in windows if w.length == L]
        ids = torch.stack([w.ids for w in ws])
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").double()
        row = summary["by_length"]["base"][str(L)]
        assert row["tokens"] == 3 * (L - 1)
        assert abs(row["bits_per_token"] - float(nll.mean()) / math.log(2)) < 1e-5
        assert abs(row["perplexity"] - math.exp(float(nll.mean()))) < 1e-4 * row["perplexity"]
        pos = summary["by_position"]["base"][str(L)]
        for b, (s, e) in enumerate(zip(pos["start"], pos["end"])):
            # bucket b holds the predictions of tokens s..e-1 (token 0 is never predicted)
            cols = [j - 1 for j in range(max(1, s), e)]
            want = float(nll[:, cols].mean()) / math.log(2)
            assert abs(pos["bits_per_token"][b] - want) < 1e-5


def test_windows_are_seeded_and_inside_their_documents():
    docs = dict(_docs())
    a = perplexity.make_windows(list(docs.items()), [64, 700], windows=4, seed=0)
    b = perplexity.make_windows(list(docs.items()), [64, 700], windows=4, seed=0)
    c = perplexity.make_windows(list(docs.items()), [64, 700], windows=4, seed=1)
    assert [(w.doc, w.start) for w in a] == [(w.doc, w.start) for w in b]
    assert [(w.doc, w.start) for w in a] != [(w.doc, w.start) for w in c]
    for w in a:
        assert torch.equal(w.ids, docs[w.doc][w.start:w.start + w.length])
    with pytest.raises(MCError, match="no document has"):
        perplexity.make_windows(list(docs.items()), [10_000], windows=1, seed=0)


def test_cache_weight_zero_variant_scores_like_the_base(model):
    windows = perplexity.make_windows(_docs(), [80], windows=2, seed=0)
    mc = mc_retrofit.convert(copy.deepcopy(model), mc_retrofit.MCConfig(segment_size=16, cache_weight=0.0))
    on = mc_retrofit.convert(copy.deepcopy(model), mc_retrofit.MCConfig(segment_size=16))
    base = perplexity.score_windows(model, windows, 16, "cpu", 2, "base")
    off = perplexity.score_windows(mc, windows, 16, "cpu", 2, "off")
    diff = perplexity.score_windows(on, windows, 16, "cpu", 2, "on")
    for r0, r1, r2 in zip(base, off, diff):
        assert abs(r0["nll_sum"] - r1["nll_sum"]) < 1e-3
        # before the first segment closes, MC reads nothing: the first bucket is the base's
        assert abs(r0["bucket_nll"][0] - r2["bucket_nll"][0]) < 1e-3
    assert any(abs(r0["nll_sum"] - r2["nll_sum"]) > 1e-3 for r0, r2 in zip(base, diff))


@settings(max_examples=8, deadline=None)
@given(size=st.integers(1, 4), n=st.integers(1, 9))
def test_shards_partition_the_items(size, n):
    items = list(range(n))
    parts = [dist.shard(items, dist.World(r, size)) for r in range(size)]
    assert sorted(x for p in parts for x in p) == items
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_sharded_records_merge_to_the_unsharded_summary(model):
    windows = perplexity.make_windows(_docs(), [48, 64], windows=3, seed=2)
    whole = perplexity.summarise(perplexity.score_windows(model, windows, 16, "cpu", 4, "base"), ["base"])
    merged = []
    for r in range(2):
        merged += perplexity.score_windows(model, dist.shard(windows, dist.World(r, 2)), 16, "cpu", 4, "base")
    parts = perplexity.summarise(merged, ["base"])
    for L in ("48", "64"):
        assert abs(whole["by_length"]["base"][L]["bits_per_token"] - parts["by_length"]["base"][L]["bits_per_token"]) < 1e-6

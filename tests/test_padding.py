"""Left-padded batches: every row keeps its own segment clock, so each sequence of a
padded batch gets exactly what it gets alone (forward, split prefill, generate, capped
caches); what cannot be honoured (right padding, families without mask support) is refused."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

import mc_retrofit
from mc_retrofit import MCConfig, MCError, cache_stats
from mc_retrofit.core import batch_pieces, segment_pieces

PADS = [0, 5, 2, 9]


def _batch(pads, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, 64, (len(pads), length), generator=g)
    mask = torch.ones_like(x)
    for r, p in enumerate(pads):
        mask[r, :p] = 0
    return x, mask


@pytest.mark.parametrize("family", ["mamba2", "mamba"])
@pytest.mark.parametrize("aggregation,segmentation", [("residual", "constant"), ("gated", "constant"),
                                                      ("ssc", "constant"), ("gated", "log")])
def test_left_padded_batch_equals_each_row_alone(family, aggregation, segmentation):
    model = mc_retrofit.convert(tiny_model(family), MCConfig(segment_size=3, aggregation=aggregation, top_k=1,
                                                             segmentation=segmentation))
    x, mask = _batch(PADS, 17)
    with torch.no_grad():
        full = model(x, attention_mask=mask).logits
        for r, p in enumerate(PADS):
            alone = model(x[r:r + 1, p:]).logits[0]
            assert (full[r, p:] - alone).abs().max() <= 1e-5, (r, p)


@pytest.mark.parametrize("family", ["mamba2", "mamba"])
@pytest.mark.parametrize("cap,policy", [(None, "recent"), (2, "recent"), (3, "log")])
def test_generate_on_a_left_padded_batch_equals_each_row_alone(family, cap, policy):
    model = mc_retrofit.convert(tiny_model(family), MCConfig(segment_size=2, aggregation="gated",
                                                             max_cached_segments=cap, cache_policy=policy))
    x, mask = _batch([0, 3, 6], 11, seed=1)
    kw = dict(max_new_tokens=7, do_sample=False, output_logits=True, return_dict_in_generate=True, use_cache=True)
    with torch.no_grad():
        batched = torch.stack(model.generate(x, attention_mask=mask, **kw).logits, 1)
        for r, p in enumerate([0, 3, 6]):
            alone = torch.stack(model.generate(x[r:r + 1, p:], **kw).logits, 1)[0]
            assert (batched[r] - alone).abs().max() <= 1e-5, (r, p)


def test_padding_spread_over_split_prefill_calls():
    """A row whose padding outlasts the first call starts its clock in the second."""
    model = mc_retrofit.convert(tiny_model("mamba2"), MCConfig(segment_size=3, aggregation="gated"))
    x, mask = _batch([0, 7], 16, seed=2)
    with torch.no_grad():
        full = model(x, attention_mask=mask).logits
        a = model(x[:, :5], attention_mask=mask[:, :5], use_cache=True)
        b, cache = mc_retrofit.forward_with_cache(model, x[:, 5:], mc_retrofit.returned_cache(a),
                                                  attention_mask=mask, cache_position=torch.arange(5, 16))
    split = torch.cat([a.logits, b.logits], 1)
    assert (split[0] - full[0]).abs().max() <= 1e-5
    assert (split[1, 7:] - full[1, 7:]).abs().max() <= 1e-5
    segs = {idx: v["segments"] for idx, v in cache_stats(cache)["layers"].items()}
    assert set(segs.values()) == {5}  # row 0: 16 // 3 segments (row 1 holds 9 // 3 = 3 of the 5 slots)
    mem = cache._mc_memory[0]
    assert mem.counts == [5, 3] and mem.real == [16, 9]


def test_right_padding_and_holes_are_refused():
    model = mc_retrofit.convert(tiny_model("mamba2"), MCConfig(segment_size=4))
    x, _ = _batch([0, 0], 10)
    right = torch.ones_like(x)
    right[1, -3:] = 0
    with pytest.raises(MCError, match="left padding only"):
        model(x, attention_mask=right)
    with torch.no_grad():  # an all-ones mask is the unpadded run
        assert torch.equal(model(x, attention_mask=torch.ones_like(x)).logits, model(x).logits)


def test_padding_after_real_tokens_of_an_earlier_call_is_refused():
    model = mc_retrofit.convert(tiny_model("mamba2"), MCConfig(segment_size=4))
    x, _ = _batch([0, 0], 10)
    with torch.no_grad():
        out = model(x[:, :6], use_cache=True)
        late = torch.ones(2, 4, dtype=torch.long)
        late[1, :2] = 0
        with pytest.raises(MCError, match="pad on the left of the first call"):
            mc_retrofit.forward_with_cache(model, x[:, 6:], mc_retrofit.returned_cache(out), attention_mask=late,
                                           cache_position=torch.arange(6, 10))


def test_families_without_mask_support_refuse_padding():
    model = mc_retrofit.convert(tiny_model("rwkv4"), MCConfig(segment_size=4))
    x, mask = _batch([0, 3], 10)
    mixer = model.rwkv.blocks[0].attention
    with pytest.raises(MCError, match="padded batches are not supported with Memory Caching for rwkv4"):
        mixer._forward_pre_hooks[next(iter(mixer._forward_pre_hooks))](mixer, (torch.zeros(2, 10, 32),),
                                                                       {"attention_mask": mask})


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.tuples(st.integers(0, 20), st.integers(0, 6), st.integers(0, 12)), min_size=1, max_size=4),
       length=st.integers(1, 25), size=st.integers(1, 7), segmentation=st.sampled_from(["constant", "log"]))
def test_batch_pieces_splits_every_row_as_it_would_be_split_alone(rows, length, size, segmentation):
    reals = [r for r, _, _ in rows]
    fills = [min(f, size - 1) if segmentation == "constant" else f for _, f, _ in rows]
    starts = [min(s, length) for _, _, s in rows]
    before, spans = batch_pieces(reals, fills, starts, length, segmentation, size)
    assert spans[0][0] == 0 and spans[-1][1] == length
    assert all(a < b for a, b, _ in spans) and all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1))
    for r in range(len(rows)):
        alone_before, pieces = segment_pieces(reals[r], fills[r], length - starts[r], segmentation, size)
        closes = [starts[r] + e for _, e, c in pieces if c]
        assert (r in before) == alone_before
        assert [b for _, b, rows_closing in spans if r in rows_closing] == closes

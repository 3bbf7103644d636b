"""Left-padded batches on the fla families under Memory Caching: each row of a padded batch
gets what it gets alone (forward, split prefill, generate), with its own segment clock.

fla's attention layers unpad a masked batch themselves (``cu_seqlens``, rows packed into
batch 1); the MC op wrapper runs each segment piece packed again from each row's own state.
The RWKV layers zero the pads instead and run the padded batch. The oracles are the same
model run on each row alone and, with Memory Caching off, the unconverted fla model."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("fla")
pytestmark = pytest.mark.filterwarnings("ignore:According to Bo", "ignore:Triton is not supported")

import mc_retrofit as mc  # noqa: E402
from mc_retrofit.errors import MCError  # noqa: E402

from fla_oracles import FAMILIES, tiny_fla_model  # noqa: E402

TOL = 1e-5
PADS = [0, 5, 2, 9]  # the longest row (row 0) has no padding


def _batch(pads, length, seed=0):
    x = torch.randint(1, 64, (len(pads), length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(x)
    for r, p in enumerate(pads):
        mask[r, :p] = 0
    return x, mask


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pads", [PADS, [4]], ids=["batch", "one_row"])
def test_left_padded_batch_equals_each_row_alone(family, pads):
    """Segment size 3 does not divide any row's length; the late rows do read cached segments
    (MC on differs from MC off there), and still equal the row alone."""
    model = mc.convert(tiny_fla_model(family), mc.MCConfig(segment_size=3, aggregation="gated"))
    off = mc.convert(tiny_fla_model(family), mc.MCConfig(segment_size=3, cache_weight=0.0))
    x, mask = _batch(pads, 17)
    full = _logits(model, x, attention_mask=mask)
    for r, p in enumerate(pads):
        alone = _logits(model, x[r:r + 1, p:])[0]
        assert (full[r, p:] - alone).abs().max() <= TOL, (r, p)
        assert (alone - _logits(off, x[r:r + 1, p:])[0])[3:].abs().max() > 1e-3  # cached segments are read


def test_kda_left_padded_batch_equals_each_row_alone():
    """KDA (Gated DeltaNet's adapter, its own fla layer) unpads like the others."""
    from test_hybrids_gdn import tiny

    model = mc.convert(tiny("kda"), mc.MCConfig(segment_size=3, aggregation="gated"))
    x, mask = _batch(PADS, 14, seed=5)
    full = _logits(model, x, attention_mask=mask)
    for r, p in enumerate(PADS):
        assert (full[r, p:] - _logits(model, x[r:r + 1, p:])[0]).abs().max() <= TOL, (r, p)


@pytest.mark.parametrize("family", FAMILIES)
def test_memory_caching_off_with_padding_is_the_fla_model_with_padding(family):
    x, mask = _batch(PADS, 13, seed=3)
    base = _logits(tiny_fla_model(family), x, attention_mask=mask)
    off = mc.convert(tiny_fla_model(family), mc.MCConfig(segment_size=3, cache_weight=0.0))
    valid = mask.bool()
    assert (_logits(off, x, attention_mask=mask)[valid] - base[valid]).abs().max() <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_on_a_left_padded_batch_equals_each_row_alone(family):
    """Split prefill + decoding: one token per row per step, the mask growing; every row's
    clock (segment size 2) keeps its own phase across the decoding steps."""
    model = mc.convert(tiny_fla_model(family), mc.MCConfig(segment_size=2, aggregation="gated"))
    pads = [0, 3, 6]
    x, mask = _batch(pads, 11, seed=1)
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True,
              use_cache=True)  # min_new_tokens: no row stops early at a random tiny model's eos
    with torch.no_grad():
        batched = torch.stack(model.generate(x, attention_mask=mask, **kw).logits, 1)
        for r, p in enumerate(pads):
            alone = torch.stack(model.generate(x[r:r + 1, p:], **kw).logits, 1)[0]
            assert (batched[r] - alone).abs().max() <= TOL, (r, p)


@pytest.mark.parametrize("family", ["gla", "gated_deltanet"])
def test_padding_spread_over_split_prefill_calls(family):
    """Row 1's padding outlasts the first call (all pads there): its clock starts in the second."""
    model = mc.convert(tiny_fla_model(family), mc.MCConfig(segment_size=3, aggregation="gated"))
    x, mask = _batch([0, 7], 16, seed=2)
    with torch.no_grad():
        full = model(x, attention_mask=mask).logits
        a = model(x[:, :5], attention_mask=mask[:, :5], use_cache=True)
        b, cache = mc.forward_with_cache(model, x[:, 5:], mc.returned_cache(a), attention_mask=mask)
    split = torch.cat([a.logits, b.logits], 1)
    assert (split[0] - full[0]).abs().max() <= TOL
    assert (split[1, 7:] - full[1, 7:]).abs().max() <= TOL
    assert cache._mc_memory[0].counts == [5, 3] and cache._mc_memory[0].real == [16, 9]


def test_right_padding_is_refused():
    model = mc.convert(tiny_fla_model("gla"), mc.MCConfig(segment_size=4))
    x, _ = _batch([0, 0], 10)
    right = torch.ones_like(x)
    right[1, -3:] = 0
    with pytest.raises(MCError, match="left padding only"):
        _logits(model, x, attention_mask=right)


def test_packed_input_without_a_mask_is_refused():
    """cu_seqlens handed in by the caller (not the layer's own unpadding of a mask): refused."""
    model = mc.convert(tiny_fla_model("gla"), mc.MCConfig(segment_size=4))
    x = torch.randint(1, 64, (1, 10), generator=torch.Generator().manual_seed(4))
    with pytest.raises(MCError, match="packed variable-length input"):
        _logits(model, x, cu_seqlens=torch.tensor([0, 4, 10]))

"""Batched RWKV-4 decoding: transformers' one-token step broadcasts the previous hidden
``[B, C]`` against the token ``[B, 1, C]`` (B x B outputs); the family's support patch
(``rwkv4.SHIFT_PATCHES``) makes each row equal itself alone, with and without MC."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import mc_retrofit
from mc_retrofit import MCConfig, compat
from mc_retrofit.adapters import adapter_by_family
from mc_retrofit.adapters.transformers.rwkv4 import SHIFT_PATCHES


def _greedy(model, ids, n=6):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                              pad_token_id=0, output_logits=True, return_dict_in_generate=True, use_cache=True)


def test_unpatched_transformers_step_is_broken_for_batch_above_one():
    """Why the patch exists: transformers' own feed-forward step (the attribute the patch
    replaced) returns [B, B, C] for a batch of 3, the patched one [B, 1, C] equal to the
    multi-token path's last position."""
    adapter_by_family("rwkv4").model_class()
    ffn = tiny_model("rwkv4").rwkv.blocks[0].feed_forward
    original = compat.PATCHES[SHIFT_PATCHES[1].key].original  # transformers' own RwkvFeedForward.forward
    hidden = torch.randn(3, 5, ffn.time_mix_key.shape[-1])
    state = [torch.zeros(3, hidden.shape[-1], 2) for _ in range(5)]
    with torch.no_grad():
        full, _ = ffn(hidden, state=None)
        state[0][:, :, 0] = hidden[:, 3]
        broken, _ = original(ffn, hidden[:, 4:], state=[s.clone() for s in state])
        fixed, after = ffn(hidden[:, 4:], state=state)
    assert broken.shape == (3, 3, hidden.shape[-1])
    assert fixed.shape == (3, 1, hidden.shape[-1]) and (fixed[:, 0] - full[:, 4]).abs().max() <= 1e-6
    assert torch.equal(after[0][:, :, 0], hidden[:, 4])


@pytest.mark.parametrize("mc", [None, "gated", "ssc"])
def test_batched_decoding_equals_each_row_alone(mc):
    adapter_by_family("rwkv4").model_class()  # installs the support patch, as load_base does
    model = tiny_model("rwkv4")
    if mc is not None:
        model = mc_retrofit.convert(model, MCConfig(segment_size=3, aggregation=mc, top_k=1))
    x = torch.randint(0, 64, (3, 7))
    batched = _greedy(model, x)
    alone = [_greedy(model, x[i:i + 1]) for i in range(3)]
    assert torch.equal(batched.sequences, torch.cat([a.sequences for a in alone]))
    for i, a in enumerate(alone):
        assert (torch.stack(batched.logits, 1)[i] - torch.stack(a.logits, 1)[0]).abs().max() <= 1e-5
    with torch.no_grad():  # and each step equals the full forward over the generated text
        full = model(batched.sequences).logits
    assert (torch.stack(batched.logits, 1) - full[:, 6:-1]).abs().max() <= 1e-5

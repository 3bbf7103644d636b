"""generate() on converted fla models: the logits equal one full forward over the result."""
from __future__ import annotations

import pytest
import torch

import mc_retrofit
from mc_retrofit import MCConfig, cache_stats

fo = pytest.importorskip("fla_oracles")


@pytest.mark.parametrize("family", fo.FAMILIES)
def test_generate_matches_full_forward_fla(family):
    model = mc_retrofit.convert(fo.tiny_fla_model(family), MCConfig(segment_size=3, aggregation="ssc", top_k=1))
    x = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=7, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, use_cache=True)
        full = model(out.sequences).logits
    assert (torch.stack(out.logits, 1) - full[:, 7:-1]).abs().max() <= 1e-5
    stats = cache_stats(out)
    assert stats["segments"] > 0 and stats["bytes"] > 0

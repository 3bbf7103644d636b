"""Qwen3-Next (transformers hybrid): its Gated DeltaNet layers get Memory Caching, the
full-attention layers are untouched; cached decoding equals the full forward."""
from __future__ import annotations

import pytest
import torch

from conftest import logits_in_calls
from fla_oracles import tiny_qwen3_next as _tiny  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Triton is not supported")


def test_qwen3_next_gdn_layers_get_mc():
    pytest.importorskip("fla")
    import mc_retrofit as mc
    from mc_retrofit.model import gate_modules

    ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(0))
    model = _tiny()
    with torch.no_grad():
        base = model(ids).logits
    mc.convert(model, mc.MCConfig(segment_size=6))
    gates = gate_modules(model)
    assert len(gates) == 1 and all("linear_attn" in name for name in gates)  # attention layer untouched
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :9], use_cache=True)
        rest, _ = logits_in_calls(model, ids, [(t, t + 1) for t in range(9, 20)], mc.returned_cache(out))
    assert (full[:, :6] - base[:, :6]).abs().max() <= 1e-5
    assert (full - base).abs().max() > 1e-3
    assert (torch.cat([out.logits, rest], 1) - full).abs().max() <= 1e-5


def test_inspect_counts_only_the_recurrent_layers_of_a_hybrid(tmp_path):
    pytest.importorskip("fla")
    from mc_retrofit.describe import describe

    _tiny().save_pretrained(tmp_path / "q")
    d = describe(tmp_path / "q")
    # one GDN layer: 4 value heads x 8 x 8 fp32 state + 4 x 8 fp32 key summary; the attention layer costs nothing
    assert d.num_layers == 1 and d.mc_layers == [0]
    assert d.segment_bytes == 4 * 8 * 8 * 4 + 4 * 8 * 4

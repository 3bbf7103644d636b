"""flash-linear-attention families on CPU: leaf-op routing, Memory Caching against
independent oracles, chunked prefill, decoding across a segment boundary, the real
RWKV-7 checkpoint, and the CLI round trip."""
from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("fla")
pytestmark = pytest.mark.filterwarnings("ignore:According to Bo", "ignore:Triton is not supported")

import mc_retrofit as mc  # noqa: E402
from mc_retrofit.errors import MCError  # noqa: E402

from conftest import logits_in_calls  # noqa: E402
from fla_oracles import FAMILIES, tiny_fla_model, token_reference  # noqa: E402

TOL = 1e-5


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_no_cache_read_equals_routed_base(family):
    """One open segment (nothing cached) and cache_weight=0 both give the base model exactly."""
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))
    base = _logits(tiny_fla_model(family), ids)
    one_segment = mc.convert(tiny_fla_model(family), mc.MCConfig(segment_size=64))
    assert (_logits(one_segment, ids) - base).abs().max() <= TOL
    off = mc.convert(tiny_fla_model(family), mc.MCConfig(segment_size=4, cache_weight=0.0))
    assert (_logits(off, ids) - base).abs().max() <= TOL
    on = mc.convert(tiny_fla_model(family), mc.MCConfig(segment_size=4))
    diff = (_logits(on, ids) - base).abs()
    assert diff[:, :4].max() <= TOL  # the first segment reads no cache
    assert diff.max() > 1e-3  # ...and later ones do


@pytest.mark.parametrize("aggregation", ["residual", "gated", "ssc"])
@pytest.mark.parametrize("family", FAMILIES)
def test_mc_equals_token_by_token_reference(family, aggregation):
    ids = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(2))
    model = mc.convert(tiny_fla_model(family), mc.MCConfig(segment_size=5, aggregation=aggregation, top_k=1))
    got = _logits(model, ids)
    bias = model.mc.config.online_bias  # the family's default (RWKV-7: 4; test_family_default_online_bias)
    ref = token_reference(tiny_fla_model(family), family, ids, 5, aggregation, top_k=1, online_bias=bias)
    assert (got - ref).abs().max() <= TOL
    assert (got - _logits(tiny_fla_model(family), ids)).abs().max() > 1e-3


def test_family_default_online_bias(tmp_path):
    """An unset online_bias takes the family's default (RWKV-7 declares 4, the others 0), which
    convert saves; an explicit value, 0 included, is kept; the reference with the default's
    bias is what the default conversion computes (and differs from bias 0)."""
    from mc_retrofit.adapters import adapter_by_family
    from mc_retrofit.model import load, save_converted

    assert adapter_by_family("rwkv7").default_online_bias == 4.0
    for family in FAMILIES:
        default = mc.convert(tiny_fla_model(family), mc.MCConfig(segment_size=4))
        want = 4.0 if family == "rwkv7" else 0.0
        assert default.mc.config.online_bias == want
        gates = mc.model.gate_modules(default).values()
        assert all(torch.equal(g.online_bias, torch.full_like(g.online_bias, want)) for g in gates)
        explicit = mc.convert(tiny_fla_model(family), mc.MCConfig(segment_size=4, online_bias=0.0))
        assert explicit.mc.config.online_bias == 0.0
    ids = torch.randint(0, 64, (1, 13), generator=torch.Generator().manual_seed(5))
    default = mc.convert(tiny_fla_model("rwkv7"), mc.MCConfig(segment_size=4))
    save_converted(default, tmp_path / "conv")
    assert mc.MCConfig.load(tmp_path / "conv").online_bias == 4.0  # saved resolved: a reload never re-resolves
    got = _logits(default, ids)
    ref4 = token_reference(tiny_fla_model("rwkv7"), "rwkv7", ids, 4, "gated", online_bias=4.0)
    ref0 = token_reference(tiny_fla_model("rwkv7"), "rwkv7", ids, 4, "gated", online_bias=0.0)
    assert (got - ref4).abs().max() <= TOL
    assert (got - ref0).abs().max() > 1e-3
    assert (_logits(load(tmp_path / "conv"), ids) - got).abs().max() <= TOL
    from mc_retrofit.eval.variants import Variant  # what an eval's results.json says each column ran

    column = Variant("mc", mc.MCConfig(segment_size=4))
    assert column.describe(tiny_fla_model("rwkv7").config)["mc_config"]["online_bias"] == 4.0
    assert column.describe(tiny_fla_model("gla").config)["mc_config"]["online_bias"] == 0.0


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_and_decoding_equal_full_forward(family):
    """Two prefill calls with the cache (the split inside a segment), then token-by-token
    decoding across a segment boundary, equal one full forward."""
    ids = torch.randint(0, 64, (2, 22), generator=torch.Generator().manual_seed(3))
    model = mc.convert(tiny_fla_model(family), mc.MCConfig(segment_size=6, aggregation="gated"))
    full = _logits(model, ids)
    with torch.no_grad():
        out = model(ids[:, :9], use_cache=True)  # crosses the boundary at 18:
        rest, _ = logits_in_calls(model, ids, [(9, 15)] + [(t, t + 1) for t in range(15, 22)], mc.returned_cache(out))
    assert (torch.cat([out.logits, rest], 1) - full).abs().max() <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_convert_save_load_export(family, tmp_path):
    from mc_retrofit.model import export, load, save_converted

    ids = torch.randint(0, 64, (1, 19), generator=torch.Generator().manual_seed(4))
    model = mc.convert(tiny_fla_model(family), mc.MCConfig(segment_size=4))
    with torch.no_grad():
        for g in mc.model.gate_modules(model).values():
            g.cache_weight.fill_(0.5)
    want = _logits(model, ids)
    save_converted(model, tmp_path / "conv")
    assert (_logits(load(tmp_path / "conv"), ids) - want).abs().max() <= TOL
    export(model, tmp_path / "m.safetensors")
    assert (_logits(load(tmp_path / "m.safetensors"), ids) - want).abs().max() <= TOL
    d = mc.describe(tmp_path / "conv")
    assert d.family == family and d.state_bytes > 0


def test_retnet_parallel_mode_is_switched_to_chunk():
    model = tiny_fla_model("retnet", attn_mode="parallel")
    ids = torch.randint(0, 64, (1, 70), generator=torch.Generator().manual_seed(5))
    base = _logits(model, ids)  # > 64 tokens: the base runs parallel_retention
    with pytest.warns(UserWarning, match="parallel"):
        mc.convert(model, mc.MCConfig(segment_size=128))
    assert all(m.mode == "chunk" for _, m in mc.adapters.adapter_for(model.config).mixers(model))
    assert (_logits(model, ids) - base).abs().max() <= TOL


def test_gla_fused_chunk_mode_is_switched_to_chunk():
    model = tiny_fla_model("gla", attn_mode="fused_chunk")
    with pytest.warns(UserWarning, match="fused_chunk"):
        mc.convert(model, mc.MCConfig(segment_size=8))
    ids = torch.randint(0, 64, (1, 70), generator=torch.Generator().manual_seed(6))
    ref = tiny_fla_model("gla")  # the same weights in chunk mode
    mc.convert(ref, mc.MCConfig(segment_size=8))
    assert (_logits(model, ids) - _logits(ref, ids)).abs().max() <= TOL


def test_version_guard_is_one_line():
    from mc_retrofit.adapters.fla import cpu as fla_cpu

    with pytest.raises(MCError) as e:
        fla_cpu.check_version("0.7.1")
    assert "\n" not in str(e.value) and "0.7.1" in str(e.value)
    with pytest.raises(MCError):
        fla_cpu.check_version("0.5.9")
    assert fla_cpu.check_version("0.6.3") == "0.6.3"


def test_transformers_mamba_checkpoints_keep_transformers_classes(tmp_path):
    """``import fla`` re-registers the mamba/mamba2 model types; load_base must still
    build transformers' classes for transformers-format directories."""
    import fla  # noqa: F401
    from conftest import tiny_model
    from transformers import Mamba2ForCausalLM, MambaForCausalLM

    for family, cls in (("mamba", MambaForCausalLM), ("mamba2", Mamba2ForCausalLM)):
        tiny_model(family).save_pretrained(tmp_path / family)
        assert type(mc.load_base(tmp_path / family)) is cls

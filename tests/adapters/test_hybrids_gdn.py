"""The gated-delta-rule families of 2026 on CPU: transformers' Qwen3.5 (dense and MoE), OLMo Hybrid
and Kimi Linear (KDA) hybrids, and fla's KDA model. Memory Caching wraps only their linear-attention
layers; every test compares with an independent oracle (the base model, a token-by-token run with
explicit aggregation over the family's own boundary states, greedy recomputation, a round trip,
hand-computed sizes)."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("fla")
pytestmark = pytest.mark.filterwarnings("ignore:Triton is not supported", "ignore:.*falling back")

import mc_retrofit as mc  # noqa: E402
from mc_retrofit.adapters import adapter_by_family, adapter_for  # noqa: E402
from mc_retrofit.errors import MCError  # noqa: E402

from conftest import logits_in_calls  # noqa: E402
from fla_oracles import _l2, _q_read, _rep, token_reference  # noqa: E402

TOL = 1e-5
FAMILIES = ["qwen3_5", "qwen3_5_moe", "olmo_hybrid", "kimi_linear", "kda"]
HYBRID_LAYERS = ["linear_attention", "full_attention", "linear_attention"]
_GDN = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8)
_ATTN = dict(num_attention_heads=2, num_key_value_heads=1, head_dim=16)
_MOE = dict(num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32, shared_expert_intermediate_size=32)


def _config(family):
    """(config class, kwargs) of a tiny model: hidden 32, 3 layers (2 recurrent) for the hybrids."""
    import transformers

    base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, layer_types=HYBRID_LAYERS, pad_token_id=0,
                bos_token_id=None, eos_token_id=None,
                num_hidden_layers=len(HYBRID_LAYERS))
    if family == "qwen3_5":
        return transformers.Qwen3_5TextConfig, {**base, **_GDN, **_ATTN}
    if family == "qwen3_5_moe":
        return transformers.Qwen3_5MoeTextConfig, {**base, **_GDN, **_ATTN, **_MOE}
    if family == "olmo_hybrid":
        return transformers.OlmoHybridConfig, {**base, **_GDN, **_ATTN}
    if family == "kimi_linear":
        return transformers.KimiLinearConfig, {
            **base, "num_attention_heads": 2, "num_key_value_heads": 2, "kv_lora_rank": 16, "q_lora_rank": None,
            "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16, "linear_num_heads": 2,
            "linear_head_dim": 16, "num_experts": 2, "num_experts_per_tok": 1, "moe_intermediate_size": 32,
            "mlp_layer_types": ["dense", "sparse", "sparse"]}
    import fla.models as fm

    return fm.KDAConfig, dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_heads=2, num_v_heads=4,
                              head_dim=16, hidden_ratio=2, fuse_cross_entropy=False, fuse_norm=True, use_cache=True)


_BUILT: dict = {}


def tiny(family, seed=0):
    """A tiny random fp32 model of ``family`` whose weights are perturbed away from init (zero-
    initialised projections would hide bugs); built once per process, a fresh copy each call."""
    cls = adapter_by_family(family).model_class()  # installs the CPU routing
    if (family, seed) not in _BUILT:
        cfg_cls, kw = _config(family)
        torch.manual_seed(seed)
        model = cls(cfg_cls(**kw)).float()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() >= 2 and "embed" not in name:
                    p.add_(torch.randn_like(p) * 0.05)
        _BUILT[family, seed] = model.eval()
    return copy.deepcopy(_BUILT[family, seed])


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


def _ids(shape, seed):
    return torch.randint(1, 64, shape, generator=torch.Generator().manual_seed(seed))


# -- the oracle --------------------------------------------------------------------------
def token_oracle(model, ids, segment_size, aggregation, top_k=1):
    """Logits of the *unconverted* ``model`` fed one token at a time through its own cache; every
    recurrent layer's core-op output is replaced by the explicit Memory Caching aggregate over the
    states the family's op itself returned at the segment boundaries (cloned): the fla oracle
    (``fla_oracles.token_reference``, which shares no code with ``mc_retrofit.segments``) with this
    read, ``o_t = K^-1/2 l2norm(q_t) . S`` in the state's own layout."""
    fla = adapter_for(model.config).layer_module.startswith("fla.")
    names = ("q", "k", "v") if fla else ("query", "key", "value")

    def read_of(kw):
        hv = kw[names[2]].shape[2]
        q, k = (_rep(_l2(kw[n][:, 0]), hv) for n in names[:2])  # [B, HV, K]
        return q, k, lambda S: _q_read(S, q, q.shape[-1] ** -0.5, bool(kw.get("state_v_first")))

    return token_reference(model, adapter_for(model.config).family, ids, segment_size, aggregation, top_k,
                           read_of=read_of, names=names)


# -- tests -------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_no_cache_read_equals_the_unconverted_model(family):
    ids = _ids((2, 12), 1)
    base = _logits(tiny(family), ids)
    assert torch.isfinite(base).all()
    one_segment = mc.convert(tiny(family), mc.MCConfig(segment_size=64))
    assert (_logits(one_segment, ids) - base).abs().max() <= TOL
    off = mc.convert(tiny(family), mc.MCConfig(segment_size=4, cache_weight=0.0))
    assert (_logits(off, ids) - base).abs().max() <= TOL
    on = mc.convert(tiny(family), mc.MCConfig(segment_size=4))
    gates = mc.model.gate_modules(on)
    assert len(gates) == len(adapter_by_family(family).recurrent_layers(on.config))  # attention layers untouched
    diff = (_logits(on, ids) - base).abs()
    assert diff[:, :4].max() <= TOL and diff.max() > 1e-3  # the first segment reads nothing; later ones do


AGGREGATIONS = ["residual", "gated", "ssc"]
# Every aggregation on one family per op (the GDN hybrids' op and read are one spec: Qwen3.5-MoE and
# OLMo Hybrid differ from Qwen3.5 only in layer plumbing, so their other aggregations run as slow).
_ORACLE_CASES = [(f, a) for f in ("qwen3_5", "kimi_linear", "kda") for a in AGGREGATIONS] + [
    pytest.param(f, a, marks=[pytest.mark.slow] if a != "gated" else [])
    for f in ("qwen3_5_moe", "olmo_hybrid") for a in AGGREGATIONS]


@pytest.mark.parametrize("family,aggregation", _ORACLE_CASES)
def test_mc_equals_the_token_by_token_oracle(family, aggregation):
    ids = _ids((2, 10), 2)  # segment 3 does not divide 10: an open tail, three cached segments
    model = mc.convert(tiny(family), mc.MCConfig(segment_size=3, aggregation=aggregation, top_k=1))
    got = _logits(model, ids)
    ref = token_oracle(tiny(family), ids, 3, aggregation, top_k=1)
    assert (got - ref).abs().max() <= TOL
    assert (got - _logits(tiny(family), ids)).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_split_prefill_decoding_and_generate_equal_full_recomputation(family):
    ids = _ids((2, 14), 3)
    model = mc.convert(tiny(family), mc.MCConfig(segment_size=4, aggregation="gated"))
    full = _logits(model, ids)
    with torch.no_grad():
        out = model(ids[:, :5], use_cache=True)  # crosses the boundary at 12:
        rest, _ = logits_in_calls(model, ids, [(5, 10)] + [(t, t + 1) for t in range(10, 14)], mc.returned_cache(out))
    assert (torch.cat([out.logits, rest], 1) - full).abs().max() <= TOL
    prompt, new = ids[:, :6], 6  # generation crosses the boundaries at 8 and 12
    with torch.no_grad():
        got = model.generate(prompt, max_new_tokens=new, do_sample=False, use_cache=True,
                             pad_token_id=0, eos_token_id=None)
        want = prompt
        for _ in range(new):  # greedy, every step a fresh full forward
            want = torch.cat([want, _logits(model, want, use_cache=False)[:, -1:].argmax(-1)], 1)
    assert torch.equal(got, want)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_pass_capture_equals_the_segment_loop(monkeypatch, family):
    """KDA's and the GDN hybrids' CPU references record the segment-end states chunkwise
    (``adapters.fla.chunk``): one op call per layer gives the loop's outputs."""
    from conftest import count_calls
    from test_one_pass import _both

    from mc_retrofit import segments

    calls = count_calls(monkeypatch, segments, "_run_one_pass")
    model = mc.convert(tiny(family), mc.MCConfig(segment_size=4, aggregation="gated"))
    x = _ids((2, 14), 6)
    with torch.no_grad():
        loop, one = _both(monkeypatch, lambda: model(x).logits)
    assert len(calls) == len(adapter_by_family(family).recurrent_layers(model.config))
    assert (loop - one).abs().max() <= TOL


@pytest.mark.parametrize("family", [*FAMILIES, "qwen3_next"])
def test_left_padded_batch_rows_equal_themselves_alone(family):
    pads = [0, 4]  # not a multiple of the segment: a shared clock would misplace every boundary
    ids = _ids((2, 11), 4)
    mask = torch.ones_like(ids)
    for r, p in enumerate(pads):
        mask[r, :p] = 0
    if family == "qwen3_next":
        from fla_oracles import tiny_qwen3_next

        base = tiny_qwen3_next()
    else:
        base = tiny(family)
    model = mc.convert(base, mc.MCConfig(segment_size=3, aggregation="gated"))
    if not adapter_by_family(family).supports_padding:  # fla's layers unpad into packed sequences
        with pytest.raises(MCError, match=family) as e:
            model(ids, attention_mask=mask)
        assert "\n" not in str(e.value)
        return
    full = _logits(model, ids, attention_mask=mask)
    for r, p in enumerate(pads):
        alone = _logits(model, ids[r:r + 1, p:])[0]
        assert (full[r, p:] - alone).abs().max() <= TOL, (r, p)
    with pytest.raises(MCError, match="left padding only"):  # the layers zero pads: right padding would shift rows
        model(ids, attention_mask=mask.flip(1))


@pytest.mark.parametrize("family", FAMILIES)
def test_convert_export_load_round_trips_bit_exactly(family, tmp_path):
    from mc_retrofit.model import export, load, save_converted

    ids = _ids((1, 10), 5)
    model = mc.convert(tiny(family), mc.MCConfig(segment_size=4))
    with torch.no_grad():
        for g in mc.model.gate_modules(model).values():
            g.cache_weight.fill_(0.5)
    want = _logits(model, ids)
    save_converted(model, tmp_path / "conv")
    assert torch.equal(_logits(load(tmp_path / "conv"), ids), want)
    export(model, tmp_path / "m.safetensors")
    assert torch.equal(_logits(load(tmp_path / "m.safetensors"), ids), want)


# family -> (recurrent layer indices, state elements per layer, key-summary elements per layer), by hand
_SIZES = {
    "qwen3_5": ([0, 2], 4 * 8 * 8, 4 * 8),  # 4 value heads x K 8 x V 8; summary 4 heads x 8
    "qwen3_5_moe": ([0, 2], 4 * 8 * 8, 4 * 8),
    "olmo_hybrid": ([0, 2], 4 * 8 * 8, 4 * 8),
    "kimi_linear": ([0, 2], 2 * 16 * 16, 2 * 16),  # 2 heads x 16 x 16
    "kda": ([0, 1], 4 * 16 * 16, 4 * 16),  # 4 value heads x V 16 x K 16
}


@pytest.mark.parametrize("family", FAMILIES)
def test_describe_counts_only_the_recurrent_layers(family, tmp_path):
    tiny(family).save_pretrained(tmp_path / "m")
    d = mc.describe(tmp_path / "m")
    layers, state, summary = _SIZES[family]
    assert d.family == family and d.mc_layers == layers and d.num_layers == len(layers)
    assert d.state_bytes == state * 4 and d.segment_bytes == (state + summary) * 4 * len(layers)


def test_gdn2_cpu_routing_against_fla_references():
    """fla 0.6 ships Gated DeltaNet-2 as a layer and ops only (no model): its CPU routing equals
    fla's own chunkwise reference, the capture's DPLR form equals the recurrent one state for
    state, and with ``b = w = beta`` it is KDA (the reduction fla documents)."""
    from fla.ops.gdn2.naive import naive_chunk_gdn2

    from mc_retrofit.adapters.fla import chunk
    from mc_retrofit.adapters.fla import cpu as fla_cpu
    from mc_retrofit.adapters.fla.gdn2 import GDN2_OPS, LAYER_MODULE

    g_ = torch.Generator().manual_seed(7)
    B, T, H, K, V = 2, 20, 2, 8, 8
    q, k, v = (torch.randn(B, T, H, d, generator=g_) for d in (K, K, V))
    g = -torch.rand(B, T, H, K, generator=g_) * 0.5
    b, w = torch.rand(B, T, H, K, generator=g_), torch.rand(B, T, H, V, generator=g_)
    beta = torch.rand(B, T, H, generator=g_)
    s0 = torch.randn(B, H, K, V, generator=g_)
    assert set(GDN2_OPS) == set(fla_cpu.RECURRENCES[LAYER_MODULE])
    o, s = fla_cpu.gdn2_ref(q, k, v, g, b, w, initial_state=s0, output_final_state=True, use_qk_l2norm_in_kernel=True)
    qn, kn = _l2(q), _l2(k)
    o_ref, s_ref = naive_chunk_gdn2(qn, kn, v, g, b, w, initial_state=s0, output_final_state=True, chunk_size=4)
    assert (o - o_ref).abs().max() <= TOL and (s - s_ref).abs().max() <= TOL
    with chunk.capturing(5) as sink:  # the one-pass path: chunkwise, every segment end recorded
        o_c, s_c = fla_cpu.gdn2_ref(q, k, v, g, b, w, initial_state=s0, output_final_state=True,
                                    use_qk_l2norm_in_kernel=True)
    assert len(sink.states) == T // 5 and (o_c - o).abs().max() <= TOL and (s_c - s).abs().max() <= TOL
    _, s10 = fla_cpu.gdn2_ref(q[:, :10], k[:, :10], v[:, :10], g[:, :10], b[:, :10], w[:, :10], initial_state=s0,
                              output_final_state=True, use_qk_l2norm_in_kernel=True)
    assert (sink.states[1] - s10).abs().max() <= TOL  # the state after token 10
    o_kda, s_kda = fla_cpu.kda_ref(q, k, v, g, beta, initial_state=s0, output_final_state=True,
                                   use_qk_l2norm_in_kernel=True)
    o_2, s_2 = fla_cpu.gdn2_ref(q, k, v, g, beta[..., None].expand_as(g), beta[..., None].expand_as(v),
                                initial_state=s0, output_final_state=True, use_qk_l2norm_in_kernel=True)
    assert (o_kda - o_2).abs().max() <= TOL and (s_kda - s_2).abs().max() <= TOL


def test_a_vision_language_qwen3_5_checkpoint_is_refused_in_one_line(tmp_path):
    import transformers

    _, kw = _config("qwen3_5")
    transformers.Qwen3_5Config(text_config=kw).save_pretrained(tmp_path)  # text config nested, model_type qwen3_5
    with pytest.raises(MCError, match="qwen3_5") as e:
        mc.describe(tmp_path)
    assert "\n" not in str(e.value) and "qwen3_5_text" in str(e.value)

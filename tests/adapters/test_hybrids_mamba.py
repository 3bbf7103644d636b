"""transformers' hybrids on the Mamba2/Mamba scans (Bamba, Falcon-H1, Nemotron-H, Granite 4,
Zamba2, Jamba) and Falcon-Mamba, with Memory Caching, against independent oracles.

Each family is a tiny model from a config (2-4 layers, Mamba layers mixed with attention, MLP or
MoE ones). The oracles are the token-by-token Mamba2/Mamba ones of ``oracles.py``, fed each
family's own pre-scan steps (Falcon-H1's multipliers, Jamba's and Falcon-Mamba's B/C/dt norms)
through a view of the mixer."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import count_calls, logits_in_calls
from oracles import ORACLES
from test_cache_path import _assert_generate_is_recomputation, _forced
from transformers import (BambaConfig, FalconH1Config, FalconMambaConfig, GraniteMoeHybridConfig, JambaConfig,
                          NemotronHConfig, Zamba2Config)

import mc_retrofit
from mc_retrofit import MCConfig, cache_stats
from mc_retrofit.adapters import adapter_by_family
from mc_retrofit.adapters.transformers import mamba2

# initializer_range 0.15: at transformers' default (0.02) the mixers' outputs barely move the
# logits of a 32-wide model, so a wrong cached read would hide under the tolerance.
COMMON = dict(vocab_size=64, hidden_size=32, initializer_range=0.15, use_cache=False, pad_token_id=0,
              bos_token_id=1, eos_token_id=2)
MAMBA2 = dict(mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=8, mamba_expand=2,
              mamba_chunk_size=8, num_attention_heads=2, num_key_value_heads=1, intermediate_size=48)
CONFIGS = {
    "bamba": lambda: BambaConfig(**COMMON, **MAMBA2, num_hidden_layers=3, attn_layer_indices=[1]),
    # no gated norm (mamba_rms_norm=False, the default): decoding hands silu(z) to the op
    "falcon_h1": lambda: FalconH1Config(**COMMON, **MAMBA2, num_hidden_layers=2, head_dim=16, mamba_d_ssm=64,
                                        ssm_in_multiplier=0.7, ssm_multipliers=[0.9, 1.1, 1.2, 0.8, 1.3]),
    # Nemotron-H and Zamba2 clamp dt at time_step_min in the chunk scan but not in the one-token
    # step (transformers' own split-vs-full gap, 7e-5 here at 1e-3): a tiny minimum keeps it out.
    "nemotron_h": lambda: NemotronHConfig(**COMMON, layers_block_type=["linear_attention", "full_attention", "mlp",
                                                                       "linear_attention"],
                                          mamba_num_heads=4, mamba_head_dim=16, n_groups=2, ssm_state_size=8,
                                          chunk_size=8, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                          intermediate_size=48, time_step_min=1e-9),
    "granitemoehybrid": lambda: GraniteMoeHybridConfig(**COMMON, **MAMBA2, num_hidden_layers=3,
                                                       layer_types=["linear_attention", "full_attention",
                                                                    "linear_attention"],
                                                       num_local_experts=2, num_experts_per_tok=1,
                                                       shared_intermediate_size=48),
    # two hybrid layers sharing one attention block (num_mem_blocks=1): tied weights in the export
    "zamba2": lambda: Zamba2Config(**COMMON, num_hidden_layers=4, layers_block_type=["linear_attention", "hybrid",
                                                                                      "linear_attention", "hybrid"],
                                   n_mamba_heads=4, mamba_ngroups=2, mamba_d_state=8, mamba_expand=2, chunk_size=8,
                                   num_attention_heads=2, num_mem_blocks=1, intermediate_size=48,
                                   time_step_min=1e-9),
    "jamba": lambda: JambaConfig(**COMMON, num_hidden_layers=3, attn_layer_period=3, attn_layer_offset=1,
                                 num_experts=2, expert_layer_period=2, expert_layer_offset=1, mamba_d_state=8,
                                 mamba_expand=2, mamba_dt_rank=4, num_attention_heads=2, num_key_value_heads=1,
                                 intermediate_size=48),
    "falcon_mamba": lambda: FalconMambaConfig(**COMMON, num_hidden_layers=2, state_size=8, expand=2),
}
FAMILIES = list(CONFIGS)
MAMBA1 = {"jamba", "falcon_mamba"}  # on the Mamba scan; the rest on Mamba2's

# By hand from the configs above: the Mamba layers, and one layer's state in fp32 bytes
# (Mamba2: heads x head_dim x state = 4 x 16 x 8; Mamba: (expand x hidden) x state = 64 x 8).
RECURRENT = {"bamba": [0, 2], "falcon_h1": [0, 1], "nemotron_h": [0, 3], "granitemoehybrid": [0, 2],
             "zamba2": [0, 1, 2, 3], "jamba": [0, 2], "falcon_mamba": [0, 1]}
STATE_BYTES = 4 * 16 * 8 * 4  # = 64 * 8 * 4 as well: 2048 for every family here
T = 29


def tiny(family: str, seed: int = 0):
    torch.manual_seed(seed)
    return adapter_by_family(family).model_class()(CONFIGS[family]()).eval()


def logits(model, x, **kw):
    with torch.no_grad():
        return model(x, **kw).logits


class _View:
    """A mixer as the plain Mamba2/Mamba oracle reads it: attribute ``over`` replaced."""

    def __init__(self, mixer, **over):
        self._mixer, self._over = mixer, over

    def __getattr__(self, name):
        return self._over[name] if name in self._over else getattr(self._mixer, name)


def _normed_x_proj(m):
    """Jamba / Falcon-Mamba: RMS norms on dt, B and C right after x_proj."""
    def x_proj(x):
        dt, B, C = m.x_proj(x).split([m.time_step_rank, m.ssm_state_size, m.ssm_state_size], dim=-1)
        return torch.cat([m.dt_layernorm(dt), m.b_layernorm(B), m.c_layernorm(C)], -1)

    return x_proj


def oracle_view(family, m):
    if family == "falcon_h1":
        norm = m.norm if m.mamba_rms_norm else (lambda y, z: y * F.silu(z))
        return _View(m, in_proj=lambda h: m.in_proj(h * m.ssm_in_multiplier) * m.mup_vector, norm=norm)
    if family in MAMBA1:
        return _View(m, x_proj=_normed_x_proj(m))
    return m


def with_oracle(converted):
    """A copy of the converted model whose Mamba mixers run the token-by-token oracle."""
    oracle_model = copy.deepcopy(converted)
    family, config = converted.mc.family, converted.mc.config
    oracle = ORACLES["mamba" if family in MAMBA1 else "mamba2"]
    for _, mixer in adapter_by_family(family).mixers(oracle_model):
        view = oracle_view(family, mixer)
        mixer.forward = lambda hidden_states, v=view, **kw: oracle(v, hidden_states, config)
    return oracle_model


@pytest.mark.parametrize("family", FAMILIES)
def test_only_the_mamba_layers_are_wrapped(family):
    model = tiny(family)
    adapter = adapter_by_family(family)
    assert [i for i, _ in adapter.mixers(model)] == adapter.recurrent_layers(model.config) == RECURRENT[family]
    converted = mc_retrofit.convert(model, MCConfig(segment_size=4))
    gates = mc_retrofit.model.gate_modules(converted)
    assert sorted(g.layer_idx for g in gates.values()) == RECURRENT[family]
    assert all("attn" not in name and "shared_transformer" not in name for name in gates)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("setting", ["long_segment", "cache_weight_0"])
def test_no_cache_read_equals_base(family, setting):
    base = tiny(family)
    x = torch.randint(0, 64, (2, T))
    cfg = MCConfig(segment_size=64) if setting == "long_segment" else MCConfig(segment_size=5, cache_weight=0.0)
    model = mc_retrofit.convert(copy.deepcopy(base), cfg)
    assert (logits(model, x) - logits(base, x)).abs().max() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_oracle_without_mc_equals_transformers(family):
    """The oracle views reproduce each family's own forward (so they can judge MC)."""
    base = tiny(family)
    x = torch.randint(0, 64, (2, T))
    converted = mc_retrofit.convert(copy.deepcopy(base), MCConfig(segment_size=7, cache_weight=0.0))
    assert (logits(with_oracle(converted), x) - logits(base, x)).abs().max() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("aggregation", ["residual", "gated", "ssc"])
def test_mc_equals_token_by_token_oracle(family, aggregation):
    base = tiny(family)
    x = torch.randint(0, 64, (2, T))  # 29 tokens, segments of 7
    cfg = MCConfig(segment_size=7, aggregation=aggregation, top_k=2, temperature=0.05, online_bias=0.3,
                   cache_weight=0.8 if aggregation == "residual" else 1.0)
    model = mc_retrofit.convert(copy.deepcopy(base), cfg)
    with torch.no_grad():  # distinct per-head mixes so a head mix-up would show
        for gate in mc_retrofit.model.gate_modules(model).values():
            gate.cache_weight.mul_(torch.linspace(0.5, 1.0, gate.num_heads))
    got = logits(model, x)
    assert (got - logits(base, x)).abs().max() > 1e-2, "MC should change the output here"
    assert (got - logits(with_oracle(model), x)).abs().max() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_split_prefill_then_decoding_equals_one_forward(family):
    model = mc_retrofit.convert(_forced(tiny(family)), MCConfig(segment_size=3, aggregation="gated"))
    x = torch.randint(0, 64, (2, 14), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(x, use_cache=False).logits
        got, cache = logits_in_calls(  # calls across boundaries, with the attention layers' positions
            model, x, [(0, 5), (5, 8)] + [(t, t + 1) for t in range(8, 14)],
            call_kwargs=lambda a, b, cache: {"position_ids": torch.arange(a, b)[None].expand(2, -1)})
    assert (got - full).abs().max() <= 1e-5
    stats = cache_stats(cache)  # the memory rode on the model's cache: 14 // 3 segments, Mamba layers only
    assert sorted(stats["layers"]) == RECURRENT[family]
    assert all(v["segments"] == 4 for v in stats["layers"].values())


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_the_cache_equals_greedy_recomputation(family):
    model = mc_retrofit.convert(_forced(tiny(family)), MCConfig(segment_size=3, aggregation="ssc", top_k=1))
    # no token 0: generate reads the pad id (0) in the prompt as padding
    x = torch.randint(3, 64, (1, 7), generator=torch.Generator().manual_seed(1))
    _assert_generate_is_recomputation(model, x, 6)


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_equals_each_row_alone(family):
    model = mc_retrofit.convert(tiny(family), MCConfig(segment_size=3, aggregation="gated"))
    pads = [0, 5, 2]
    x = torch.randint(3, 64, (len(pads), 17), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(x)
    for r, p in enumerate(pads):
        mask[r, :p] = 0
    full = logits(model, x, attention_mask=mask)
    for r, p in enumerate(pads):
        alone = logits(model, x[r:r + 1, p:])[0]
        assert (full[r, p:] - alone).abs().max() <= 1e-5, (r, p)


@pytest.mark.parametrize("family", FAMILIES)
def test_convert_export_load_round_trips_bit_exactly(family, tmp_path):
    model = mc_retrofit.convert(tiny(family), MCConfig(segment_size=4, aggregation="gated", gate_source="lowrank"))
    with torch.no_grad():  # gates away from their start values, so loading them is tested too
        for gate in mc_retrofit.model.gate_modules(model).values():
            gate.cache_weight.mul_(torch.linspace(0.3, 1.0, gate.num_heads))
            gate.up.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(gate.layer_idx))
    path = mc_retrofit.export(model, tmp_path / "model.safetensors")
    loaded = mc_retrofit.load(path)
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    x = torch.randint(0, 64, (2, 19))
    assert torch.equal(logits(loaded, x), logits(model, x))


@pytest.mark.parametrize("family", FAMILIES)
def test_describe_counts_the_mamba_layers_and_their_state(family, tmp_path):
    base = tiny(family)
    base.save_pretrained(tmp_path / "base")
    d = mc_retrofit.describe(str(tmp_path / "base"), MCConfig(segment_size=256))
    assert (d.family, d.num_layers, d.mc_layers, d.state_bytes) == (family, len(RECURRENT[family]),
                                                                     RECURRENT[family], STATE_BYTES)
    assert d.segment_bytes == (STATE_BYTES + d.summary_bytes) * len(RECURRENT[family])
    # and the state the model's own cache holds per layer (one sequence, fp32) is that size
    out = base(torch.randint(0, 64, (1, 5)), use_cache=True)
    cache = mc_retrofit.compat.returned_cache(out)
    for i in RECURRENT[family]:
        assert cache.get_recurrent_state(i, state_idx=0)[0].float().numel() * 4 == STATE_BYTES


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in MAMBA1])
def test_one_pass_capture_equals_the_segment_loop(family, monkeypatch):
    """The Mamba2 families capture every boundary state in one pass (CUDA's default path,
    forced here); the Mamba ones have no capture and always run the segment loop."""
    model = mc_retrofit.convert(tiny(family), MCConfig(segment_size=7, aggregation="gated"))
    x = torch.randint(0, 64, (2, T))
    monkeypatch.setenv("MC_RETROFIT_ONE_PASS", "0")
    loop = logits(model, x)
    monkeypatch.setenv("MC_RETROFIT_ONE_PASS", "1")
    calls = count_calls(monkeypatch, mamba2, "mamba2_boundary_states")
    assert (logits(model, x) - loop).abs().max() <= 1e-5 and len(calls) == len(RECURRENT[family])

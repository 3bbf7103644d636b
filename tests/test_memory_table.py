"""State and cache bytes of published model sizes (tests/published_configs/), from configs
alone: ``describe`` against a hand computation from each config's own fields, the README
table against ``recipes/memory_table.py``, and ``inspect`` of a Hub id asking for configs only."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import ROOT
from mc_retrofit import checkpoints
from mc_retrofit.checkpoints import config_from_dict
from mc_retrofit.cli import main

sys.path.insert(0, str(ROOT / "recipes"))
import memory_table  # noqa: E402

CONFIGS = ROOT / "tests" / "published_configs"
F32 = 4
SEGMENT = 256
HYBRIDS = {"qwen3_next", "jamba", "kimi_linear"}  # recurrent layers are not 0..n-1


def raw(stem: str) -> dict:
    return json.loads((CONFIGS / f"{stem}.json").read_text())


def by_hand(c: dict) -> tuple[int, int, int]:
    """(recurrent layers, fp32 state bytes per layer, key-summary bytes per layer) from the
    config's own fields, written out per family (not through the adapters)."""
    t, d, n = c["model_type"], c.get("hidden_size"), c["num_hidden_layers"]
    if t == "mamba2":  # SSM state [heads, head_dim, d_state]; the conv state is not cached
        assert c["num_heads"] == c["expand"] * d // c["head_dim"]  # the mamba_ssm -> transformers mapping
        return n, c["num_heads"] * c["head_dim"] * c["state_size"] * F32, c["num_heads"] * c["state_size"] * F32
    if t == "mamba":  # [d_inner, d_state], one "head"
        return n, c["expand"] * d * c["state_size"] * F32, c["state_size"] * F32
    if t == "rwkv7":  # [H, 64, 64] per layer
        h = d // c["head_dim"]
        return n, h * c["head_dim"] * c["head_dim"] * F32, h * c["head_dim"] * F32
    if t == "gla":  # [H, key_dim / H, value_dim / H]
        h = c["num_heads"]
        k, v = int(d * c["expand_k"]) // h, int(d * c["expand_v"]) // h
        return n, h * k * v * F32, h * k * F32
    if t == "gated_deltanet":  # [H, head_v_dim, head_k_dim], head_v_dim = head_dim * expand_v
        h, k = c["num_heads"], c["head_dim"]
        return n, h * k * int(k * c["expand_v"]) * F32, h * k * F32
    if t == "qwen3_next":  # GDN layers only: 3 of every full_attention_interval layers
        every = c["full_attention_interval"]
        layers = sum(1 for i in range(n) if (i + 1) % every)
        h, k, v = c["linear_num_value_heads"], c["linear_key_head_dim"], c["linear_value_head_dim"]
        return layers, h * k * v * F32, h * k * F32
    if t == "jamba":  # Mamba-1 layers only: [expand * hidden, d_state], one "head"; attention every period
        layers = sum(1 for i in range(n) if i % c["attn_layer_period"] != c["attn_layer_offset"])
        return layers, c["mamba_expand"] * d * c["mamba_d_state"] * F32, c["mamba_d_state"] * F32
    if t == "kimi_linear":  # KDA layers only (listed from 1 in linear_attn_config): [H, K, V], K = V = head_dim
        la = c["linear_attn_config"]
        assert sorted(la["kda_layers"] + la["full_attn_layers"]) == list(range(1, n + 1))
        h, k = la["num_heads"], la["head_dim"]
        return len(la["kda_layers"]), h * k * k * F32, h * k * F32
    raise AssertionError(f"no hand formula for {t}")


@pytest.fixture(scope="module")
def rows():
    """describe of every published config, once (fla's models build on the meta device)."""
    return dict((stem, d) for (_, stem), (_, d) in zip(memory_table.MODELS, memory_table.rows()))


def test_every_config_is_listed_loads_and_says_where_it_comes_from():
    stems = sorted(p.stem for p in CONFIGS.glob("*.json"))
    assert stems == sorted(stem for _, stem in memory_table.MODELS)
    for stem in stems:
        c = raw(stem)
        assert len(c["_source"]) > 40, stem  # a real provenance line, not a placeholder
        cfg = config_from_dict(c, where=stem)  # the _source key does not break loading
        assert cfg.model_type == c["model_type"] and cfg.num_hidden_layers == c["num_hidden_layers"]


@pytest.mark.parametrize("stem", [stem for _, stem in memory_table.MODELS])
def test_describe_equals_the_hand_computation(rows, stem):
    d = rows[stem]
    layers, state, summary = by_hand(raw(stem))
    assert (d.num_layers, d.state_bytes, d.summary_bytes) == (layers, state, summary)
    assert d.mc_layers == list(range(layers)) or d.family in HYBRIDS
    segment = (state + summary) * layers
    assert d.segment_bytes == segment
    for tokens in (32 * 1024, 128 * 1024):
        assert memory_table.cache_bytes(d, tokens) == tokens // SEGMENT * segment


@pytest.mark.parametrize("stem", ["gla-1.3B-100B", "rwkv7-0.1B-g1"])
def test_the_cut_config_costs_what_the_full_model_does(rows, stem):
    """describe builds fla models only up to their first recurrent layers: the same
    StateInfo as the adapter's own, from the whole model."""
    from mc_retrofit.adapters import adapter_for

    cfg = config_from_dict(raw(stem))
    full = adapter_for(cfg).state_info(cfg)
    d = rows[stem]
    assert (full.shapes, full.state_bytes, full.summary_bytes) == (d.state_shapes, d.state_bytes, d.summary_bytes)


def test_a_hybrid_counts_only_its_recurrent_layers(rows):
    d = rows["qwen3-next-80b-a3b"]
    assert len(d.mc_layers) == 36 and not {3, 7, 47} & set(d.mc_layers) and {0, 1, 2, 46} <= set(d.mc_layers)
    # Jamba: attention at 4, 12, 20, 28 (offset 4, period 8); Kimi: the 1-based full-attention list, 0-based
    assert rows["jamba-v0.1"].mc_layers == [i for i in range(32) if i not in (4, 12, 20, 28)]
    full = {i - 1 for i in raw("kimi-linear-48b-a3b")["linear_attn_config"]["full_attn_layers"]}
    assert rows["kimi-linear-48b-a3b"].mc_layers == [i for i in range(27) if i not in full]
    assert 26 not in rows["kimi-linear-48b-a3b"].mc_layers and {0, 1, 2, 25} <= set(rows["kimi-linear-48b-a3b"].mc_layers)


def test_published_sizes_match_the_brief():
    """The sizes the configs claim (so an edit to one JSON cannot slip through)."""
    assert [(raw(f"mamba2-{s}")["hidden_size"], raw(f"mamba2-{s}")["num_hidden_layers"]) for s in ("130m", "1.3b", "2.7b")] \
        == [(768, 24), (2048, 48), (2560, 64)]
    assert {raw(f"mamba2-{s}")["vocab_size"] for s in ("130m", "1.3b", "2.7b")} == {50288}  # 50277 padded to 16
    assert [(raw(s)["hidden_size"], raw(s)["num_hidden_layers"]) for s in ("rwkv7-0.1B-g1", "rwkv7-1.5B-world",
                                                                          "rwkv7-2.9B-world")] == [(768, 12), (2048, 24), (2560, 32)]


def test_readme_table_is_the_scripts_output(rows):
    text = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- memory-table:start -->\n(.*?)<!-- memory-table:end -->", text, re.S)
    assert found, "README.md lost its memory-table markers"
    expected = memory_table.table([(name, rows[stem]) for name, stem in memory_table.MODELS])
    assert found.group(1) == expected, "README's memory table is stale: run python recipes/memory_table.py"


def test_inspect_of_a_hub_id_asks_for_configs_only(tmp_path, monkeypatch):
    """``inspect --json org/name`` costs a folder with config.json alone, and asked the Hub
    hook for configs only (no weights downloaded)."""
    folder = tmp_path / "snapshot"
    folder.mkdir()
    (folder / "config.json").write_text((CONFIGS / "qwen3-next-80b-a3b.json").read_text())
    asked = []

    def fake_resolve_hub(repo, revision=None, **hub):
        asked.append((repo, revision, hub.get("config_only")))
        return folder

    monkeypatch.setattr(checkpoints, "resolve_hub", fake_resolve_hub)
    monkeypatch.chdir(tmp_path)  # "Qwen/Qwen3-Next-80B-A3B" is no local path here
    r = CliRunner().invoke(main, ["inspect", "Qwen/Qwen3-Next-80B-A3B@main", "--json"])
    assert r.exit_code == 0, r.output
    assert asked == [("Qwen/Qwen3-Next-80B-A3B", "main", True)]
    out = json.loads(r.output[r.output.index("{"):])
    layers, state, summary = by_hand(raw("qwen3-next-80b-a3b"))
    assert (out["num_layers"], out["state_bytes"], out["segment_bytes"]) == (layers, state, (state + summary) * layers)
    assert out["cache_bytes_per_1k"] == 1024 // SEGMENT * (state + summary) * layers
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]  # nothing fetched beside it

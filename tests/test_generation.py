"""Prefill + decoding with Memory Caching equals one full forward; generate(); cache stats."""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from conftest import TRANSFORMERS_FAMILIES, tiny_model

import mc_retrofit
from mc_retrofit import MCConfig, MCError, cache_stats


def _step(model, family, ids, cache):
    out, cache = mc_retrofit.forward_with_cache(model, ids, cache)
    return out.logits, cache


@pytest.mark.parametrize("family", TRANSFORMERS_FAMILIES)
@pytest.mark.parametrize("aggregation", ["residual", "gated", "ssc"])
def test_split_prefill_then_decoding_equals_full_forward(family, aggregation):
    model = mc_retrofit.convert(tiny_model(family), MCConfig(segment_size=4, aggregation=aggregation, top_k=1))
    x = torch.randint(0, 64, (2, 21))  # batch 2: RWKV-4's one-token step included (rwkv4.SHIFT_PATCHES)
    with torch.no_grad():
        full = model(x).logits
        parts, cache = [], None
        for a, b in [(0, 7), (7, 12), (12, 13)] + [(t, t + 1) for t in range(13, 21)]:  # crosses boundaries
            logits, cache = _step(model, family, x[:, a:b], cache)
            parts.append(logits)
    assert (torch.cat(parts, 1) - full).abs().max() <= 1e-5
    stats = cache_stats(cache)
    assert [v["segments"] for v in stats["layers"].values()] == [5, 5]  # 21 tokens, segments of 4
    assert stats["bytes"] > 0


def test_mamba_split_prefill_continues_from_the_state():
    """transformers' Mamba mixer ignores the cached SSM state for multi-token input; the
    carry-in term fixes that once converted (MC off here: cache_weight=0)."""
    model = mc_retrofit.convert(tiny_model("mamba"), MCConfig(segment_size=1000, cache_weight=0.0))
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        full = model(x).logits
        a, cache = _step(model, "mamba", x[:, :9], None)
        b, _ = _step(model, "mamba", x[:, 9:], cache)
    assert (torch.cat([a, b], 1) - full).abs().max() <= 1e-5


@pytest.mark.parametrize("family", TRANSFORMERS_FAMILIES)
def test_generate_matches_full_forward(family):
    model = mc_retrofit.convert(tiny_model(family), MCConfig(segment_size=3, aggregation="gated"))
    x = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=9, do_sample=False, output_logits=True, return_dict_in_generate=True,
                             use_cache=True)
        full = model(out.sequences).logits
    assert (torch.stack(out.logits, 1) - full[:, 7:-1]).abs().max() <= 1e-5
    assert torch.equal(out.sequences[:, 8:], full[:, 7:-1].argmax(-1))


def test_cache_cap_keeps_most_recent_segments():
    model = mc_retrofit.convert(tiny_model("mamba2"), MCConfig(segment_size=2, max_cached_segments=3))
    x = torch.randint(0, 64, (1, 15))
    with torch.no_grad():
        out = model(x, use_cache=True)
    s = cache_stats(out)
    assert all(v["segments"] == 3 and v["dropped"] == 4 for v in s["layers"].values())


def test_generate_command_streams_text(tmp_path):
    from mc_retrofit.cli import main

    out = tmp_path / "c"
    assert CliRunner().invoke(main, ["convert", "builtin:mamba2-byte", "--out", str(out), "--segment-size", "8"]).exit_code == 0
    (tmp_path / "p.txt").write_text("The pass key is 4711. Remember it. ")
    r = CliRunner().invoke(main, ["generate", str(out), "--prompt-file", str(tmp_path / "p.txt"),
                                  "--max-new-tokens", "20", "--stats"])
    assert r.exit_code == 0, r.output
    assert "MC cache:" in r.output and len(r.output.splitlines()[0]) > 0
    r = CliRunner().invoke(main, ["generate", str(out)])
    assert r.exit_code == 1 and "exactly one of --prompt-file or --prompt" in r.output

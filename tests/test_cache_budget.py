"""Cache budget: which segments a capped cache keeps (hand-computed), that the cap holds
the same way in one forward and in token-by-token decoding, and the decode benchmark runs."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import logits_in_calls, tiny_model

import mc_retrofit
from mc_retrofit import MCConfig, MCError, cache_stats
from mc_retrofit.memory import LayerMemory, kept_slots

ROOT = Path(__file__).resolve().parents[1]


def _fill(policy, cap, closes):
    mem = LayerMemory(cap, policy)
    for s in range(closes):
        mem.add_keys(torch.ones(1, 1, 1, 2))
        mem.close(torch.full((1, 2), float(s)))
    return mem


def test_recent_policy_keeps_the_newest():
    mem = _fill("recent", 4, 10)
    assert mem.serials == [[6, 7, 8, 9]] and mem.states[0, :, 0].tolist() == [6, 7, 8, 9] and mem.dropped == 6


def test_log_policy_hand_computed():
    # cap 8 -> the newest 4 stay; older segment s of age a = 10 - s stays if s % 2**(floor(log2 a) - 1) == 0:
    # s=5 (a=5, /2) no, s=4 (a=6, /2) yes, s=3 (a=7) no, s=2 (a=8, /4) no, s=1 (a=9) no, s=0 (a=10, /4) yes.
    mem = _fill("log", 8, 10)
    assert mem.serials == [[0, 4, 6, 7, 8, 9]]
    assert mem.states[0, :, 0].tolist() == [0, 4, 6, 7, 8, 9] and mem.pooled.shape[1] == 6
    assert kept_slots([0, 4, 6, 7, 8, 9], 10, 8, "log") == list(range(6))
    # over a long run the log policy reaches much further back than `recent` with the same cap
    far = _fill("log", 16, 300)
    assert len(far.serials[0]) <= 16 and 300 - far.serials[0][0] > 100


@pytest.mark.parametrize("policy", ["recent", "log"])
def test_capped_cache_is_the_same_in_one_forward_and_in_decoding(policy):
    model = mc_retrofit.convert(tiny_model("mamba2"), MCConfig(segment_size=2, aggregation="gated",
                                                               max_cached_segments=3, cache_policy=policy))
    x = torch.randint(0, 64, (2, 30))
    with torch.no_grad():
        full = model(x, use_cache=True)
        got, cache = logits_in_calls(model, x, [(t, t + 1) for t in range(30)], call_kwargs=lambda a, b, cache: {
            "cache_position": torch.tensor([a]) if cache is not None else None})
    assert (got - full.logits).abs().max() <= 1e-5
    a, b = cache_stats(full), cache_stats(cache)
    assert a == b and all(v["segments"] <= 3 for v in a["layers"].values())
    assert mc_retrofit.returned_cache(full)._mc_memory[0].serials == cache._mc_memory[0].serials


def test_cache_policy_is_validated_and_on_the_command_line(tmp_path):
    from click.testing import CliRunner

    from mc_retrofit.cli import main

    with pytest.raises(MCError, match="cache_policy must be one of recent, log"):
        MCConfig(cache_policy="lru")
    out = tmp_path / "c"
    r = CliRunner().invoke(main, ["convert", "builtin:mamba2-byte", "--out", str(out), "--max-cached-segments", "16",
                                  "--cache-policy", "log"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "mc_config.json").read_text())
    assert cfg["max_cached_segments"] == 16 and cfg["cache_policy"] == "log"


def test_decode_benchmark_runs_and_writes_its_files(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_decode", ROOT / "benchmarks" / "bench_decode.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--segments", "0", "2", "--segment-size", "4", "--steps", "1", "--cap", "1",
                         "--aggregations", "gated", "--out", str(tmp_path)])
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".md", ".png"]
    rows = json.loads(next(tmp_path.glob("*.json")).read_text())["rows"]
    assert [r["gated_cached"] for r in rows] == [0, 2] and [r["gated_cap1_cached"] for r in rows] == [0, 1]
    assert all(r["base_s"] > 0 and r["gated_vs_base"] > 0 for r in rows) and result["names"] == ["gated", "gated_cap1"]


def test_inspect_reports_the_cap_in_bytes():
    from click.testing import CliRunner

    from mc_retrofit.cli import main

    r = CliRunner().invoke(main, ["inspect", "builtin:mamba2-byte", "--json", "--max-cached-segments", "16"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    # builtin:mamba2-byte: 4 layers x (8 heads x 32 x 32 fp32 state + 8 x 32 fp32 summary) per segment
    assert d["segment_bytes"] == 4 * (8 * 32 * 32 * 4 + 8 * 32 * 4) and d["cache_cap_bytes"] == 16 * d["segment_bytes"]
    r = CliRunner().invoke(main, ["inspect", "builtin:mamba2-byte", "--max-cached-segments", "16", "--cache-policy", "log"])
    assert r.exit_code == 0 and "16 segments, log policy" in r.output

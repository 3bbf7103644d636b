"""The benchmark script runs end to end in --smoke mode (reference path on CPU) and
writes the JSON and PNG it promises. Timings are never asserted."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_smoke(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_mc", ROOT / "benchmarks" / "bench_mc.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.delenv("MC_RETROFIT_FORCE_REFERENCE", raising=False)
    result = bench.main(["--smoke", "--out", str(tmp_path), "--lengths", "32"])
    files = sorted(p.suffix for p in tmp_path.iterdir())
    assert files == [".json", ".png"]
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert data["smoke"] is True and data["versions"]["torch"] == result["versions"]["torch"]
    assert {r["aggregation"] for r in data["readout"]} == {"gated", "residual", "ssc"}
    assert [r["N"] for r in data["decode"] if r["aggregation"] == "gated"] == bench.SMOKE["decode_N"]
    (entry,) = data["prefill"]
    for agg in bench.SMOKE["aggs"]:
        for C in bench.SMOKE["segments"]:
            assert entry[f"mc_{agg}_{C}_s"] > 0 and entry[f"mc_{agg}_{C}_vs_base"] > 0
    assert entry["base_s"] > 0 and entry["sdpa_transformer_s"] > 0

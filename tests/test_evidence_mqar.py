"""recipes/studies/evidence_mqar.py's own logic against independent computations: the
selection rule, the per-cell intervals, and the splits' generator seeds (which must be the
seeds the sequences are really drawn with, and never shared)."""
from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import torch

from mc_retrofit import tasks
from mc_retrofit.eval import retrieval

STUDIES = Path(__file__).resolve().parents[1] / "recipes" / "studies"


def _study():
    sys.path.insert(0, str(STUDIES))
    try:
        return importlib.import_module("evidence_mqar")
    finally:
        sys.path.remove(str(STUDIES))


def test_select_picks_the_hand_computed_best_at_32_pairs():
    E = _study()
    cands = {  # per-sequence recalls by cell (binary fractions: the ties below are exact)
        "a": {"L256-P16": [1.0, 1.0], "L256-P32": [0.5, 0.75], "L1024-P32": [0.625, 0.625]},  # P32 mean 0.625
        "b": {"L256-P16": [0.0, 0.0], "L256-P32": [0.875, 0.875], "L1024-P32": [0.5, 0.5]},  # 0.6875: best
        "c": {"L256-P16": [1.0, 1.0], "L256-P32": [0.75, 0.75], "L1024-P32": [0.5, 0.5]},  # 0.625
    }
    assert E.select(cands) == "b"  # best P32 mean, though worst elsewhere
    assert E.select(cands, pairs=16) == "a"  # a, c tie at P16 (1.0) and overall (2.25 / 3): first declared
    cands["c"]["L256-P32"] = [0.875, 0.875]  # c overall (1 + .875 + .5) / 3 > a's (1 + .625 + .625) / 3
    assert E.select(cands, pairs=16) == "c"
    assert E.select({"x": cands["a"], "y": cands["a"]}) == "x"  # a full tie: the declared order


def test_cell_interval_is_a_bootstrap_of_the_mean():
    E = _study()
    const = E.mean_interval([0.25] * 30)
    assert (const.estimate, const.low, const.high) == (0.25, 0.25, 0.25)
    x = [1.0] * 120 + [0.0] * 280  # p = 0.3, n = 400: the normal interval p +- 1.96 sqrt(p(1-p)/n)
    ci = E.mean_interval(x)
    half = 1.96 * math.sqrt(0.3 * 0.7 / 400)
    assert ci.estimate == 0.3
    assert abs(ci.low - (0.3 - half)) < 0.012 and abs(ci.high - (0.3 + half)) < 0.012
    # the change vs base is the paired difference: a row that adds 0.1 to every sequence
    rows = {"base": {"info": {}, "val": {"c": [0.5]}, "test": {"c": [0.2, 0.5, 0.8]}},
            "r": {"info": {}, "val": {"c": [0.6]}, "test": {"c": [0.3, 0.6, 0.9]}}}
    d = E.summarise(rows)["r"]["test"]["c"]["change_vs_base"]
    assert abs(d["estimate"] - 0.1) < 1e-12 and abs(d["low"] - 0.1) < 1e-12 and abs(d["high"] - 0.1) < 1e-12


def test_split_seeds_are_the_real_ones_and_disjoint(monkeypatch):
    E = _study()
    seeds = E.split_seeds()
    assert not seeds["tune"] & seeds["val"] and not seeds["tune"] & seeds["test"] and not seeds["val"] & seeds["test"]
    # the cells eval builds are those with room for a query after the pairs, and each cell is
    # tasks.mqar with the recorded seed
    for name, body, seed in (("val", E.VAL, E.VAL_SEED), ("test", E.TEST, E.TEST_SEED)):
        items = retrieval.make_mqar_items({**body, "samples": 2}, 128, seed)
        built = {(int(it.length), int(it.depth)) for it in items}
        assert built == {(L, P) for L in body["lengths"] for P in body["pairs"] if (L - 2 * P) // 2 >= 1}
        used = set()
        for L, P in built:
            for s in seeds[name]:
                ref = tasks.mqar(2, L, P, vocab_size=128, n_queries=min(P, (L - 2 * P) // 2), seed=s,
                                 random_non_queries=False)
                got = torch.stack([it.ids for it in items if (int(it.length), int(it.depth)) == (L, P)])
                if torch.equal(ref.inputs, got):
                    used.add(s)
        assert used == seeds[name]
    ids, _ = E.data(8, 256, 32, 128, E.TUNE_SEED)  # the tuning rows: tasks.mqar with TUNE_SEED + i
    ref = torch.cat([tasks.mqar(2, 256, 8 * (i + 1), vocab_size=128, seed=s, random_non_queries=False).inputs
                     for i, s in enumerate(sorted(seeds["tune"]))])
    assert sorted(map(tuple, ids.tolist())) == sorted(map(tuple, ref.tolist()))
    # the script refuses to run when two splits share a seed
    monkeypatch.setattr(E, "TEST_SEED", E.VAL_SEED)
    try:
        E.check_splits(E.split_seeds())
    except SystemExit as e:
        assert "share generator seeds" in str(e)
    else:
        raise AssertionError("overlapping splits were accepted")


def test_gate_row_names():
    E = _study()
    assert E.gate_row("query") == ("query", E.GATE, {})
    source, gate, rates = E.gate_row("lowrank-seg4-lr0.005-clr0.0001")
    assert (source, gate["segment_size"], rates) == ("lowrank", 4, {"lr": 0.005, "connector_lr": 0.0001})
    assert {k: v for k, v in gate.items() if k != "segment_size"} == {k: v for k, v in E.GATE.items()
                                                                      if k != "segment_size"}
    assert E.GATE["segment_size"] == 8  # the named row changed a copy
    for bad in ("free", "full+mc", "query-seg", "query-lrx", "query-clr", "query-bias2", "queries"):
        assert E.gate_row(bad) is None, bad
    assert E.label("learned-seg4") == "gate-tuned, learned, segment 4"
    assert E.label("lowrank-lr0.01") == "gate-tuned, lowrank, lr 0.01"
    assert E.label("lowrank-seg4-clr0.001") == "gate-tuned, lowrank, segment 4, connector lr 0.001"

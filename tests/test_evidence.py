"""recipes/studies/evidence.py's row names against the finetune command they must run: each suffix
of a gate row reaches ``mc-retrofit finetune`` as its own option, and an unnamed option keeps the
value the committed rows ran with."""
from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "recipes" / "studies"))
import evidence as E  # noqa: E402


class _Ran(Exception):
    pass


def _command(monkeypatch, tmp_path, row):
    """The finetune arguments gate_row would run for ``row`` (stopped before anything runs)."""
    seen = {}

    def cli(args, logfile):
        seen["args"] = args
        raise _Ran

    monkeypatch.setattr(E, "cli", cli)
    a = SimpleNamespace(work=tmp_path, model="builtin:m", rank=2, lr=0.05, steps=200, mix_rows=400, ctx=512)
    with pytest.raises(_Ran):
        E.gate_row(a, tmp_path, row)
    args = seen["args"]
    return {flag: args[i + 1] for i, flag in enumerate(args) if flag.startswith("--") and flag != "--force"}


def test_gate_row_suffixes_reach_finetune(monkeypatch, tmp_path):
    opts = _command(monkeypatch, tmp_path, "lowrank-ssc2-seed1-clr0.005")
    assert (opts["--gate-source"], opts["--gate-rank"], opts["--aggregation"], opts["--top-k"]) == \
        ("lowrank", "2", "ssc", "2")
    assert (opts["--seed"], opts["--connector-lr"], opts["--lr"]) == ("1", "0.005", "0.05")
    assert (opts["--online-bias"], opts["--seq-len"], opts["--cache-weight"]) == ("0", "2048", "0")
    plain = _command(monkeypatch, tmp_path, "query-len8")
    assert plain["--seq-len"] == "4096" and plain["--gate-source"] == "query"
    for absent in ("--connector-lr", "--seed", "--aggregation", "--gate-rank"):
        assert absent not in plain, absent


def test_gate_row_names():
    assert E.GATE_ROW.match("learned-ssc2-bias-1.5-len8-seed3-clr1e-3").groups() == \
        ("learned", "2", "-1.5", "8", "3", "1e-3")
    for bad in ("full", "full+mc", "lowrank-clr", "lowrank-clr0.1-seed1", "query-ssc", "queries"):
        assert not E._is_gate_row(bad), bad

"""Committed checkpoints (checkpoints/*/ and the trained builtins): each loads with its
family's stock class, is small, and reproduces the numbers its training.json records."""
from __future__ import annotations

import json
import sys

import pytest

from conftest import ROOT, shared_path
from mc_retrofit import tasks
from mc_retrofit.errors import MCError

sys.path.insert(0, str(ROOT / "recipes"))
import families  # noqa: E402
import train_lm  # noqa: E402
import train_mqar  # noqa: E402

BUILTIN = ROOT / "retrofit" / "builtin"
DIRS = sorted(p for p in (ROOT / "checkpoints").glob("*") if (p / "training.json").is_file())
DIRS += sorted(p for p in BUILTIN.glob("*") if (p / "training.json").is_file()
               and "recipe" in json.loads((p / "training.json").read_text()))
TEXT = [p for p in DIRS if "heldout" in json.loads((p / "training.json").read_text())]
MQAR = [p for p in DIRS if json.loads((p / "training.json").read_text()).get("task") == "mqar"]
MAX_BYTES = 5 * 2**20


def _load(path):
    try:
        return families.load(path)
    except MCError as e:  # fla families without a GPU or mc_retrofit.adapters.fla.cpu
        pytest.skip(str(e))


def test_checkpoints_exist():
    assert TEXT and MQAR, "no committed checkpoints found"


@pytest.mark.parametrize("path", TEXT, ids=lambda p: p.name)
def test_text_checkpoint_reproduces_heldout_bits_per_byte(path):
    data = shared_path("data", "gutenberg")
    rec = json.loads((path / "training.json").read_text())
    h = rec["heldout"]
    assert (path / "model.safetensors").stat().st_size < MAX_BYTES
    # A real language model: far better than the unigram byte model (about 4.5 bits/byte).
    assert h["bits_per_byte"] < h["unigram_bits_per_byte"] - 1.0
    model = _load(path)
    held = tasks.eval_slice(h["book"], h["check_bytes"], h["offset"], data_dir=data)
    with train_lm.scan_context(rec["family"]):
        bpb = tasks.bits_per_byte(model, held, window=h["window"])
    assert abs(bpb - h["check_bits_per_byte"]) < 0.05


@pytest.mark.parametrize("path", MQAR, ids=lambda p: p.name)
def test_mqar_checkpoint_reproduces_recall(path):
    rec = json.loads((path / "training.json").read_text())
    assert (path / "model.safetensors").stat().st_size < MAX_BYTES
    model = _load(path)
    cfg = {**train_mqar.DEFAULTS, **rec["recipe"], "eval_samples": 64}
    train_setting = next(r for r in rec["eval"]["grid"] if (r["seq_len"], r["n_pairs"]) == (rec["seq_len"], rec["n_pairs"]))
    with train_mqar.scan_context(rec["family"]):
        acc = train_mqar.accuracy(model, cfg, rec["seq_len"], rec["n_pairs"], train_mqar.EVAL_SEED, "cpu")
    # 64 fresh sequences instead of the 256 recorded: the share right differs by sampling only.
    assert abs(acc - train_setting["accuracy"]) < 0.05

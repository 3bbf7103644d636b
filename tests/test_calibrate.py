"""Training-free calibration: the result honours the no-harm constraint (recomputed
independently), follows its own selection rule, and is exactly the base when nothing helps."""
from __future__ import annotations

import random

import pytest
import torch
from conftest import tiny_model

from mc_retrofit import MCError
from mc_retrofit.calibrate import answer_accuracy, answer_scores, bits_per_token, calibrate, calibrated_model
from mc_retrofit.eval.stats import paired_bootstrap
from mc_retrofit.finetune.mix import MixBuilder
from mc_retrofit.model import gate_modules, load, save_converted

WORDS = "a quiet town by the sea where the boats come in at dawn and leave at dusk".split()
TEXT = " ".join(random.Random(2).choice(WORDS) for _ in range(4000)).encode()


@pytest.fixture(scope="module")
def setup():
    base = tiny_model("mamba2", vocab_size=256, chunk_size=16)
    stream = torch.tensor(list(TEXT[:8000]))
    windows = torch.stack([stream[i:i + 161] for i in range(0, 1600, 400)])
    rows = MixBuilder(TEXT[8000:], 160, "passkey=1").tensors(4, seed=0)
    return base, windows, rows


def test_calibration_honours_the_margin_and_its_selection_rule(setup, tmp_path):
    base, windows, rows = setup
    result = calibrate(base, windows, rows, segment_sizes=(32, 64), margin=0.05, log=lambda s: None)
    model = calibrated_model(base, result)
    bits, acc = bits_per_token(model, windows), answer_accuracy(model, *rows)  # recomputed, not from the table
    assert bits == pytest.approx(result.bits, abs=1e-6) and acc == pytest.approx(result.accuracy)
    # the chosen online bias is the gates' parameter, and the written directory computes the same numbers
    biases = [g.online_bias for g in gate_modules(model).values()]
    assert biases and all(bool((b == result.config.online_bias).all()) for b in biases)
    save_converted(model, tmp_path / "cal")
    assert bits_per_token(load(tmp_path / "cal"), windows) == bits
    assert bits <= bits_per_token(base, windows) + 0.05 + 1e-6
    assert acc >= answer_accuracy(base, *rows)
    feasible = [r for r in result.table if r["feasible"]]
    assert len(result.table) >= 2 * 3 + 2 + 3 + 2  # structure, then cache weight, bias, temperature
    if not result.is_base:
        assert result.accuracy == max(r["accuracy"] for r in feasible)
        # it beat the base: more accurate, or an answer NLL lower beyond the paired interval
        hits, nll = answer_scores(model, *rows)
        base_hits, base_nll = answer_scores(base, *rows)
        assert sum(nll) / len(nll) == pytest.approx(result.answer_nll, abs=1e-6)
        assert acc > answer_accuracy(base, *rows) or paired_bootstrap(base_nll, nll).high < 0
        best = min(r["answer_nll"] for r in feasible if r["accuracy"] == result.accuracy)
        assert result.answer_nll == pytest.approx(best, abs=1e-9)


def test_answer_scores_by_hand():
    import math
    from types import SimpleNamespace

    class Fixed(torch.nn.Module):  # every position: p(token 2) = 3 / (3 + 1 + 1 + 1) = 1/2, the others 1/6
        def forward(self, ids, use_cache=False):
            logits = torch.zeros(ids.shape[0], ids.shape[1], 4)
            logits[..., 2] = math.log(3.0)
            return SimpleNamespace(logits=logits)

    ids = torch.zeros(2, 3, dtype=torch.long)
    labels = torch.tensor([[-100, 2, 2], [-100, 2, 1]])
    hits, nll = answer_scores(Fixed(), ids, labels)
    assert hits == [True, False]
    assert nll == pytest.approx([math.log(2.0), (math.log(2.0) + math.log(6.0)) / 2])
    assert answer_accuracy(Fixed(), ids, labels) == 0.5


def test_when_nothing_helps_the_result_is_exactly_the_base(setup):
    base, windows, rows = setup
    result = calibrate(base, windows, rows, segment_sizes=(32,), margin=0.0, log=lambda s: None)
    if not result.is_base:  # something strictly beat the base at zero cost: still within the margin
        assert result.bits <= result.base_bits + 1e-6 and result.accuracy > result.base_accuracy
        return
    model = calibrated_model(base, result)
    x = windows[:2, :-1]
    with torch.no_grad():
        assert torch.equal(model(x).logits, base(x).logits)


def test_calibrate_refuses_empty_data_and_bad_margins(setup):
    base, windows, rows = setup
    with pytest.raises(MCError, match="empty"):
        calibrate(base, windows[:0], rows, log=lambda s: None)
    with pytest.raises(MCError, match="margin"):
        calibrate(base, windows, rows, margin=float("nan"), log=lambda s: None)


def test_calibrate_command_writes_a_converted_directory_with_its_report(tmp_path):
    import json

    from click.testing import CliRunner

    import mc_retrofit
    from mc_retrofit.cli import main

    tiny_model("mamba2", vocab_size=256, chunk_size=16).save_pretrained(tmp_path / "ckpt")
    (tmp_path / "train.txt").write_bytes(TEXT)
    args = ["calibrate", str(tmp_path / "ckpt"), "--data", str(tmp_path / "train.txt"), "--out", str(tmp_path / "cal"),
            "--seq-len", "320", "--windows", "2", "--rows", "2", "--segment-sizes", "64"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    assert report["bits_per_token"] <= report["base_bits_per_token"] + report["margin"] + 1e-9
    model = mc_retrofit.load(tmp_path / "cal")
    assert model.mc.config.segment_size == 64
    again = CliRunner().invoke(main, args)  # an existing output is never replaced without --force
    assert again.exit_code != 0 and "--force" in again.output
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    r = CliRunner().invoke(main, [*args[:3], str(empty), "--out", str(tmp_path / "cal2")])
    assert r.exit_code != 0 and "empty" in r.output and len(r.output.strip().splitlines()) == 1


@pytest.mark.parametrize("vocab", [200, 384])
def test_calibrate_never_reads_bytes_as_the_ids_of_a_tokenized_model(tmp_path, vocab):
    """A vocabulary that is not 256 and no tokenizer: bytes would be wrong ids (or out of range)."""
    from click.testing import CliRunner

    from mc_retrofit.cli import main

    tiny_model("mamba2", vocab_size=vocab, chunk_size=16).save_pretrained(tmp_path / "ckpt")
    (tmp_path / "train.txt").write_bytes(TEXT)
    r = CliRunner().invoke(main, ["calibrate", str(tmp_path / "ckpt"), "--data", str(tmp_path / "train.txt"),
                                  "--out", str(tmp_path / "cal"), "--seq-len", "320"])
    assert r.exit_code != 0 and len(r.output.strip().splitlines()) == 1, r.output
    assert f"{vocab}" in r.output and not (tmp_path / "cal").exists()

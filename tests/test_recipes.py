"""The training recipes (recipes/): end-to-end smoke runs in a shortened mode, the Mamba
scan used while training against transformers' own op, and the batch sampler."""
from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, shared_path, tiny_model
from mc_retrofit import tasks
from mc_retrofit.errors import MCError

sys.path.insert(0, str(ROOT / "recipes"))
import common  # noqa: E402
import families  # noqa: E402
import fast_scan  # noqa: E402
import train_lm  # noqa: E402
import train_mqar  # noqa: E402

TINY_MAMBA2 = {"hidden_size": 32, "num_hidden_layers": 1, "num_heads": 2, "head_dim": 32, "state_size": 8,
               "chunk_size": 16}


def test_train_lm_smoke(tmp_path):
    data = shared_path("data", "gutenberg")
    cfg = common.load_config(train_lm.DEFAULTS, None, [
        "steps=3", "ctx=200", "batch_size=2", f"model={json.dumps(TINY_MAMBA2)}", "eval_bytes=2000",
        "val_bytes=640", "passkey_eval_samples=2", "passkey_frac=0.4", "multikey_frac=0.4", "multikey_keys=[2,2]",
        "log_every=1", f"data_dir={data}"])
    out = tmp_path / "lm"
    rec = train_lm.train(cfg, out, quiet=True)
    saved = json.loads((out / "training.json").read_text())
    assert saved["steps"] == 3 and len(saved["log"]) == 3 and saved["device"] == "cpu"
    assert not set(saved["data"]["text_files"]) & set(tasks.EVAL_ONLY)
    # The recorded held-out bits/byte is what the saved model gives when reloaded.
    model = families.load(out)
    held = tasks.eval_slice("austen-emma.txt", 2000, data_dir=data)
    assert tasks.bits_per_byte(model, held, window=200) == pytest.approx(rec["heldout"]["bits_per_byte"], abs=1e-4)
    assert rec["heldout"]["unigram_bits_per_byte"] == pytest.approx(
        tasks.unigram_bits_per_byte(tasks.load_corpus("train", data)[:-640], held))
    with pytest.raises(MCError, match="exists"):
        train_lm.train(cfg, out, quiet=True)


def test_train_mqar_smoke(tmp_path):
    cfg = common.load_config(train_mqar.DEFAULTS, None, [
        "steps=4", "batch_size=8", "check_every=2", "log_every=2", "eval_samples=8", "eval_grid=[[32,4],[64,4]]",
        "seq_len=32", "n_pairs=4", "pairs_range=[2,4]", 'model={"hidden_size":32,"num_hidden_layers":1,"num_heads":2}'])
    rec = train_mqar.train(cfg, tmp_path / "mq", quiet=True)
    assert rec["steps"] == 4 and [r["seq_len"] for r in rec["eval"]["grid"]] == [32, 64]
    model = families.load(tmp_path / "mq")
    again = train_mqar.accuracy(model, cfg, 32, 4, train_mqar.EVAL_SEED, "cpu")
    assert again == pytest.approx(rec["eval"]["grid"][0]["accuracy"])


TINY = {"mamba2": {"num_heads": 2}, "mamba": {}, "gla": {"num_heads": 2}, "delta_net": {"num_heads": 2},
        "gated_deltanet": {"num_heads": 2, "head_dim": 16}, "retnet": {"num_heads": 2}, "rwkv7": {"head_dim": 16, "num_hidden_layers": 2}}  # RWKV-7 init divides by layers - 1


@pytest.mark.parametrize("family", sorted(TINY))
def test_every_family_trains(family, tmp_path):
    """Two MQAR steps of a tiny model of each family: the loss is finite, the weights move,
    and the saved directory loads back with the same weights."""
    model_cfg = {"hidden_size": 32, "num_hidden_layers": 1, **TINY[family]}
    try:
        before = families.build(family, vocab_size=32, seed=0, **{**train_mqar.model_defaults(family), **model_cfg})
    except MCError as e:
        pytest.skip(str(e))
    cfg = common.load_config(train_mqar.DEFAULTS, None, [
        f"family={family}", f"model={json.dumps(model_cfg)}", "vocab_size=32", "steps=2", "batch_size=4",
        "seq_len=24", "n_pairs=4", "pairs_range=[2,4]", "check_every=2", "log_every=1", "eval_samples=4",
        "eval_grid=[[24,4]]"])
    rec = train_mqar.train(cfg, tmp_path / family, quiet=True)
    assert all(math.isfinite(row[2]) for row in rec["log"])
    after = families.load(tmp_path / family)
    moved = [not torch.equal(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values())]
    assert any(moved)


def test_config_errors():
    with pytest.raises(MCError, match="unknown key"):
        common.load_config(train_lm.DEFAULTS, None, ["nonsense=1"])
    assert common.load_config(train_lm.DEFAULTS, None, ["family=gla"])["family"] == "gla"
    with pytest.raises(MCError, match="unknown family"):
        families.build("lstm")


@pytest.mark.parametrize("seq_len", [1, 7, 40])
def test_fast_scan_matches_transformers_mamba(seq_len):
    """Same logits and same gradients as transformers' own (stock) Mamba op."""
    model = tiny_model("mamba").train()
    ids = torch.randint(0, 64, (2, seq_len), generator=torch.Generator().manual_seed(seq_len))

    def run():
        model.zero_grad()
        logits = model(input_ids=ids).logits
        logits.square().mean().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters()]

    ref, ref_grads = run()
    with fast_scan.patched():
        new, new_grads = run()
    torch.testing.assert_close(new, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(new_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_sampler_weights_mark_answer_bytes():
    hay = b"Call me Ishmael. Some years ago, never mind how long precisely. " * 400
    cfg = {**train_lm.DEFAULTS, "ctx": 300, "passkey_frac": 0.4, "multikey_frac": 0.3, "multikey_keys": [2, 3],
           "answer_weight": 7.0, "recall_min_len": 110}
    sampler = train_lm.Sampler(cfg, hay, random.Random(0))
    kinds = set()
    for _ in range(30):
        ids, weight, kind = sampler.batch(3, progress=random.Random(_).random())
        kinds.add(kind)
        if kind == "text":
            assert ids.shape == (3, 301) and (weight == 1).all()
            continue
        for row, w in zip(ids, weight):
            text = bytes(row.tolist())
            answer = bytes(row[1:][w == 7.0].tolist())  # targets weighted as answers
            assert len(answer) == 5 and answer.isdigit()
            assert text.endswith(answer) and answer in text[:-5]  # the key was given earlier
    assert kinds == {"text", "recall"}

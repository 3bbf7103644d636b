"""The MQAR section of the eval harness: items are the training generator's sequences,
the recall it reports equals ``tasks.mqar_accuracy`` on the model's own full forward,
and a synthetic-only recipe needs no tokenizer or text (vocabularies other than 256)."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import mc_retrofit as mr
from mc_retrofit import MCError, tasks
from mc_retrofit.eval import EvalOptions, evaluate, load_recipe, markdown, validate_results
from mc_retrofit.eval import retrieval

from conftest import tiny_model

RECIPE = {"name": "tiny-mqar", "batch_size": 5, "mqar": {"lengths": [24, 40], "pairs": [3, 12], "samples": 6},
          "variants": [{"name": "ssc1", "mc": {"segment_size": 8, "aggregation": "ssc", "top_k": 1}}]}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("mqar")
    tiny_model("mamba2", vocab_size=64, chunk_size=8).save_pretrained(root / "m")
    (root / "m" / "training.json").write_text(json.dumps({"task": "mqar", "seq_len": 24}))
    return root / "m"


def test_recall_equals_the_task_scorer_on_a_full_forward(ckpt):
    res = evaluate(EvalOptions(model=str(ckpt), recipe=RECIPE, progress=False))
    assert validate_results(res) == [] and res["train_context"] == 24
    model = mr.load_base(ckpt)
    mc = mr.convert(mr.load_base(ckpt), mr.MCConfig(segment_size=8, aggregation="ssc", top_k=1))
    items = retrieval.make_mqar_items(RECIPE["mqar"], 64, seed=0)
    # L=24 with 12 pairs leaves no query slot: that cell does not exist
    assert {(it.length, it.depth) for it in items} == {(24, 3.0), (40, 3.0), (40, 12.0)}
    for name, m in (("base", model), ("ssc1", mc)):
        for L, P in ((24, 3), (40, 3), (40, 12)):
            cell = [it for it in items if it.length == L and it.depth == P]
            batch = tasks.MQARBatch(torch.stack([it.ids for it in cell]), torch.stack([it.meta["targets"] for it in cell]),
                                    torch.stack([it.meta["targets"] for it in cell]) != -100)
            with torch.no_grad():
                per_seq = [tasks.mqar_accuracy(m(batch.inputs[i:i + 1]).logits,
                                               tasks.MQARBatch(batch.inputs[i:i + 1], batch.targets[i:i + 1],
                                                               batch.mask[i:i + 1])) for i in range(len(cell))]
            got = res["mqar"]["grid"][name][str(L)][str(float(P))]["accuracy"]
            assert got == pytest.approx(sum(per_seq) / len(per_seq), abs=1e-6), (name, L, P)
    assert "MQAR recall" in markdown(res) and "| ssc1 | 12 |" in markdown(res)


def test_mqar_recipe_and_bad_bodies():
    assert load_recipe("mqar")["mqar"]["pairs"]
    from mc_retrofit.eval.recipes import validate

    with pytest.raises(MCError, match="mqar.pairs must be a non-empty list"):
        validate({**RECIPE, "mqar": {"lengths": [32], "pairs": []}})
    with pytest.raises(MCError, match="unknown key"):
        validate({**RECIPE, "mqar": {"lengths": [32], "depths": [0.5]}})
    with pytest.raises(MCError, match="need more than"):
        retrieval.make_mqar_items({"lengths": [200], "pairs": [40]}, 64, seed=0)


def test_cli_writes_the_mqar_plot(ckpt, tmp_path):
    from mc_retrofit.cli import main

    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps(RECIPE))
    r = CliRunner().invoke(main, ["eval", str(ckpt), "--recipe", str(recipe), "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "o" / "mqar.png").is_file() and (tmp_path / "o" / "results.md").is_file()

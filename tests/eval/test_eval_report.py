"""The evaluation end to end on a tiny saved model and on the builtin checkpoint: JSON
schema, determinism under --seed, converted inputs, data formats, recipes, CLI."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import mc_retrofit
from mc_retrofit.errors import MCError
from mc_retrofit.eval import (EvalOptions, available_recipes, evaluate, load_recipe, markdown, parse_variant,
                              validate_results)
from mc_retrofit.eval.text import load_texts

from conftest import tiny_model

WORDS = "the pass key river candle forest silver lantern meadow copper falcon willow morning evening".split()
TINY_RECIPE = {
    "name": "tiny", "batch_size": 2,
    "perplexity": {"lengths": [64, 160], "windows": 2, "position_bucket": 32},
    "passkey": {"lengths": [128, 160], "depths": [0, 1], "samples": 1},
    "multikey": {"lengths": [256], "samples": 1, "n_keys": 2},
    "variable_tracking": {"lengths": [256], "samples": 1},
    "variants": [{"name": "gated", "mc": {"segment_size": 32}}, {"name": "ssc1", "mc": {"segment_size": 32, "aggregation": "ssc", "top_k": 1}}],
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    model = tiny_model("mamba2", vocab_size=256, chunk_size=32)
    model.save_pretrained(root / "ckpt")
    rng = torch.Generator().manual_seed(0)
    text = " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (600,), generator=rng).tolist())
    (root / "book.txt").write_text(text)
    return root


def _run(tiny, **kw):
    opts = dict(model=str(tiny / "ckpt"), recipe=TINY_RECIPE, data=str(tiny / "book.txt"), progress=False)
    return evaluate(EvalOptions(**{**opts, **kw}))


def test_results_follow_the_schema_and_are_deterministic(tiny):
    a = _run(tiny, seed=4)
    assert validate_results(a) == []
    assert [v["name"] for v in a["variants"]] == ["base", "gated", "ssc1"]
    assert a["sections"] == ["perplexity", "passkey", "multikey", "variable_tracking"]
    json.loads(json.dumps(a))  # every value is JSON
    b = _run(tiny, seed=4, sections=["perplexity", "passkey"])
    assert [r for r in a["records"] if r["kind"] in b["sections"]] == b["records"]
    c = _run(tiny, seed=5, sections=["perplexity"])
    assert c["sections"] == ["perplexity"]
    assert [r["start"] for r in c["records"]] != [r["start"] for r in a["records"] if r["kind"] == "perplexity"]
    table = markdown(a)
    assert "| gated |" in table and "pass-key" in table and "variable tracking" in table


def test_a_broken_result_fails_the_schema(tiny):
    a = _run(tiny, sections=["perplexity"])
    a["perplexity"]["by_length"]["gated"]["64"]["bits_per_token"] = float("nan")
    del a["environment"]
    problems = validate_results(a)
    assert any("nan" in p for p in problems) and "missing environment" in problems


def test_a_converted_directory_is_compared_with_its_base(tiny, tmp_path):
    model = mc_retrofit.convert(mc_retrofit.load_base(tiny / "ckpt"), mc_retrofit.MCConfig(segment_size=32))
    model.save_pretrained(tmp_path / "conv")
    r = _run(tiny, model=str(tmp_path / "conv"), sections=["perplexity"])
    assert [v["name"] for v in r["variants"]] == ["base", "model"]
    g = _run(tiny, sections=["perplexity"])
    for L in ("64", "160"):  # the converted dir's own config equals the recipe's "gated"
        assert r["perplexity"]["by_length"]["model"][L] == g["perplexity"]["by_length"]["gated"][L]
        assert r["perplexity"]["by_length"]["base"][L] == g["perplexity"]["by_length"]["base"][L]


def test_data_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "hello"}) + "\n\n" + json.dumps({"text": "world"}) + "\n")
    assert [t for _, t in load_texts(tmp_path / "a.jsonl")] == ["hello", "world"]
    from datasets import Dataset

    Dataset.from_dict({"content": ["one", "two"]}).save_to_disk(str(tmp_path / "ds"))
    assert [t for _, t in load_texts(tmp_path / "ds", text_field="content")] == ["one", "two"]
    with pytest.raises(MCError, match="columns"):
        load_texts(tmp_path / "ds")
    (tmp_path / "b.jsonl").write_text("{not json\n")
    with pytest.raises(MCError, match="line 1"):
        load_texts(tmp_path / "b.jsonl")


def test_recipes_and_variants():
    assert {"smoke", "default", "long", "sweep"} <= set(available_recipes())
    for name in available_recipes():
        load_recipe(name)
    with pytest.raises(MCError, match="no evaluation recipe"):
        load_recipe("nope")
    v = parse_variant("name=s4,aggregation=ssc,top_k=4,segment_size=64,online_bias=1.5")
    assert v.name == "s4" and v.mc.top_k == 4 and v.mc.online_bias == 1.5 and v.mc.segment_size == 64
    with pytest.raises(MCError):
        parse_variant("aggregation=nonsense")


def test_variants_put_the_online_bias_on_the_gates_and_keep_a_tuned_one(tmp_path):
    from mc_retrofit.eval.variants import OWN, ModelSource, Variant
    from mc_retrofit.model import gate_state_dict

    base = tiny_model("mamba2")
    base.save_pretrained(tmp_path / "orig")
    model = ModelSource(str(tmp_path / "orig")).build(parse_variant("name=b,online_bias=1.5,segment_size=8"))
    biases = {k: v for k, v in gate_state_dict(model).items() if k.endswith(".online_bias")}
    assert biases and all(bool((v == 1.5).all()) for v in biases.values())
    tuned = mc_retrofit.convert(tiny_model("mamba2"), mc_retrofit.MCConfig(segment_size=8, online_bias=1.5))
    with torch.no_grad():  # per-head biases, as finetune leaves them
        for k, v in gate_state_dict(tuned).items():
            if k.endswith(".online_bias"):
                v.copy_(torch.arange(v.numel()) * 0.25 - 0.5)
    tuned.save_pretrained(tmp_path / "conv")
    source = ModelSource(str(tmp_path / "conv"))
    own = source.build(Variant(OWN, source.own_config(), source=OWN))
    want, got = gate_state_dict(tuned), gate_state_dict(own)
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)


def test_cli_smoke_on_the_builtin_checkpoint(tmp_path):
    from conftest import shared_path

    shared_path("data", "gutenberg", "austen-emma.txt")
    from mc_retrofit.cli import main

    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["eval", "builtin:mamba2-byte", "--recipe", "smoke", "--out", str(out), "--quiet",
                                    "--only", "perplexity,passkey"])
    assert res.exit_code == 0, res.output
    assert "| mc-gated-128 |" in res.output
    results = json.loads((out / "results.json").read_text())
    assert validate_results(results) == []
    assert results["train_context"] == 512
    assert (out / "perplexity.png").stat().st_size > 0 and (out / "passkey.png").stat().st_size > 0
    bad = CliRunner().invoke(main, ["eval", "builtin:mamba2-byte", "--only", "ppl"])
    assert bad.exit_code == 1 and "error: --only takes" in bad.output
    again = CliRunner().invoke(main, ["eval", "builtin:mamba2-byte", "--recipe", "smoke", "--out", str(out), "--quiet"])
    assert again.exit_code == 1 and "pass --force" in again.output
    assert json.loads((out / "results.json").read_text()) == results  # untouched


def test_a_model_that_ships_a_tokenizer(tiny, tmp_path):
    """Tokenizer models: documents and prompts go through the checkpoint's own tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = (tiny / "book.txt").read_text()
    tok.train_from_iterator([text, "The pass key is 12345. What is the pass key? Let ab = 6789."],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    model = tiny_model("mamba2", vocab_size=len(fast), chunk_size=32)
    model.save_pretrained(tmp_path / "ckpt")
    fast.save_pretrained(tmp_path / "ckpt")
    recipe = {"name": "tok", "perplexity": {"lengths": [40], "windows": 2, "position_bucket": 8},
              "passkey": {"lengths": [150], "depths": [0.5], "samples": 2},
              "variants": [{"name": "gated", "mc": {"segment_size": 8}}]}
    r = evaluate(EvalOptions(model=str(tmp_path / "ckpt"), recipe=recipe, data=str(tiny / "book.txt"), progress=False))
    assert r["tokenizer"] == str(tmp_path / "ckpt")
    assert validate_results(r) == []
    ppl = [x for x in r["records"] if x["kind"] == "perplexity"]
    assert all(x["count"] == 39 for x in ppl)
    words = fast.encode(text, add_special_tokens=False)
    assert len(words) < len(text) / 2  # the tokenizer, not bytes, made the windows
    pk = [x for x in r["records"] if x["kind"] == "passkey"]
    assert all(fast.decode(fast.encode(x["answer"], add_special_tokens=False)) == x["answer"] for x in pk)
    assert all(abs(x["tokens"] - 150) <= 15 for x in pk)  # lengths in tokens, approximately


def test_the_model_alone_with_no_recipe_variants(tiny):
    res = _run(tiny, use_recipe_variants=False, sections=["perplexity"])
    assert [v["name"] for v in res["variants"]] == ["base"] and "base" in res["perplexity"]["by_length"]
    with pytest.raises(Exception, match="nothing to compare"):
        _run(tiny, recipe={**TINY_RECIPE, "variants": []}, sections=["perplexity"])


def test_default_out_folder_is_created(tmp_path, monkeypatch):
    """The README's main command has no --out: eval-results/MODEL-RECIPE appears in a fresh folder."""
    from conftest import shared_path

    shared_path("data", "gutenberg", "austen-emma.txt")
    from mc_retrofit.cli import main

    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, ["eval", "builtin:mamba2-byte", "--recipe", "smoke", "--only", "perplexity",
                                    "--quiet", "--no-plots"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "eval-results" / "builtin-mamba2-byte-smoke" / "results.json").is_file()

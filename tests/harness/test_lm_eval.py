"""lm-evaluation-harness: the ``mc-retrofit`` model against independent oracles, offline.

A tiny Mamba2 with a small byte-level BPE trained here; custom tasks from local JSONL files
(``--include_path``); lm-eval runs in this process."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'mc-retrofit[harness]')")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from mc_retrofit import MCError  # noqa: E402
from mc_retrofit.eval.forward import token_nll  # noqa: E402
from mc_retrofit.harness.lm import MCLM, UNBOUNDED  # noqa: E402

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be "
        "in want of a wife. The pass key is 4821. Remember it. ") * 12
EMMA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "gutenberg" / "austen-emma.txt"


def _tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    fast.save_pretrained(folder)
    return fast


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-bpe")
    tok = _tokenizer(folder)
    model = tiny_model("mamba2", vocab_size=len(tok), eos_token_id=tok.eos_token_id)
    model.save_pretrained(folder)
    return folder


def _rolling(lm, texts):
    return lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)],
                                    disable_tqdm=True)


def test_rolling_loglikelihood_equals_the_projects_own_nll(ckpt):
    lm = MCLM(str(ckpt), segment_size=16, device="cpu")
    assert lm.max_length == UNBOUNDED  # a recurrent model: never lm-eval's 2048 default
    texts = [TEXT[:300], TEXT[100:700]]
    got = _rolling(lm, texts)
    for text, value in zip(texts, got):
        ids = torch.tensor([[lm.prefix_token_id, *lm.tok_encode(text)]])
        want = -float(token_nll(lm.model, ids).sum())  # the same MC model, the project's scorer
        assert abs(value - want) <= 1e-4
    assert lm.model.mc.config.segment_size == 16


def test_mc_off_equals_lm_evals_own_hf_model_exactly(tmp_path):
    """RWKV-4: lm-eval's hf model loads through AutoModelForCausalLM, which fla (once imported)
    points at its own Mamba/Mamba2 classes; RWKV-4 is transformers' alone."""
    tok = _tokenizer(tmp_path)
    tiny_model("rwkv4", vocab_size=len(tok)).save_pretrained(tmp_path)
    ours = MCLM(str(tmp_path), mc="off", device="cpu")
    # lm-eval reads RWKV's training context (128) as a hard limit; a recurrent model has none
    theirs = HFLM(pretrained=str(tmp_path), device="cpu", dtype="float32", max_length=ours.max_length)
    assert type(ours.model) is type(theirs.model) and ours.max_length == UNBOUNDED
    texts = [TEXT[:400], TEXT[50:260]]
    assert _rolling(ours, texts) == _rolling(theirs, texts)
    reqs = [Instance("loglikelihood", {}, ("The pass key is", " 4821"), 0)]
    assert ours.loglikelihood(reqs, disable_tqdm=True) == theirs.loglikelihood(reqs, disable_tqdm=True)


def test_the_online_bias_key_reaches_the_gates(ckpt):
    from mc_retrofit.model import gate_modules

    gates = gate_modules(MCLM(str(ckpt), segment_size=16, online_bias=1.5, device="cpu").model).values()
    assert gates and all(bool((g.online_bias == 1.5).all()) for g in gates)


def test_mc_changes_the_scores_when_caches_are_read(ckpt):
    """The MC model is really the one scored (a cached segment is read: the numbers move)."""
    base = _rolling(MCLM(str(ckpt), mc="off", device="cpu"), [TEXT[:600]])[0]
    mc = _rolling(MCLM(str(ckpt), segment_size=8, aggregation="residual", device="cpu"), [TEXT[:600]])[0]
    assert abs(mc - base) > 1e-3


def test_a_prompt_longer_than_max_length_is_reported(ckpt, caplog):
    lm = MCLM(str(ckpt), max_length=32, device="cpu")
    with caplog.at_level(logging.WARNING):
        lm.loglikelihood([Instance("loglikelihood", {}, (TEXT[:400], " 4821"), 0)], disable_tqdm=True)
    assert "exceeds model's maximum length (32)" in caplog.text


@pytest.mark.parametrize("args, message", [
    ({"colour": "red"}, "model_args key 'colour' is not one mc-retrofit takes"),
    ({"aggregation": "mean"}, "aggregation must be one of"),
    ({"segment_size": 0}, "segment_size must be a positive integer"),
    ({"mc": "maybe"}, "mc takes on or off"),
    ({"mc": "off", "segment_size": 8}, "mc=off evaluates the base model"),
])
def test_bad_model_args_are_one_line(ckpt, args, message):
    with pytest.raises(MCError, match=message):
        MCLM(str(ckpt), device="cpu", **args)


def test_a_byte_level_model_without_a_tokenizer_is_refused(tmp_path):
    tiny_model("mamba2", vocab_size=256).save_pretrained(tmp_path)
    with pytest.raises(MCError, match="ships no tokenizer"):
        MCLM(str(tmp_path), device="cpu")


def _tasks(folder: Path) -> Path:
    """A loglikelihood_rolling task over an evaluation-only book's paragraphs and a pass-key
    generation task, from local JSONL files."""
    folder.mkdir()
    book = EMMA.read_text()[5000:9000] if EMMA.is_file() else TEXT
    (folder / "docs.jsonl").write_text("".join(json.dumps({"text": book[i:i + 500]}) + "\n" for i in range(0, 1500, 500)))
    (folder / "keys.jsonl").write_text("".join(
        json.dumps({"prompt": f"The pass key is {k}. Remember it. What is the pass key? The pass key is",
                    "answer": f" {k}"}) + "\n" for k in (4821, 1234)))
    for name, body in {
        "mc_rolling": f"""task: mc_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'docs.jsonl'}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
""",
        "mc_passkey": f"""task: mc_passkey
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'keys.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
""",
    }.items():
        (folder / f"{name}.yaml").write_text(body)
    return folder


def test_cli_compare_runs_lm_eval_twice_and_writes_one_table(ckpt, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from mc_retrofit.cli import main

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks = _tasks(tmp_path / "tasks")
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["lm-eval", "--compare", "--model", "mc-retrofit", "--model_args",
                                  f"pretrained={ckpt},segment_size=16", "--tasks", "mc_rolling,mc_passkey",
                                  "--include_path", str(tasks), "--device", "cpu", "--batch_size", "2",
                                  "--output_path", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    table = (out / "compare.md").read_text()
    assert "| mc_rolling | bits_per_byte |" in table and "| mc_passkey | exact_match |" in table
    base = json.loads(next((out / "base").rglob("results_*.json")).read_text())
    mc = json.loads(next((out / "mc").rglob("results_*.json")).read_text())
    assert base["config"]["model_args"]["mc"] == "base" and "mc" not in mc["config"]["model_args"]
    b, m = base["results"]["mc_rolling"]["bits_per_byte,none"], mc["results"]["mc_rolling"]["bits_per_byte,none"]
    assert f"{m - b:+.4f}" in table
    again = CliRunner().invoke(main, ["lm-eval", "--compare", "--model", "mc-retrofit", "--output_path", str(out)])
    assert again.exit_code == 1 and "compare.md exists" in again.output  # never replaced, nothing run
    assert (out / "compare.md").read_text() == table


def _generate(lm, prompts):
    reqs = [Instance("generate_until", {}, (p, {"until": ["."], "max_gen_toks": 5, "do_sample": False}), i)
            for i, p in enumerate(prompts)]
    return lm.generate_until(reqs, disable_tqdm=True)


PROMPTS = ["The pass key is 4821. Remember it. The pass key is", "It is a truth", "a single man in possession of"]


def test_generation_batches_are_left_padded_where_the_family_takes_padding(ckpt):
    """Mamba2 takes left padding under MC: a batch of 3 generates what each prompt does alone."""
    batched = MCLM(str(ckpt), segment_size=4, device="cpu", batch_size=3)
    alone = MCLM(str(ckpt), segment_size=4, device="cpu", batch_size=1)
    assert batched.supports_padding
    assert _generate(batched, PROMPTS) == _generate(alone, PROMPTS)


def test_a_family_without_padding_generates_one_prompt_at_a_time(tmp_path, caplog):
    tok = _tokenizer(tmp_path)
    tiny_model("rwkv4", vocab_size=len(tok)).save_pretrained(tmp_path)
    lm = MCLM(str(tmp_path), segment_size=4, device="cpu", batch_size=3)
    assert not lm.supports_padding
    with caplog.at_level(logging.WARNING, logger="mc_retrofit.harness"):
        got = _generate(lm, PROMPTS)
    assert "generate_until runs with batch size 1" in caplog.text and lm.batch_size_per_gpu == 3
    assert got == _generate(MCLM(str(tmp_path), segment_size=4, device="cpu", batch_size=1), PROMPTS)

"""One data path through the commands: finetune, eval and generate on a tokenized model (a
BPE trained here, a tiny Mamba2 of its vocabulary), the byte path unchanged, and the
refusals (bytes as token ids, missing text columns, evaluation-only text)."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import mc_retrofit as mr
from mc_retrofit.cli import main
from mc_retrofit.errors import MCError
from mc_retrofit.finetune import finetune
from mc_retrofit.finetune import loop as finetune_loop
from mc_retrofit.finetune.data import WindowSampler, split_heldout

from conftest import count_calls, tiny_model
from data_fixtures import model_dir, text, tok_dir, token_cache, tokenizer  # noqa: F401
from test_data_sources import eval_only_excerpt, fake_stream

TUNE = ["--steps", "3", "--seq-len", "40", "--batch", "2", "--warmup", "1", "--eval-every", "0",
        "--segment-size", "8"]


def _one_line_error(result):
    assert result.exit_code == 1, result.output
    lines = [x for x in result.output.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


def _windows_seen(monkeypatch) -> list[torch.Tensor]:
    """The windows every training step ran on."""
    seen, original = [], finetune_loop.window_loss_and_backward

    def spy(model, windows, *args, **kwargs):
        seen.append(windows.detach().cpu().clone())
        return original(model, windows, *args, **kwargs)

    monkeypatch.setattr(finetune_loop, "window_loss_and_backward", spy)
    return seen


def _packed(tokenizer, docs):
    out = []
    for i, d in enumerate(docs):
        out += ([tokenizer.eos_token_id] if i else []) + tokenizer(d).input_ids
    return torch.tensor(out)


def _is_slice(window: torch.Tensor, stream: torch.Tensor) -> bool:
    return bool((stream.unfold(0, len(window), 1) == window).all(1).any())


def test_finetune_trains_a_tokenized_model_on_its_tokens(model_dir, tokenizer, text, tmp_path, monkeypatch):
    docs = text.split("\n\n")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    seen = _windows_seen(monkeypatch)
    calls = count_calls(monkeypatch, type(tokenizer), "__call__")
    r = CliRunner().invoke(main, ["finetune", str(model_dir), "--data", str(tmp_path / "d.jsonl"), "--text-field",
                                  "body", "--out", str(tmp_path / "o"), *TUNE])
    assert r.exit_code == 0, r.output
    assert "nats/token" in r.output and "nats/byte" not in r.output
    stream = _packed(tokenizer, docs)  # the tokenizer's own ids, joined by its EOS
    train = split_heldout(stream, 40, 0.05, "token")[0]
    assert len(seen) == 3 and all(w.shape == (2, 41) for w in seen)
    assert all(_is_slice(row, train) for w in seen for row in w)  # windows of exactly the packed stream
    assert int(max(w.max() for w in seen)) >= 256  # real token ids, not bytes
    n_calls = len(calls)
    assert n_calls >= 1
    r = CliRunner().invoke(main, ["finetune", str(model_dir), "--data", str(tmp_path / "d.jsonl"), "--text-field",
                                  "body", "--out", str(tmp_path / "o2"), *TUNE])
    assert r.exit_code == 0, r.output
    assert len(calls) == n_calls, "the second run must take the tokens from the cache"
    assert all(torch.equal(a, b) for a, b in zip(seen[:3], seen[3:]))  # same seed, same windows
    assert mr.load(tmp_path / "o2").config.vocab_size == len(tokenizer)


def test_a_byte_level_checkpoint_trains_on_bytes_exactly_as_before(tmp_path, monkeypatch):
    base = tmp_path / "byte"
    tiny_model("mamba2", vocab_size=256).save_pretrained(str(base))
    data = ("The key is 40317. Remember it. " * 30 + "Filler between the facts. " * 30).encode()
    (tmp_path / "t.txt").write_bytes(data)
    seen = _windows_seen(monkeypatch)
    r = CliRunner().invoke(main, ["finetune", str(base), "--data", str(tmp_path / "t.txt"), "--out",
                                  str(tmp_path / "o"), "--seed", "3", *TUNE])
    assert r.exit_code == 0, r.output
    assert "nats/byte" in r.output
    # the sampler of the old byte path, on the file's bytes themselves
    train = split_heldout(data, 40, 0.05)[0]
    assert torch.equal(train, torch.tensor(list(data[: len(train)])))
    sampler = WindowSampler(train, 2, 40, torch.Generator().manual_seed(3))
    assert all(torch.equal(w, sampler.next()[0]) for w in seen)


def test_bytes_as_token_ids_are_impossible(tmp_path, text):
    bare = tmp_path / "bare"
    tiny_model("mamba2", vocab_size=384).save_pretrained(str(bare))  # no tokenizer files
    (tmp_path / "t.txt").write_text(text)
    r = CliRunner().invoke(main, ["finetune", str(bare), "--data", str(tmp_path / "t.txt"), "--out",
                                  str(tmp_path / "o"), *TUNE])
    assert "384-token vocabulary and no tokenizer files" in _one_line_error(r)
    assert not (tmp_path / "o").exists()
    model = mr.convert(tiny_model("mamba2", vocab_size=384), mr.MCConfig(segment_size=8, gate_source="learned"))
    with pytest.raises(MCError, match="no tokenizer files"):  # the library call too
        finetune(model, text.encode(), steps=1, seq_len=40, progress=False, log=lambda s: None)
    r = CliRunner().invoke(main, ["generate", str(bare), "--prompt", "the river", "--max-new-tokens", "2"])
    assert "no tokenizer files" in _one_line_error(r)


def test_tokenizer_option_and_its_vocabulary_check(tmp_path, tok_dir, tokenizer, text, monkeypatch):
    bare = tmp_path / "bare"
    tiny_model("mamba2", vocab_size=len(tokenizer)).save_pretrained(str(bare))
    (tmp_path / "t.txt").write_text(text)
    seen = _windows_seen(monkeypatch)
    r = CliRunner().invoke(main, ["finetune", str(bare), "--data", str(tmp_path / "t.txt"), "--tokenizer",
                                  str(tok_dir), "--out", str(tmp_path / "o"), *TUNE])
    assert r.exit_code == 0, r.output
    train = split_heldout(torch.tensor(tokenizer(text.replace("\r", "")).input_ids), 40, 0.05)[0]
    assert all(_is_slice(row, train) for w in seen for row in w)
    # the tokenizer the gates were tuned with goes with them: eval/generate need no --tokenizer
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(tmp_path / "o"))(text).input_ids == tokenizer(text).input_ids
    r = CliRunner().invoke(main, ["generate", str(tmp_path / "o"), "--prompt", "the river", "--max-new-tokens", "2"])
    assert r.exit_code == 0, r.output
    small = tmp_path / "small"
    tiny_model("mamba2", vocab_size=300).save_pretrained(str(small))
    r = CliRunner().invoke(main, ["finetune", str(small), "--data", str(tmp_path / "t.txt"), "--tokenizer",
                                  str(tok_dir), "--out", str(tmp_path / "o3"), *TUNE])
    assert "not this model's tokenizer" in _one_line_error(r)


def test_streamed_and_saved_datasets_and_their_errors(model_dir, tokenizer, text, tmp_path, monkeypatch):
    from datasets import Dataset

    docs = text.split("\n\n")
    calls = []
    fake_stream(monkeypatch, [{"text": d} for d in docs * 50], calls)
    seen = _windows_seen(monkeypatch)
    r = CliRunner().invoke(main, ["finetune", str(model_dir), "--data", "hf:org/books", "--out", str(tmp_path / "o"),
                                  *TUNE])
    assert r.exit_code == 0, r.output
    assert calls == [("org/books", None, "train", True)]
    budget = -(-3 * 2 * 41 * 100 // 95) + 2 * 41  # steps x batch x (seq-len + 1), held-out share, two windows
    n = next(k for k in range(1, len(docs) * 50) if sum(len(tokenizer(d).input_ids) for d in (docs * 50)[:k]) >= budget)
    stream = _packed(tokenizer, (docs * 50)[:n])  # only the documents that reach the budget
    train = split_heldout(stream, 40, 0.05)[0]
    assert all(_is_slice(row, train) for w in seen for row in w)
    Dataset.from_dict({"content": docs}).save_to_disk(str(tmp_path / "ds"))
    r = CliRunner().invoke(main, ["finetune", str(model_dir), "--data", str(tmp_path / "ds"), "--out",
                                  str(tmp_path / "o2"), *TUNE])
    assert "has columns content, not 'text' (use --text-field)" in _one_line_error(r)
    r = CliRunner().invoke(main, ["finetune", str(model_dir), "--data", str(tmp_path / "ds"), "--text-field", "content",
                                  "--out", str(tmp_path / "o2"), *TUNE])
    assert r.exit_code == 0, r.output


def test_eval_only_text_is_refused_before_any_weight_loads(model_dir, tmp_path, monkeypatch):
    from datasets import Dataset

    book = eval_only_excerpt()
    loads = count_calls(monkeypatch, mr.model, "load_base")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": book}) + "\n")
    Dataset.from_dict({"text": [book]}).save_to_disk(str(tmp_path / "ds"))
    for data in (tmp_path / "a.jsonl", tmp_path / "ds"):
        r = CliRunner().invoke(main, ["finetune", str(model_dir), "--data", str(data), "--out", str(tmp_path / "o"),
                                      *TUNE])
        assert "evaluation-only book austen-emma.txt" in _one_line_error(r)
    assert loads == [] and not (tmp_path / "o").exists()


def test_mix_rows_on_a_tokenized_model(model_dir, tokenizer, text, tmp_path, monkeypatch):
    (tmp_path / "t.txt").write_text(text)
    seen = _windows_seen(monkeypatch)
    r = CliRunner().invoke(main, ["finetune", str(model_dir), "--data", str(tmp_path / "t.txt"), "--mix",
                                  "text=0.5,passkey=0.5", "--mix-rows", "8", "--out", str(tmp_path / "o"),
                                  "--steps", "2", "--seq-len", "160", "--batch", "2", "--warmup", "1",
                                  "--eval-every", "0", "--segment-size", "8"])
    assert r.exit_code == 0, r.output
    assert "nats/token" in r.output
    ids = seen[0][:, 0]
    assert seen[0].shape == (2, 2, 161) and int(ids.max()) >= 256  # the tokenizer's ids, not bytes


def test_eval_and_generate_use_the_same_tokens(model_dir, tokenizer, text, tmp_path, monkeypatch):
    from transformers import Mamba2ForCausalLM

    docs = [text] * 3  # long enough for the smoke recipe's 512-token windows
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    r = CliRunner().invoke(main, ["eval", str(model_dir), "--recipe", "smoke", "--data", str(tmp_path / "d.jsonl"),
                                  "--only", "perplexity", "--out", str(tmp_path / "e"), "--quiet", "--no-plots"])
    assert r.exit_code == 0, r.output
    results = json.loads((tmp_path / "e" / "results.json").read_text())
    assert results["tokenizer"] == str(model_dir)
    calls = count_calls(monkeypatch, type(tokenizer), "__call__")
    r = CliRunner().invoke(main, ["eval", str(model_dir), "--recipe", "smoke", "--data", str(tmp_path / "d.jsonl"),
                                  "--only", "perplexity", "--out", str(tmp_path / "e2"), "--quiet", "--no-plots"])
    assert r.exit_code == 0, r.output
    assert calls == []  # eval's documents come from the same token cache
    results2 = json.loads((tmp_path / "e2" / "results.json").read_text())
    assert results2["perplexity"] == results["perplexity"]

    prompt = "The river ran past a quiet house"
    model = Mamba2ForCausalLM.from_pretrained(str(model_dir)).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             pad_token_id=0)
    expected = tokenizer.decode(out[0, ids.shape[1]:])
    r = CliRunner().invoke(main, ["generate", str(model_dir), "--prompt", prompt, "--max-new-tokens", "6",
                                  "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == expected.strip()


def test_the_library_call_reads_with_the_models_own_tokenizer(model_dir, tokenizer, text, tmp_path, monkeypatch):
    (tmp_path / "t.txt").write_text(text)
    model = mr.convert(mr.load_base(model_dir), mr.MCConfig(segment_size=8, gate_source="learned"))
    seen = _windows_seen(monkeypatch)
    result = finetune(model, tmp_path / "t.txt", steps=2, seq_len=40, batch=2, warmup=1, eval_every=0,
                      progress=False, log=lambda s: None)
    assert result["unit"] == "token" and len(seen) == 2
    train = split_heldout(torch.tensor(tokenizer(text).input_ids), 40, 0.05)[0]
    assert all(_is_slice(row, train) for w in seen for row in w)

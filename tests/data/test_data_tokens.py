"""mc_retrofit.data.tokens: documents tokenized once (the tokenizer's own ids), cached on
disk and never trusted blindly, and packed into one stream joined by EOS."""
from __future__ import annotations

import json

import torch

from mc_retrofit.data import Codec, codec_for, load_corpus, pack, tokenize
from mc_retrofit.data.tokens import cache_file, cache_key

from conftest import count_calls
from data_fixtures import model_dir, text, tok_dir, token_cache, tokenizer  # noqa: F401


def _codec(tok_dir):
    return codec_for(None, 384, str(tok_dir))


def test_ids_are_the_tokenizers_and_the_stream_joins_them_with_eos(tmp_path, tok_dir, tokenizer, text):
    docs = text.split("\n\n")[:6]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    corpus = load_corpus(tmp_path / "d.jsonl", _codec(tok_dir), training=True)
    assert [x.tolist() for x in corpus.ids] == [tokenizer(d).input_ids for d in docs]
    expected = []
    for i, d in enumerate(docs):
        expected += ([tokenizer.eos_token_id] if i else []) + tokenizer(d).input_ids
    assert corpus.stream.tolist() == expected and corpus.n_tokens == len(expected) - (len(docs) - 1)


def test_without_eos_documents_are_joined_by_a_blank_line(tok_dir, text):
    from data_fixtures import train_tokenizer

    tok = train_tokenizer(text, eos=False)
    codec = Codec(tok, "no-eos")
    a, b = torch.tensor(tok("one").input_ids), torch.tensor(tok("two").input_ids)
    assert pack([a, b], codec).tolist() == tok("one").input_ids + tok("\n\n").input_ids + tok("two").input_ids


def test_the_cache_is_reused_and_keyed_by_tokenizer_and_documents(tok_dir, tokenizer, monkeypatch, token_cache, text):
    codec = _codec(tok_dir)
    docs = text.split("\n\n")[:8]
    calls = count_calls(monkeypatch, type(tokenizer), "__call__")
    first = tokenize(docs, codec)
    assert len(calls) == 1 and cache_file(cache_key(codec, docs)).is_file()
    second = tokenize(docs, _codec(tok_dir))  # another process would load the tokenizer anew
    assert len(calls) == 1, "the second run must not call the tokenizer"
    assert [x.tolist() for x in second] == [x.tolist() for x in first] == [tokenizer(d).input_ids for d in docs]
    assert cache_key(codec, docs[:-1]) != cache_key(codec, docs)
    assert cache_key(codec, ["ab", "c"]) != cache_key(codec, ["a", "bc"])  # documents cannot run into each other
    assert str(token_cache) in str(cache_file(cache_key(codec, docs)))


def test_a_damaged_cache_file_is_rebuilt(tok_dir, tokenizer, monkeypatch, text):
    from safetensors.torch import load_file, save_file

    codec = _codec(tok_dir)
    docs = text.split("\n\n")[:4]
    want = [tokenizer(d).input_ids for d in docs]
    tokenize(docs, codec)
    path = cache_file(cache_key(codec, docs))
    calls = count_calls(monkeypatch, type(tokenizer), "__call__")
    good = path.read_bytes()
    tensors = {k: v.clone() for k, v in load_file(str(path)).items()}  # not a view of the file
    forged = tensors["ids"].clone()
    forged[0] += 1
    damages = [good[: len(good) // 2], b"not a safetensors file"]
    for i, damage in enumerate(damages):
        path.write_bytes(damage)
        assert [x.tolist() for x in tokenize(docs, codec)] == want
        rewritten = load_file(str(path))  # rebuilt and rewritten
        assert len(calls) == i + 1 and all(torch.equal(rewritten[k], tensors[k]) for k in tensors)
    # a well-formed file whose ids were edited (the recorded hash no longer matches)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    save_file({"ids": forged, "offsets": tensors["offsets"]}, str(path), metadata=meta)
    assert [x.tolist() for x in tokenize(docs, codec)] == want and len(calls) == 3


def test_bytes_are_never_cached(token_cache, text):
    ids = tokenize(["héllo", "x"], Codec())
    assert [x.tolist() for x in ids] == [list("héllo".encode()), [120]] and not token_cache.exists()
    assert pack(ids, Codec()).tolist() == list("héllo\n\nx".encode())  # as read_texts joins .txt files


def test_max_tokens_keeps_the_documents_that_reach_it(tmp_path, tok_dir, tokenizer, text):
    docs = text.split("\n\n")[:10]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    lens = [len(tokenizer(d).input_ids) for d in docs]
    corpus = load_corpus(tmp_path / "d.jsonl", _codec(tok_dir), training=True, max_tokens=lens[0] + 1)
    assert corpus.texts == docs[:2]

"""mc_retrofit.data.codec: which ids a model's text gets (its tokenizer, --tokenizer, bytes),
and the refusals that make bytes-as-token-ids impossible."""
from __future__ import annotations

import pytest

from mc_retrofit.data import Codec, codec_for
from mc_retrofit.errors import MCError

from data_fixtures import model_dir, text, tok_dir, token_cache, tokenizer  # noqa: F401


def test_the_checkpoints_own_tokenizer_gives_the_tokenizers_own_ids(model_dir, tokenizer, text):
    codec = codec_for(model_dir, len(tokenizer))
    assert not codec.byte_level and codec.unit == "token" and codec.eos_id == tokenizer.eos_token_id
    assert codec.encode(text) == tokenizer(text).input_ids
    docs = text.split("\n\n")[:5]
    assert codec.encode_many(docs) == [tokenizer(d).input_ids for d in docs]
    assert codec.decode(codec.encode(docs[0])) == docs[0]  # byte-level BPE round trip


def test_bytes_only_for_a_256_entry_vocabulary_without_tokenizer(tmp_path):
    codec = codec_for(tmp_path, 256)
    assert codec.byte_level and codec.unit == "byte" and codec.encode("hé") == [104, 195, 169]
    for vocab in (64, 384, 50_000):  # bytes as ids would be silently wrong: refused
        with pytest.raises(MCError, match=f"{vocab}-token vocabulary and no tokenizer files.*--tokenizer"):
            codec_for(tmp_path, vocab)
    with pytest.raises(MCError, match="--tokenizer EleutherAI/gpt-neox-20b"):
        codec_for(None, 50_280, hint="EleutherAI/gpt-neox-20b")


def test_explicit_bytes_is_refused_when_the_checkpoint_ships_a_tokenizer(model_dir, tmp_path):
    with pytest.raises(MCError, match="ships a tokenizer"):
        codec_for(model_dir, 384, "bytes")
    assert codec_for(tmp_path, 260, "bytes").byte_level  # 256 bytes + specials, no tokenizer: the user's call


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tok_dir, tokenizer):
    with pytest.raises(MCError, match=f"has {len(tokenizer)} tokens but the model's vocabulary has 300"):
        codec_for(None, 300, str(tok_dir))
    assert codec_for(None, len(tokenizer) + 16, str(tok_dir)).tokenizer is not None  # padded embeddings: fine


def test_a_hub_id_goes_through_resolve_tokenizer(tok_dir, tokenizer, monkeypatch):
    import mc_retrofit.hub as hub

    asked = []
    monkeypatch.setattr(hub, "resolve_tokenizer", lambda spec, revision=None, cache_dir=None:
                        asked.append((spec, cache_dir)) or tok_dir)
    codec = codec_for(None, len(tokenizer), "org/tok", cache_dir="/c")
    assert asked == [("org/tok", "/c")] and codec.encode("the river") == tokenizer("the river").input_ids


def test_identity_is_the_tokenizers_content(tok_dir, tmp_path, text):
    from data_fixtures import train_tokenizer

    a, b = codec_for(None, 384, str(tok_dir)), codec_for(None, 384, str(tok_dir))
    assert a.identity == b.identity and len(a.identity) == 64
    other = tmp_path / "other"
    train_tokenizer(text[: len(text) // 2], vocab_size=320).save_pretrained(str(other))
    assert codec_for(None, 384, str(other)).identity != a.identity
    assert Codec().identity is None

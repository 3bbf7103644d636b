"""Fixtures of the data tests (imported by each test module): a byte-level BPE trained here
(``tokenizers``) on text written here, wrapped as a ``PreTrainedTokenizerFast`` and saved
beside a tiny Mamba2 of its size."""
from __future__ import annotations

import random

import pytest

WORDS = ("the", "river", "ran", "past", "a", "quiet", "house", "where", "Elinor", "kept", "her", "letters",
         "and", "Marianne", "played", "every", "evening", "while", "rain", "fell", "on", "old", "garden",
         "walls", "of", "Norland", "cottage", "with", "sense", "feeling", "money", "sister")


def written_text(n_paragraphs: int = 40, seed: int = 0) -> str:
    """Paragraphs of plausible words (nothing from any book), deterministic."""
    rng = random.Random(seed)
    paras = []
    for _ in range(n_paragraphs):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "."
                     for _ in range(rng.randint(2, 4))]
        paras.append(" ".join(sentences))
    return "\n\n".join(paras) + "\n"


def train_tokenizer(text: str, vocab_size: int = 384, eos: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"] if eos else [],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **({"eos_token": "<eos>"} if eos else {}))


@pytest.fixture(scope="session")
def text() -> str:
    return written_text()


@pytest.fixture(scope="session")
def tokenizer(text):
    return train_tokenizer(text)


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("tok")
    tokenizer.save_pretrained(str(d))
    return d


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer):
    """A tiny Mamba2 whose vocabulary is the tokenizer's, with the tokenizer's files."""
    from conftest import tiny_model

    d = tmp_path_factory.mktemp("tokmodel")
    tiny_model("mamba2", vocab_size=len(tokenizer)).save_pretrained(str(d))
    tokenizer.save_pretrained(str(d))
    return d


@pytest.fixture(autouse=True)
def token_cache(tmp_path, monkeypatch):
    """Every test its own token cache (never the user's ~/.cache)."""
    monkeypatch.setenv("MC_RETROFIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"

"""mc_retrofit.data.sources: documents from .txt, .jsonl, saved and streamed datasets; the
evaluation-only books refused in every form."""
from __future__ import annotations

import json

import pytest

from mc_retrofit.data import iter_texts, load_texts
from mc_retrofit.errors import MCError

from data_fixtures import token_cache  # noqa: F401

DOCS = ["first document.", "second one,\nwith two lines.", "third"]


def eval_only_excerpt() -> str:
    from conftest import shared_path

    data = shared_path("data", "gutenberg", "austen-emma.txt").read_bytes()
    return data[20_000:60_000].decode("utf-8", "replace")


def fake_stream(monkeypatch, rows, calls=None):
    """``datasets.load_dataset`` as the Hub would answer it, offline: an IterableDataset."""
    import datasets

    def load_dataset(name, config=None, split=None, streaming=False):
        if calls is not None:
            calls.append((name, config, split, streaming))
        assert streaming, "Hub datasets must be streamed"
        return datasets.IterableDataset.from_generator(lambda: iter(rows))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)


def test_jsonl_and_saved_datasets(tmp_path):
    from datasets import Dataset, DatasetDict

    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in DOCS))
    assert [t for _, t in load_texts(tmp_path / "a.jsonl", "body", training=True)] == DOCS
    DatasetDict({"train": Dataset.from_dict({"text": DOCS}), "test": Dataset.from_dict({"text": ["x"]})}) \
        .save_to_disk(str(tmp_path / "dd"))
    assert [t for _, t in load_texts(tmp_path / "dd", training=True)] == DOCS  # tuning defaults to train
    assert [t for _, t in load_texts(tmp_path / "dd")] == ["x"]  # evaluation to test
    assert [t for _, t in load_texts(tmp_path / "dd", split="test", training=True)] == ["x"]
    DatasetDict({"test": Dataset.from_dict({"text": DOCS})}).save_to_disk(str(tmp_path / "only-test"))
    with pytest.raises(MCError, match="no 'train': choose one with --split"):
        load_texts(tmp_path / "only-test", training=True)


def test_a_missing_text_column_is_one_line(tmp_path, monkeypatch):
    from datasets import Dataset

    Dataset.from_dict({"content": DOCS}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(MCError, match=r"has columns content, not 'text' \(use --text-field\)"):
        load_texts(tmp_path / "ds", training=True)
    fake_stream(monkeypatch, [{"content": d} for d in DOCS])
    with pytest.raises(MCError, match=r"has columns content, not 'text' \(use --text-field\)"):
        next(iter_texts("hf:org/data", training=True))


def test_a_stream_is_read_lazily_and_only_as_far_as_needed(monkeypatch):
    pulled, calls = [], []

    def rows():
        for i in range(1000):
            pulled.append(i)
            yield {"text": f"document {i} " * 10}

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None, split=None, streaming=False:
                        calls.append((name, config, split, streaming)) or datasets.IterableDataset.from_generator(rows))
    docs = load_texts("hf:org/data:cfg", training=True, max_chars=500)
    assert calls == [("org/data", "cfg", "train", True)]
    assert sum(len(t) for _, t in docs[:-1]) < 500 <= sum(len(t) for _, t in docs)
    assert len(pulled) < 50  # not the whole stream
    with pytest.raises(MCError, match="needs a budget"):
        load_texts("hf:org/data")


def test_eval_only_text_is_refused_in_every_form(tmp_path, monkeypatch):
    from datasets import Dataset

    book = eval_only_excerpt()
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": book}) + "\n")
    with pytest.raises(MCError, match="a.jsonl:2 contains text of the evaluation-only book austen-emma.txt"):
        load_texts(tmp_path / "a.jsonl", training=True)
    Dataset.from_dict({"text": ["fine", book]}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(MCError, match=r"ds\[1\] contains text of the evaluation-only book"):
        load_texts(tmp_path / "ds", training=True)
    fake_stream(monkeypatch, [{"text": "fine"}, {"text": book}])
    with pytest.raises(MCError, match=r"org/data\[1\] contains text of the evaluation-only book"):
        load_texts("hf:org/data", training=True, max_chars=10**9)
    (tmp_path / "renamed.txt").write_text(book)
    with pytest.raises(MCError, match="evaluation-only book"):
        load_texts(tmp_path / "renamed.txt", training=True)
    assert load_texts(tmp_path / "a.jsonl")[1][1] == book  # evaluation reads them: that is what they are for


def test_eval_reads_a_streamed_dataset_through_the_same_loader(monkeypatch):
    from mc_retrofit.eval.text import load_texts as eval_load_texts

    calls = []
    fake_stream(monkeypatch, [{"text": d} for d in DOCS], calls)
    assert [t for _, t in eval_load_texts("hf:org/data", split="validation")] == DOCS
    assert calls == [("org/data", None, "validation", True)]

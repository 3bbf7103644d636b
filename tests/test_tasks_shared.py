"""One text loader and one answer scorer (``mc_retrofit.tasks``), shared by fine-tuning,
evaluation and the recipes: they read the same files in the same order, and score an
answer the same way, checked against plain-Python oracles."""
from __future__ import annotations

import math

import torch

from mc_retrofit import tasks
from mc_retrofit.eval.text import load_texts
from mc_retrofit.finetune.data import read_texts


def test_training_evaluation_and_recipes_read_the_same_files(tmp_path):
    docs = {"b.txt": b"second line\r\nwith a windows newline\r\n", "a.txt": b"first \xff book\n",
            "austen-emma.txt": b"not really emma, but named like an evaluation-only book\n"}
    for name, data in docs.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "notes.md").write_text("not a .txt file")
    train = [docs["a.txt"], docs["b.txt"]]  # sorted by name, the evaluation-only name left out
    assert [p.name for p in tasks.text_files(tmp_path, "train")] == ["a.txt", "b.txt"]
    assert read_texts(tmp_path) == b"\n\n".join(train) == tasks.load_corpus("train", tmp_path)
    assert tasks.load_corpus("eval", tmp_path) == docs["austen-emma.txt"]
    assert tasks.read_documents(tmp_path / "b.txt") == [("b.txt", docs["b.txt"])]
    # evaluation reads every .txt as text mode would (bad bytes replaced, universal newlines)
    texts = load_texts(tmp_path)
    assert [n for n, _ in texts] == ["a.txt", "austen-emma.txt", "b.txt"]
    assert texts == [(n, (tmp_path / n).read_text(encoding="utf-8", errors="replace")) for n, _ in texts]


def test_one_answer_scorer_against_a_plain_oracle():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 7, generator=gen)  # [batch, answer positions, vocab]
    targets = torch.randint(0, 7, (3, 4), generator=gen)
    targets[0] = logits[0].argmax(-1)  # one answer entirely right
    hits = tasks.answer_hits(logits, targets)
    nll = tasks.answer_nll(logits, targets)
    for b in range(3):
        for a in range(4):
            row = logits[b, a].tolist()
            assert bool(hits[b, a]) == (max(range(7), key=row.__getitem__) == int(targets[b, a]))
        log_z = [math.log(sum(math.exp(x) for x in logits[b, a].tolist())) for a in range(4)]
        want = sum(log_z[a] - float(logits[b, a, targets[b, a]]) for a in range(4))
        assert abs(float(nll[b]) - want) < 1e-4
    assert hits[0].all() and hits.all(-1).tolist() == [bool(hits[b].all()) for b in range(3)]
    # MQAR recall is the same hits, averaged over the scored positions
    batch = tasks.MQARBatch(torch.zeros(3, 4, dtype=torch.long), targets, targets != -100)
    assert tasks.mqar_accuracy(logits, batch) == float(hits.float().mean())

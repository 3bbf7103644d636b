"""Recall-task items and scorer on hand-made models: one that always answers right must
score 1.0, one that never does 0.0, whatever the task, length or depth."""
from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from mc_retrofit import tasks
from mc_retrofit.eval import retrieval
from mc_retrofit.eval.text import Codec

HAYSTACK = (b"It was a bright cold day in April, and the clocks were striking thirteen. " * 80)


class _Out:
    def __init__(self, h):
        self.last_hidden_state = h


class PeekingLM(nn.Module):
    """A 'model' whose prediction at position t is ``ids[t+1] + offset`` (it reads the
    future): offset 0 always answers right, offset 1 never does."""

    def __init__(self, offset: int):
        super().__init__()
        self.offset = offset
        self.head = nn.Linear(256, 256, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(256))

    @property
    def base_model(self):
        def run(input_ids, use_cache=False):
            nxt = torch.roll(input_ids, -1, dims=1)
            return _Out(100.0 * nn.functional.one_hot((nxt + self.offset) % 256, 256).float())
        return run

    def get_output_embeddings(self):
        return self.head


BODIES = {
    "passkey": {"lengths": [200, 333], "depths": [0, 0.25, 0.5, 0.75, 1], "samples": 2},
    "multikey": {"lengths": [400], "depths": [0, 1], "samples": 3, "n_keys": 4},
    "variable_tracking": {"lengths": [300, 512], "samples": 3, "hops": 3, "n_chains": 2},
}


@pytest.mark.parametrize("task", list(BODIES))
@pytest.mark.parametrize("offset,expected", [(0, 1.0), (1, 0.0)])
def test_scorer_right_and_wrong_models(task, offset, expected):
    items = retrieval.make_items(task, BODIES[task], HAYSTACK, Codec(), seed=3)
    records = retrieval.score_items(PeekingLM(offset), items, "cpu", batch_size=3, variant="oracle")
    assert len(records) == len(items)
    summary = retrieval.summarise(records, task, ["oracle"])
    for row in summary["by_length"]["oracle"].values():
        assert row["accuracy"] == expected
    if offset == 0:  # a sure, right answer costs nothing
        assert all(abs(r["answer_nll"]) < 1e-3 for r in records)


def test_items_have_exact_lengths_and_answers_at_the_end():
    items = retrieval.make_items("passkey", BODIES["passkey"], HAYSTACK, Codec(), seed=0)
    assert len(items) == 2 * 5 * 2
    for it in items:
        assert len(it.ids) == it.length
        text = bytes(it.ids.tolist())
        answer = it.meta["answer"].encode()
        assert text.endswith(b"The pass key is " + answer)
        assert text.count(answer) == 3  # twice in the needle, once as the answer
        assert it.answer_len == len(answer) == 5


def test_depths_place_the_needle():
    body = {"lengths": [1000], "depths": [0, 0.5, 1], "samples": 1}
    items = retrieval.make_items("passkey", body, HAYSTACK, Codec(), seed=0)
    offsets = [it.meta["needle_offsets"][0] for it in items]
    assert offsets[0] == 0 and offsets[0] < offsets[1] < offsets[2]
    assert abs(offsets[1] - 0.5 * offsets[2]) < 2


def test_items_are_deterministic_and_seeded():
    a = retrieval.make_items("multikey", BODIES["multikey"], HAYSTACK, Codec(), seed=1)
    b = retrieval.make_items("multikey", BODIES["multikey"], HAYSTACK, Codec(), seed=1)
    c = retrieval.make_items("multikey", BODIES["multikey"], HAYSTACK, Codec(), seed=2)
    assert all(torch.equal(x.ids, y.ids) for x, y in zip(a, b))
    assert any(not torch.equal(x.ids, y.ids) for x, y in zip(a, c))


def test_scorer_agrees_with_tasks_score_logits():
    """answer_scores (head on the answer positions only) against tasks.score_logits on
    full logits of a real (tiny, random) causal LM."""
    from conftest import tiny_model

    from mc_retrofit.eval.forward import answer_scores

    model = tiny_model("mamba2", vocab_size=256)
    rng = random.Random(0)
    samples = [tasks.passkey_sample(HAYSTACK, 160, rng, depth=0.5, digits=1) for _ in range(3)]
    for s in samples:
        ids, _ = tasks.encode(s)
        with torch.no_grad():
            logits = model(input_ids=ids[None]).logits[0]
        correct, nll = answer_scores(model, ids[None], len(s.prompt), len(s.answer))
        assert float(correct[0]) == tasks.score_logits(logits, s)
        p, a = len(s.prompt), len(s.answer)
        want = -torch.log_softmax(logits[p - 1:p + a - 1], -1).gather(-1, ids[p:p + a, None]).sum()
        assert abs(float(nll[0]) - float(want)) < 1e-4

"""Task generators and scorers (mc_retrofit.tasks): every prompt is checked by an independent
solver (regular expressions over the text, a dict over the MQAR pairs), every scorer by
hand-made perfect and wrong answerers."""
from __future__ import annotations

import math
import random
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import shared_path
from mc_retrofit import tasks
from mc_retrofit.errors import MCError

HAY = (b"It was a bright cold day in April, and the clocks were striking thirteen. " * 200)


def solve_passkey(prompt: bytes) -> bytes:
    keys = set(re.findall(rb"The pass key is (\d+)\. Remember it\. (\d+) is the pass key\.", prompt))
    assert len(keys) == 1 and keys.pop()[0] is not None
    return re.search(rb"The pass key is (\d+)\. Remember", prompt).group(1)


def solve_multikey(prompt: bytes) -> bytes:
    table = dict(re.findall(rb"The pass key for (\w+) is (\d+)\. Remember it\.", prompt))
    name = re.search(rb"What is the pass key for (\w+)\? The pass key for \1 is $", prompt).group(1)
    return table[name]


def solve_vt(prompt: bytes) -> bytes:
    table = dict(re.findall(rb"Let (\w+) = (\w+)\.", prompt))
    name = re.search(rb"What is (\w+)\? \1 = $", prompt).group(1)
    while not table[name].isdigit():
        name = table[name]
    return table[name]


class TeacherForced(torch.nn.Module):
    """A 'model' whose logits put all mass on a chosen next byte: the true next byte
    (perfect), or the current byte (a wrong answerer)."""

    def __init__(self, perfect: bool):
        super().__init__()
        self.perfect = perfect

    def forward(self, input_ids):
        nxt = torch.roll(input_ids, -1, dims=1) if self.perfect else input_ids
        return type("Out", (), {"logits": torch.nn.functional.one_hot(nxt, 256).float() * 50})


@settings(max_examples=40, deadline=None)
@given(length=st.integers(104, 600), seed=st.integers(0, 10**6), depth=st.one_of(st.none(), st.floats(0, 1, allow_subnormal=False)))
def test_passkey_sample_is_exact_length_and_solvable(length, seed, depth):
    s = tasks.passkey_sample(HAY, length, seed, depth=depth)
    assert len(s.text) == length
    assert s.prompt.endswith(b" What is the pass key? The pass key is ")
    assert len(s.answer) == 5 and s.answer.isdigit()
    assert solve_passkey(s.prompt) == s.answer
    # Same seed, same sample.
    assert tasks.passkey_sample(HAY, length, seed, depth=depth).text == s.text


def test_passkey_depth_places_the_needle():
    first = tasks.passkey_sample(HAY, 400, 3, depth=0.0)
    last = tasks.passkey_sample(HAY, 400, 3, depth=1.0)
    assert first.prompt.startswith(b" The pass key is ")
    assert re.search(rb"is the pass key\.  What is the pass key\? The pass key is $", last.prompt)


def test_too_short_is_a_clear_error():
    with pytest.raises(MCError, match="too short"):
        tasks.passkey_sample(HAY, 50, 0)


@settings(max_examples=30, deadline=None)
@given(n_keys=st.integers(1, 8), seed=st.integers(0, 10**6))
def test_multikey_sample_is_solvable_and_distinct(n_keys, seed):
    s = tasks.multikey_sample(HAY, 70 * n_keys + 200, seed, n_keys=n_keys)
    assert len(s.text) == 70 * n_keys + 200
    table = dict(re.findall(rb"The pass key for (\w+) is (\d+)\.", s.prompt))
    assert len(table) == n_keys and len(set(table.values())) == n_keys
    assert solve_multikey(s.prompt) == s.answer


@settings(max_examples=30, deadline=None)
@given(hops=st.integers(1, 4), chains=st.integers(1, 3), seed=st.integers(0, 10**6))
def test_variable_tracking_is_solvable(hops, chains, seed):
    s = tasks.variable_tracking_sample(HAY, 30 * hops * chains + 200, seed, hops=hops, n_chains=chains)
    assert solve_vt(s.prompt) == s.answer
    assert len(re.findall(rb"Let (\w+) = (\d+)\.", s.prompt)) == chains  # one value per chain


def test_scorers_perfect_and_wrong():
    samples = [tasks.passkey_sample(HAY, 200, i) for i in range(3)] + [tasks.multikey_sample(HAY, 300, 9, n_keys=3)]
    assert tasks.text_accuracy(TeacherForced(True), samples) == 1.0
    assert tasks.text_accuracy(TeacherForced(False), samples) == 0.0
    s = samples[0]
    ids, mask = tasks.encode(s)
    assert mask.sum() == len(s.answer) and bytes(ids[1:][mask[:-1]].tolist()) == s.answer
    logits = torch.nn.functional.one_hot(torch.roll(ids, -1), 256).float()
    assert tasks.score_logits(logits, s) == 1.0
    logits[0] = 0  # a wrong prediction outside the answer does not matter
    assert tasks.score_logits(logits, s) == 1.0
    wrong = logits.clone()
    wrong[len(s.prompt) + 2] = torch.nn.functional.one_hot(torch.tensor(ord("x")), 256).float()  # last-but-one answer byte
    assert tasks.score_logits(wrong, s) == 0.0
    assert tasks.exact_match(s.answer.decode() + " and more", s) == 1.0
    assert tasks.exact_match(b"00000", s) == 0.0


def test_unigram_hand_computed():
    # train "aa": add-one counts a=3, every other byte 1, total 258.
    assert tasks.unigram_bits_per_byte(b"aa", b"a") == pytest.approx(-math.log2(3 / 258))
    assert tasks.unigram_bits_per_byte(b"aa", b"b") == pytest.approx(-math.log2(1 / 258))


def test_bits_per_byte_uniform_and_perfect():
    class Uniform(torch.nn.Module):
        def forward(self, input_ids):
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, 256)})

    rng = random.Random(0)
    data = bytes(rng.randrange(256) for _ in range(1000))
    assert tasks.bits_per_byte(Uniform(), data, window=100) == pytest.approx(8.0)
    assert tasks.bits_per_byte(TeacherForced(True), data, window=100) < 1e-3
    with pytest.raises(MCError):
        tasks.bits_per_byte(Uniform(), data[:50], window=100)


def oracle_mqar_logits(batch: tasks.MQARBatch, n_pairs: int, vocab: int) -> torch.Tensor:
    """Solve MQAR from the pairs at the start of each row (a dict per row)."""
    logits = torch.zeros(*batch.inputs.shape, vocab)
    for b in range(batch.inputs.shape[0]):
        row = batch.inputs[b].tolist()
        table = {row[2 * i]: row[2 * i + 1] for i in range(n_pairs)}
        for t in batch.mask[b].nonzero().flatten().tolist():
            logits[b, t, table[row[t]]] = 1.0
    return logits


@settings(max_examples=30, deadline=None)
@given(pairs=st.integers(1, 20), extra=st.integers(0, 100), seed=st.integers(0, 1000), noise=st.booleans(),
       shift=st.integers(0, 30))
def test_mqar_structure(pairs, extra, seed, noise, shift):
    vocab = 64
    start = 2 * pairs + shift
    seq_len = start + 2 * pairs + extra
    q = max(1, pairs // 2)
    b = tasks.mqar(3, seq_len, pairs, vocab_size=vocab, n_queries=q, seed=seed, random_non_queries=noise,
                   query_start=start)
    assert b.inputs.shape == b.targets.shape == b.mask.shape == (3, seq_len)
    assert (b.mask.sum(1) == q).all()
    assert (b.mask[:, :start] == False).all()  # noqa: E712
    keys, values = b.inputs[:, 0:2 * pairs:2], b.inputs[:, 1:2 * pairs:2]
    assert ((keys >= 1) & (keys < vocab // 2)).all() and ((values >= vocab // 2) & (values < vocab)).all()
    for row in keys:
        assert len(set(row.tolist())) == pairs
    assert tasks.mqar_accuracy(oracle_mqar_logits(b, pairs, vocab), b) == 1.0
    # Predicting the queried key itself is always wrong.
    assert tasks.mqar_accuracy(torch.nn.functional.one_hot(b.inputs, vocab).float(), b) == 0.0
    again = tasks.mqar(3, seq_len, pairs, vocab_size=vocab, n_queries=q, seed=seed, random_non_queries=noise,
                       query_start=start)
    assert torch.equal(again.inputs, b.inputs) and torch.equal(again.targets, b.targets)


def test_mqar_bad_arguments():
    with pytest.raises(MCError, match="n_pairs"):
        tasks.mqar(1, 64, 40, vocab_size=64)
    with pytest.raises(MCError, match="room"):
        tasks.mqar(1, 20, 8, vocab_size=64)
    with pytest.raises(MCError, match="query_start"):
        tasks.mqar(1, 64, 8, vocab_size=64, query_start=4)


def test_gutenberg_split_respects_eval_only():
    data = shared_path("data", "gutenberg")
    train, ev = tasks.book_names("train", data), tasks.book_names("eval", data)
    assert sorted(ev) == sorted(tasks.EVAL_ONLY)
    assert not set(train) & set(ev) and len(train) >= 10
    emma = tasks.eval_slice("austen-emma.txt", 4096, data_dir=data)
    assert len(emma) == 4096 and emma == (data / "austen-emma.txt").read_bytes()[:4096]
    assert tasks.load_corpus("train", data).count(emma[:200]) == 0
    with pytest.raises(MCError, match="unknown split"):
        tasks.book_names("test", data)

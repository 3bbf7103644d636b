"""Retrieval-aware tuning rows: exact lengths, labels only on answers, shares honoured, no
evaluation phrasing, evaluation-only text refused, and any tokenizer (token-level assembly)."""
from __future__ import annotations

import random

import pytest
import torch
from conftest import DATA, tiny_model

import mc_retrofit
from mc_retrofit import MCConfig, MCError
from mc_retrofit.finetune import finetune, gate_parameters
from mc_retrofit.finetune.mix import EVAL_MARKERS, KV, MULTIKEY, PASSKEY, MixBuilder, parse_mix

WORDS = "the river ran past the mill and the miller sang of wheat and rain while children watched".split()
TEXT = " ".join(random.Random(0).choice(WORDS) for _ in range(3000)).encode()


def test_parse_mix_and_its_one_line_errors():
    assert parse_mix("text=0.6, passkey=0.2,multikey=0.1,kv=0.1") == {"text": 0.6, "passkey": 0.2, "multikey": 0.1,
                                                                     "kv": 0.1}
    for bad, needle in [("text=0.6,bogus=0.4", "unknown mix item"), ("text=0.5,passkey=0.4", "sum to 1"),
                        ("text=x,passkey=1", "must be a number"), ("text=nan,passkey=1", "finite"),
                        ("text=-0.5,passkey=1.5", "finite number >= 0"), ("text", "name=share")]:
        with pytest.raises(MCError, match=needle):
            parse_mix(bad)


def test_tuning_phrasings_never_use_the_evaluation_phrasing():
    for needle, question in PASSKEY + MULTIKEY + KV:
        assert not any(m in needle or m in question for m in EVAL_MARKERS), (needle, question)


def test_rows_have_exact_lengths_and_labels_only_on_the_answer():
    b = MixBuilder(TEXT, 400, "text=0.25,passkey=0.25,multikey=0.25,kv=0.25")
    ids, labels = b.tensors(40, seed=1)
    assert ids.shape == labels.shape == (40, 400)
    rows = b.rows(40, seed=1)
    assert {r.item: sum(x.item == r.item for x in rows) for r in rows} == {k: 10 for k in ("text", "passkey",
                                                                                          "multikey", "kv")}
    for i, r in enumerate(rows):
        scored = (labels[i] != -100).nonzero().flatten().tolist()
        if r.answer is None:
            assert len(scored) == 400 and torch.equal(labels[i], torch.tensor(r.tokens[1:]))
            continue
        a, e = r.answer
        answer = bytes(r.tokens[a:e]).decode()
        assert scored == list(range(a - 1, e - 1)) and answer.isdigit() and len(answer) == 5
        before = bytes(r.tokens[:a]).decode()
        assert before.count(answer) == 1  # stated exactly once, in the queried needle, before the question
        assert 0 < r.distance < 400


def test_shares_counts_seed_and_curriculum():
    b = MixBuilder(TEXT, 400, "text=0.5,passkey=0.3,kv=0.2")
    rows = b.rows(7, seed=3)  # largest remainders: 3.5 -> 4 text, 2.1 -> 2 passkey, 1.4 -> 1 kv
    assert sorted(r.item for r in rows) == ["kv", "passkey", "passkey", "text", "text", "text", "text"]
    assert [r.tokens for r in rows] == [r.tokens for r in b.rows(7, seed=3)]
    d = [r.distance for r in b.rows(30, seed=0, curriculum=True) if r.answer is not None]
    assert d == sorted(d) and d[0] < d[-1]


def test_any_tokenizer_token_level_assembly():
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token=None))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT.decode()] * 2, trainer)

    def encode(data: bytes) -> list[int]:
        return tok.encode(data.decode()).ids

    b = MixBuilder(TEXT, 160, "passkey=0.5,kv=0.5", encode=encode, vocab_size=tok.get_vocab_size())
    ids, labels = b.tensors(6, seed=0)
    assert ids.shape == (6, 160)
    for i, r in enumerate(b.rows(6, seed=0)):
        a, e = r.answer
        answer = tok.decode(r.tokens[a:e])
        assert answer.isdigit() and answer in tok.decode(r.tokens[:a])
        assert (labels[i] != -100).sum() == e - a


def test_a_vocabulary_that_cannot_spell_the_items_is_refused():
    with pytest.raises(MCError, match="cannot spell"):
        MixBuilder(TEXT, 64, "passkey=1", vocab_size=64)


def test_evaluation_only_text_is_refused_as_filler():
    emma = DATA / "austen-emma.txt"
    if not emma.exists():
        pytest.skip(f"{emma} not available (../shared is absent)")
    with pytest.raises(MCError, match="evaluation-only"):
        MixBuilder(emma.read_bytes()[:200_000], 128, "passkey=1")


def test_finetune_trains_only_gates_on_mixed_rows():
    model = mc_retrofit.convert(tiny_model("mamba2", vocab_size=256, chunk_size=16),
                                MCConfig(segment_size=64, gate_source="learned", cache_weight=0.0))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if ".mc_gate." not in n}
    before = {n: p.detach().clone() for n, p in gate_parameters(model)}
    rows = MixBuilder(TEXT, 160, "text=0.5,passkey=0.5").tensors(16, seed=0)
    finetune(model, rows, steps=3, seq_len=160, batch=4, warmup=0, lr=0.05, eval_every=0, progress=False,
             log=lambda s: None)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert any(not torch.equal(p, before[n]) for n, p in gate_parameters(model))


def test_finetune_command_with_a_mix(tmp_path):
    from click.testing import CliRunner

    from mc_retrofit.cli import main

    tiny_model("mamba2", vocab_size=256, chunk_size=16).save_pretrained(tmp_path / "ckpt")
    (tmp_path / "train.txt").write_bytes(TEXT)
    base = ["finetune", str(tmp_path / "ckpt"), "--data", str(tmp_path / "train.txt"), "--seq-len", "256",
            "--segment-size", "64", "--steps", "2", "--batch", "2", "--warmup", "0", "--eval-every", "0",
            "--gate-source", "lowrank"]
    r = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "ft"), "--mix", "text=0.5,passkey=0.5",
                                  "--mix-rows", "8"])
    assert r.exit_code == 0, r.output
    assert "8 rows of 256 tokens" in r.output and mc_retrofit.load(tmp_path / "ft").mc.config.gate_source == "lowrank"
    for bad, needle in [("text=0.5,bogus=0.5", "unknown mix item"), ("text=0.5,passkey=0.4", "sum to 1")]:
        r = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "x"), "--mix", bad])
        assert r.exit_code != 0 and needle in r.output and not (tmp_path / "x").exists()


# -- the length curriculum ------------------------------------------------------------------------
def test_curriculum_pool_grows_as_hand_computed_and_resumes_exactly():
    from mc_retrofit.finetune.data import RowSampler

    rows = torch.arange(100)[:, None].repeat(1, 3)  # row i holds i: the draws say which rows were read
    s = RowSampler(rows, 4, torch.Generator().manual_seed(0), grow=10)
    # ceil(100 * (step + 1) / 10), all rows from step 9 on
    assert [s.pool(k) for k in (0, 1, 4, 8, 9, 50)] == [10, 20, 50, 90, 100, 100]
    assert RowSampler(rows[:10], 4, torch.Generator(), grow=100).pool(0) == 4  # never fewer than a batch
    assert RowSampler(rows, 4, torch.Generator(), grow=0).pool(0) == 100  # no curriculum
    for k in range(10):
        drawn, continued = s.next()
        assert int(drawn.max()) < s.pool(k) and not continued
    state = s.state_dict()
    ahead = [s.next()[0] for _ in range(3)]
    again = RowSampler(rows, 4, torch.Generator(), grow=10)
    again.load_state_dict(state)
    assert again.step == 10 and all(torch.equal(a, b) for a, b in zip(ahead, [again.next()[0] for _ in range(3)]))


def test_finetune_curriculum_reads_the_easy_rows_first_and_refuses_bad_values(monkeypatch):
    from mc_retrofit.finetune import loop
    from mc_retrofit.finetune.data import RowSampler

    seen: list[int] = []

    class Recording(RowSampler):
        def next(self):
            rows, cont = super().next()
            seen.extend(int(self.rows.tolist().index(r.tolist())) for r in rows)  # position of each drawn row
            return rows, cont

    monkeypatch.setattr(loop, "RowSampler", Recording)
    model = mc_retrofit.convert(tiny_model("mamba2", vocab_size=256, chunk_size=16),
                                MCConfig(segment_size=64, gate_source="lowrank", cache_weight=0.0))
    ids, labels = MixBuilder(TEXT, 160, "text=0.5,passkey=0.5").tensors(42, seed=0, curriculum=True)
    finetune(model, (ids, labels), steps=4, seq_len=160, batch=2, warmup=0, eval_every=0, progress=False,
             log=lambda s: None, curriculum=1.0)
    # 40 training rows (2 held out); pools ceil(40 * k / 4) = 10, 20, 30, 40 for steps 1..4
    assert all(p < bound for p, bound in zip(seen, [10, 10, 20, 20, 30, 30, 40, 40]))
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(MCError, match="--curriculum"):
            finetune(model, (ids, labels), steps=1, seq_len=160, batch=2, progress=False, curriculum=bad)
    with pytest.raises(MCError, match="--curriculum orders retrieval rows"):
        finetune(model, TEXT, steps=1, seq_len=160, batch=2, progress=False, curriculum=0.5)


def test_finetune_command_curriculum(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from mc_retrofit.cli import main
    from mc_retrofit.finetune import loop
    from mc_retrofit.finetune.data import RowSampler

    grows = []

    class Recording(RowSampler):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            grows.append(self.grow)

    monkeypatch.setattr(loop, "RowSampler", Recording)
    tiny_model("mamba2", vocab_size=256, chunk_size=16).save_pretrained(tmp_path / "ckpt")
    (tmp_path / "train.txt").write_bytes(TEXT)
    base = ["finetune", str(tmp_path / "ckpt"), "--data", str(tmp_path / "train.txt"), "--seq-len", "256",
            "--segment-size", "64", "--steps", "4", "--batch", "2", "--warmup", "0", "--eval-every", "0"]
    r = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "ft"), "--mix", "text=0.5,passkey=0.5",
                                  "--mix-rows", "8", "--curriculum", "0.5"])
    assert r.exit_code == 0, r.output
    assert grows == [2]  # round(0.5 * 4 steps)
    for extra, needle in [(["--curriculum", "0.5"], "no effect without --mix"),
                          (["--mix", "text=0.5,passkey=0.5", "--curriculum", "2"], "--curriculum")]:
        r = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "x"), *extra])
        assert r.exit_code != 0 and needle in r.output and not (tmp_path / "x").exists(), r.output

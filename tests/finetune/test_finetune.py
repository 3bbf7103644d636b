"""Gate-only fine-tuning: frozen base, gradient reach, exact resume, TBPTT, state passing,
gradient checkpointing, CLI round trip and errors (data parallel: test_finetune_dist.py)."""
from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner

import mc_retrofit as mr
from mc_retrofit.cli import main
from hypothesis import given, settings
from hypothesis import strategies as st

from mc_retrofit.finetune import _schedule, checkpoint_dir, finetune, gate_parameters, lm_loss, sample_windows
from mc_retrofit.finetune.data import WindowSampler
from mc_retrofit.finetune.step import chunk_bounds, window_loss_and_backward
from mc_retrofit.model import gate_state_dict

from conftest import TRANSFORMERS_FAMILIES, tiny_model

# Byte text with repeats, so that a cached segment has something to offer.
TEXT = b"the pass key is 40317. remember it. " * 20 + b"some filler text between the facts. " * 20


def _converted(cache_weight=0.5, seed=0):
    model = tiny_model("mamba2", seed=seed, vocab_size=256)
    return mr.convert(model, mr.MCConfig(segment_size=8, cache_weight=cache_weight, gate_source="learned"))


def _run(model, **kw):
    args = dict(steps=4, seq_len=32, batch=2, warmup=1, lr=5e-2, eval_every=2, seed=3, progress=False,
                log=lambda s: None)
    return finetune(model, TEXT, **{**args, **kw})


def _grads(model):
    for n, p in model.named_parameters():
        p.grad = None
        p.requires_grad_(".mc_gate." in f".{n}")
    windows = sample_windows(torch.tensor(list(TEXT)), 2, 32, torch.Generator().manual_seed(0))
    lm_loss(model, windows).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def test_zero_connector_gives_log_temperature_no_gradient_yet():
    # Hand-derived: W_u = 0 makes every gate logit 0 whatever the temperature, so
    # d loss / d log_temperature is exactly 0 at the start; W_u and cache_weight do get one.
    grads = _grads(_converted())
    for n, g in grads.items():
        if n.endswith("log_temperature"):
            assert g is not None and not bool((g != 0).any()), n
        elif n.endswith("cache_weight") or "connector" in n:
            assert g is not None and bool((g != 0).any()), n


def test_gradient_reaches_every_gate_parameter_and_nothing_else():
    model = _converted()
    with torch.no_grad():  # move W_u off zero, as one training step does
        for n, p in gate_parameters(model):
            if "connector" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    for n, p in model.named_parameters():
        p.requires_grad_(".mc_gate." in f".{n}")
    windows = sample_windows(torch.tensor(list(TEXT)), 2, 32, torch.Generator().manual_seed(0))
    lm_loss(model, windows).backward()
    gates = gate_parameters(model)
    names = {n.rsplit(".", 1)[-1] for n, _ in gates}
    assert {"cache_weight", "log_temperature", "online_bias"} <= names and any("connector" in n for n, _ in gates)
    for n, p in gates:
        assert p.grad is not None and bool((p.grad != 0).any()), n
    assert all(p.grad is None for n, p in model.named_parameters() if ".mc_gate." not in f".{n}")


def test_only_gate_parameters_change():
    model = _converted(cache_weight=0.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    result = _run(model)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= set(gate_state_dict(model))
    assert any(k.endswith("cache_weight") for k in changed)  # trained away from the base model
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags  # flags restored
    assert result["step"] == 4 and [s for s, _ in result["history"]] == [2, 4]


def test_resume_equals_uninterrupted(tmp_path):
    straight = _converted()
    _run(straight, out=tmp_path / "a")
    first = _converted()
    r = _run(first, out=tmp_path / "b", stop_at=2)
    assert r["step"] == 2 and not (tmp_path / "b").exists()
    assert (tmp_path / "b.checkpoint" / "state.pt").is_file()
    second = _converted()  # a fresh process would start from the initial gates again
    _run(second, out=tmp_path / "b", resume=True)
    assert not (tmp_path / "b.checkpoint").exists()
    a, b = gate_state_dict(mr.load(tmp_path / "a")), gate_state_dict(mr.load(tmp_path / "b"))
    init = gate_state_dict(_converted())
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(not torch.equal(a[k], init[k]) for k in a)


def test_checkpoint_from_before_the_online_bias_is_refused(tmp_path):
    # an older checkpoint's gates lack online_bias and its optimizer state has no slot for it
    _run(_converted(), out=tmp_path / "c", stop_at=2)
    file = tmp_path / "c.checkpoint" / "state.pt"
    state = torch.load(file, weights_only=True)
    state["gates"] = {k: v for k, v in state["gates"].items() if not k.endswith(".mc_gate.online_bias")}
    torch.save(state, file)
    with pytest.raises(mr.MCError, match="online_bias.*--force"):
        _run(_converted(), out=tmp_path / "c", resume=True)


def test_finetune_trains_the_online_bias_and_counts_it(tmp_path):
    model, lines = _converted(), []
    # tiny mamba2 by hand: 2 layers of W_u (d_model 32 -> 4 heads x 8) and 3 values per head
    n_gates = 2 * (32 * 4 * 8 + 3 * 4)
    before = {k: v.clone() for k, v in gate_state_dict(model).items() if k.endswith(".online_bias")}
    assert before and all(bool((v == 0).all()) for v in before.values())  # MCConfig.online_bias: the start
    _run(model, out=tmp_path / "t", log=lines.append)
    assert any(line.startswith(f"trainable: {n_gates} gate parameters") for line in lines)
    tuned = gate_state_dict(mr.load(tmp_path / "t"))
    assert any(not torch.equal(tuned[k], before[k]) for k in before)  # trained, and saved per head


def test_resume_with_other_settings_is_refused(tmp_path):
    _run(_converted(), out=tmp_path / "c", stop_at=2)
    with pytest.raises(mr.MCError, match="different settings"):
        _run(_converted(), out=tmp_path / "c", resume=True, lr=1e-3)


def test_schedule_warmup_then_cosine():
    f = _schedule(warmup=4, steps=12)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(8) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(12) == pytest.approx(0.0, abs=1e-12)


def test_training_lowers_the_loss():
    model = _converted(cache_weight=0.0)
    windows = sample_windows(torch.tensor(list(TEXT)), 4, 32, torch.Generator().manual_seed(7))
    with torch.no_grad():
        before = float(lm_loss(model, windows))
    finetune(model, TEXT, steps=8, seq_len=32, batch=2, warmup=1, lr=5e-2, eval_every=0, seed=1, progress=False,
             heldout_share=0.05, log=lambda s: None)
    with torch.no_grad():
        after = float(lm_loss(model, windows))
    assert after < before


# -- CLI -------------------------------------------------------------------------------------
@pytest.fixture
def base_dir(tmp_path):
    d = tmp_path / "base"
    tiny_model("mamba2", vocab_size=256).save_pretrained(d)
    return d


def _one_line_error(result):
    assert result.exit_code == 1
    lines = [x for x in result.output.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


def test_cli_bad_data_path(base_dir, tmp_path):
    r = CliRunner().invoke(main, ["finetune", str(base_dir), "--data", str(tmp_path / "nope.txt"),
                                  "--out", str(tmp_path / "o")])
    assert "does not exist" in _one_line_error(r)


def test_cli_empty_data(base_dir, tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    r = CliRunner().invoke(main, ["finetune", str(base_dir), "--data", str(tmp_path / "empty.txt"),
                                  "--out", str(tmp_path / "o"), "--steps", "1", "--seq-len", "16"])
    assert "empty" in _one_line_error(r)
    assert not (tmp_path / "o").exists()


def test_cli_writes_a_loadable_converted_dir(base_dir, tmp_path):
    (tmp_path / "train.txt").write_bytes(TEXT)
    out = tmp_path / "tuned"
    r = CliRunner().invoke(main, ["finetune", str(base_dir), "--data", str(tmp_path / "train.txt"), "--out", str(out),
                                  "--steps", "3", "--seq-len", "32", "--batch", "2", "--warmup", "1",
                                  "--eval-every", "0", "--segment-size", "8"])
    assert r.exit_code == 0, r.output
    assert "trainable:" in r.output and "finetuned" in r.output
    model = mr.load(out)
    assert model.mc.config.gate_source == "lowrank" and model.mc.config.segment_size == 8
    weights = [v for k, v in gate_state_dict(model).items() if k.endswith("cache_weight")]
    assert weights and any(bool((w != 0).any()) for w in weights)  # started at 0 (base model), then trained
    base = tiny_model("mamba2", vocab_size=256).state_dict()
    tuned = model.state_dict()
    assert all(torch.equal(base[k], tuned[k]) for k in base)


# -- TBPTT, state passing, gradient checkpointing ---------------------------------------------
DATA = torch.tensor(list(TEXT))


def _trained_like(model):
    """Gates as after a few steps (W_u off zero), so every gate parameter has a gradient."""
    with torch.no_grad():
        for n, p in gate_parameters(model):
            if "connector" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    for n, p in model.named_parameters():
        p.requires_grad_(".mc_gate." in f".{n}")
    return model


def _step_grads(model, windows, **kw):
    for _, p in gate_parameters(model):
        p.grad = None
    loss, cache = window_loss_and_backward(model, windows, [p for _, p in gate_parameters(model)], **kw)
    return float(loss), {n: p.grad.clone() for n, p in gate_parameters(model)}, cache


def test_one_chunk_through_the_cache_equals_plain_autograd():
    # Oracle: plain autograd of the full-window loss. One chunk through the cache (what
    # state passing runs) must give the same loss and gradients.
    model = _trained_like(_converted())
    windows = sample_windows(DATA, 2, 32, torch.Generator().manual_seed(0))
    loss = lm_loss(model, windows)
    loss.backward()
    loss = loss.detach()
    want = {n: p.grad.clone() for n, p in gate_parameters(model)}
    for kw in ({}, {"tbptt": 32}, {"keep_cache": True}):
        got_loss, got, cache = _step_grads(model, windows, **kw)
        assert got_loss == pytest.approx(float(loss), abs=1e-6)
        assert (cache is not None) == bool(kw.get("keep_cache"))
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7)


@settings(max_examples=6, deadline=None)
@given(chunk=st.integers(2, 31))
def test_tbptt_loss_equals_full_window_loss_and_truncates_gradients(chunk):
    model = _trained_like(_converted())
    windows = sample_windows(DATA, 2, 32, torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = float(lm_loss(model, windows))
    full_loss, full_grads, _ = _step_grads(model, windows)
    loss, grads, cache = _step_grads(model, windows, tbptt=chunk)
    assert abs(loss - full) <= 1e-5  # the forward is the full window's
    # the carried state is detached: nothing in the cache still points into a graph
    assert cache is not None and all(not t.requires_grad for t in _tensors(cache))
    assert all(torch.isfinite(g).all() for g in grads.values())
    if chunk < 24:  # with a chunk this short, gradient paths across boundaries exist and are cut
        assert any(not torch.allclose(grads[n], full_grads[n], rtol=1e-4, atol=1e-7) for n in grads)


@given(T=st.integers(1, 200), chunk=st.integers(2, 64))
def test_chunk_bounds_cover_the_window_without_one_token_chunks(T, chunk):
    bounds = chunk_bounds(T, chunk)
    assert bounds[0][0] == 0 and bounds[-1][1] == T
    assert all(b0[1] == b1[0] for b0, b1 in zip(bounds, bounds[1:]))
    assert all(b - a == chunk for a, b in bounds[:-1])
    assert bounds[-1][1] - bounds[-1][0] <= chunk + 1
    assert T == 1 or all(b - a >= 2 for a, b in bounds)


def _tensors(obj, seen=None):
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj] + [t for v in (getattr(obj, "__dict__", None) or {}).values() for t in _tensors(v, seen)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v, seen)]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v, seen)]
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return [t for v in vars(obj).values() for t in _tensors(v, seen)]
    return []


def test_tbptt_of_seq_len_is_the_plain_run_and_short_chunks_still_train():
    plain, full_chunk, short = _converted(), _converted(), _converted()
    _run(plain)
    _run(full_chunk, tbptt=32)
    r = _run(short, tbptt=8)
    a, b, c, init = (gate_state_dict(m) for m in (plain, full_chunk, short, _converted()))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(c[k], init[k]) for k in c) and math.isfinite(r["train_loss"])


def test_state_passing_sampler_continues_streams_deterministically():
    def draws(seed):
        s = WindowSampler(DATA, 3, 32, torch.Generator().manual_seed(seed), passing=0.5)
        return [s.next() for _ in range(12)]

    first, again = draws(4), draws(4)
    assert all(torch.equal(w, v) and c == d for (w, c), (v, d) in zip(first, again))
    flags = [c for _, c in first]
    assert not flags[0] and any(flags) and not all(flags[1:])
    for (prev, _), (w, cont) in zip(first, first[1:]):
        if cont:  # the next window's input starts right after the previous window's input
            assert torch.equal(w[:, 0], prev[:, -1])
            starts = [TEXT.find(bytes(row.tolist())) for row in prev]
            assert all(TEXT[s + 32: s + 65] == bytes(row.tolist()) for s, row in zip(starts, w))
    # without state passing it draws exactly what sample_windows draws (plain runs unchanged)
    s, g = WindowSampler(DATA, 3, 32, torch.Generator().manual_seed(4)), torch.Generator().manual_seed(4)
    assert all(torch.equal(s.next()[0], sample_windows(DATA, 3, 32, g)) for _ in range(3))


def test_passed_state_equals_the_longer_stream_and_changes_the_loss():
    # Oracle: one forward over both windows' text; the continued window's loss with the
    # passed state must be the loss of its half of that forward, and differ from a fresh start.
    model = _trained_like(_converted())
    s = WindowSampler(DATA, 2, 32, torch.Generator().manual_seed(2), passing=1.0)
    (w1, _), (w2, cont) = s.next(), s.next()
    assert cont
    _, _, cache = _step_grads(model, w1, keep_cache=True)
    passed, _, _ = _step_grads(model, w2, cache=cache, keep_cache=True)
    fresh, _, _ = _step_grads(model, w2)
    joined = torch.cat([w1[:, :-1], w2], 1)
    with torch.no_grad():
        logits = model(joined[:, :-1]).logits[:, 32:]
        want = float(torch.nn.functional.cross_entropy(logits.reshape(-1, 256), joined[:, 33:].reshape(-1)))
    assert abs(passed - want) <= 1e-5
    assert abs(passed - fresh) > 1e-3


def test_state_passing_resume_equals_uninterrupted(tmp_path):
    kw = dict(state_passing=1.0, tbptt=16)
    straight = _converted()
    _run(straight, out=tmp_path / "a", **kw)
    _run(_converted(), out=tmp_path / "b", stop_at=2, **kw)
    assert (checkpoint_dir(tmp_path / "b") / "carry.pt").is_file()
    for name in ("c", "d"):  # d: a copy of the checkpoint without its carried state
        import shutil

        shutil.copytree(checkpoint_dir(tmp_path / "b"), checkpoint_dir(tmp_path / name))
    (checkpoint_dir(tmp_path / "d") / "carry.pt").unlink()
    _run(_converted(), out=tmp_path / "c", resume=True, **kw)
    _run(_converted(), out=tmp_path / "d", resume=True, **kw)
    a, c, d = (gate_state_dict(mr.load(tmp_path / n)) for n in "acd")
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert any(not torch.equal(a[k], d[k]) for k in a)  # the carried state matters


def test_resume_refuses_other_tbptt_or_state_passing(tmp_path):
    _run(_converted(), out=tmp_path / "e", stop_at=2, tbptt=8)
    with pytest.raises(mr.MCError, match=r"different settings \(state_passing, tbptt\)"):
        _run(_converted(), out=tmp_path / "e", resume=True, state_passing=0.5)


def test_grad_checkpointing_gives_the_same_gates():
    from mc_retrofit.model import gate_modules

    runs = {}
    for on in (False, True):
        model, calls = _converted(), []
        gate = next(iter(gate_modules(model).values()))  # its connector runs once per mixer call
        hook = gate.connector.register_forward_hook(lambda *a: calls.append(1))
        _run(model, grad_checkpointing=on, eval_every=0)
        hook.remove()
        runs[on] = (model, len(calls))
    (plain, n_plain), (ckpt, n_ckpt) = runs[False], runs[True]
    assert n_ckpt == n_plain + 4  # 4 steps, each layer recomputed once in its backward
    a, b = gate_state_dict(plain), gate_state_dict(ckpt)
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
    assert not ckpt.training and not any(getattr(m, "gradient_checkpointing", False) for m in ckpt.modules())


@pytest.mark.parametrize("kw, message", [
    ({"tbptt": 1}, "--tbptt must be between 2 and --seq-len"),
    ({"tbptt": 33}, "--tbptt must be between 2 and --seq-len"),
    ({"state_passing": 1.5}, r"--state-passing is a probability in \[0, 1\]"),
    ({"state_passing": -0.1}, r"--state-passing is a probability in \[0, 1\]"),
    ({"grad_checkpointing": True, "tbptt": 8}, "cannot be combined"),
    ({"grad_checkpointing": True, "state_passing": 0.5}, "cannot be combined"),
])
def test_bad_long_sequence_settings_are_refused(kw, message):
    with pytest.raises(mr.MCError, match=message):
        _run(_converted(), **kw)


@pytest.mark.parametrize("args, message", [
    (["--tbptt", "1"], "--tbptt must be between 2 and --seq-len"),
    (["--tbptt", "64"], "--tbptt must be between 2 and --seq-len"),
    (["--state-passing", "2"], "--state-passing is a probability"),
    (["--grad-checkpointing", "--tbptt", "8"], "cannot be combined"),
])
def test_cli_bad_long_sequence_options(base_dir, tmp_path, args, message):
    (tmp_path / "train.txt").write_bytes(TEXT)
    r = CliRunner().invoke(main, ["finetune", str(base_dir), "--data", str(tmp_path / "train.txt"),
                                  "--out", str(tmp_path / "o"), "--seq-len", "32", *args])
    assert message in _one_line_error(r)


def test_cli_tbptt_and_state_passing_run(base_dir, tmp_path):
    (tmp_path / "train.txt").write_bytes(TEXT)
    r = CliRunner().invoke(main, ["finetune", str(base_dir), "--data", str(tmp_path / "train.txt"), "--out",
                                  str(tmp_path / "t"), "--steps", "3", "--seq-len", "32", "--batch", "2",
                                  "--warmup", "1", "--eval-every", "0", "--segment-size", "8", "--tbptt", "8",
                                  "--state-passing", "0.5"])
    assert r.exit_code == 0, r.output
    assert any(bool((v != 0).any()) for k, v in gate_state_dict(mr.load(tmp_path / "t")).items()
               if k.endswith("cache_weight"))


def check_tbptt_family(model, vocab: int, T: int = 24, chunk: int = 7):
    """Shared by the family tests (also tests/test_finetune_fla.py): through the cache, one
    chunk gives plain autograd's gradients; TBPTT chunks give the full-window loss; a
    passed state runs and changes the loss."""
    model = _trained_like(model)
    windows = torch.randint(0, vocab, (2, T + 1), generator=torch.Generator().manual_seed(5))
    full = lm_loss(model, windows)
    full.backward()
    full = full.detach()
    want = {n: p.grad.clone() for n, p in gate_parameters(model)}
    loss, got, cache = _step_grads(model, windows, keep_cache=True)
    assert abs(loss - float(full)) <= 1e-5
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7)
    loss, grads, _ = _step_grads(model, windows, tbptt=chunk)
    assert abs(loss - float(full)) <= 1e-5 and all(torch.isfinite(g).all() for g in grads.values())
    passed, _, _ = _step_grads(model, windows, tbptt=chunk, cache=cache, keep_cache=True)
    assert abs(passed - float(full)) > 1e-4


@pytest.mark.parametrize("family", TRANSFORMERS_FAMILIES)
def test_tbptt_and_state_passing_in_every_transformers_family(family):
    # Mamba and RWKV-4 write their cache in place: their adapters declare writes_cache_in_place, which makes them work.
    model = mr.convert(tiny_model(family, vocab_size=256),
                       mr.MCConfig(segment_size=5, cache_weight=0.5, gate_source="learned"))
    check_tbptt_family(model, 256)


def test_the_resume_id_tells_token_streams_apart():
    """Ids of a tokenized model are hashed whole: streams equal modulo 256 are different runs
    (byte streams still hash one byte per token)."""
    import mc_retrofit
    from mc_retrofit import MCConfig
    from mc_retrofit.finetune.checkpoint import FinetuneArgs, run_id

    from conftest import tiny_model

    model = mc_retrofit.convert(tiny_model("mamba2", vocab_size=600), MCConfig(segment_size=4))
    args = FinetuneArgs(steps=1, seq_len=8, lr=0.1, batch=1, warmup=0, seed=0, weight_decay=0.0, heldout_share=0.1)
    a = torch.arange(40) + 300
    held = torch.arange(10)
    assert run_id(model, args, a, held) != run_id(model, args, a - 256, held)
    assert run_id(model, args, a - 256, held) == run_id(model, args, (a - 256).clone(), held)


@pytest.mark.parametrize("name", ["builtin:mamba2-byte", "builtin:mamba2-byte-v2"])
def test_finetune_default_gates_are_under_one_percent_of_the_reference_checkpoints(name):
    from mc_retrofit.cli import build_config
    from mc_retrofit.cli.finetune import FINETUNE_DEFAULTS

    model = mr.convert(mr.load_base(name), build_config(defaults=FINETUNE_DEFAULTS))
    gates = sum(p.numel() for n, p in model.named_parameters() if ".mc_gate." in f".{n}")
    # by hand, per layer: A [d, 2] and B [2, H * U], and cache weight, temperature, online bias per head
    cfg = model.config
    H, U, d = cfg.num_heads, cfg.state_size, cfg.hidden_size
    assert gates == cfg.num_hidden_layers * (2 * (d + H * U) + 3 * H)
    assert gates / sum(p.numel() for p in model.parameters()) < 0.01


def test_connector_lr_moves_the_connector_at_its_own_rate():
    # Adam's first step moves a parameter with a nonzero gradient by lr * g / (|g| + eps), i.e.
    # by its group's lr (warmup 0, step 0: schedule factor 1), and one with a zero gradient
    # (log_temperature while W_u = 0) not at all: the connector by connector_lr, the per-head
    # scalars by lr; unset, every gate by lr.
    for connector_lr, want_connector in ((5e-4, 5e-4), (None, 5e-2)):
        model = _converted(cache_weight=0.5)
        before = {n: p.detach().clone() for n, p in gate_parameters(model)}
        _run(model, steps=1, warmup=0, lr=5e-2, connector_lr=connector_lr, eval_every=0)
        seen = set()
        for n, p in gate_parameters(model):
            d = (p.detach() - before[n]).abs()
            live = d > 0
            want = want_connector if "connector" in n else 5e-2
            if bool(live.any()):  # eps shortens the step of an entry whose gradient is tiny: the largest is lr
                assert bool((d <= want * 1.001).all()) and abs(float(d.max()) - want) < 0.02 * want, n
                seen.add("connector" if "connector" in n else "scalar")
        assert seen == {"connector", "scalar"}


def test_connector_lr_without_a_connector_is_refused():
    model = mr.convert(tiny_model("mamba2", seed=0, vocab_size=256), mr.MCConfig(segment_size=8, gate_source="query"))
    with pytest.raises(mr.MCError, match="no connector"):
        _run(model, connector_lr=1e-3)
    with pytest.raises(mr.MCError, match="connector_lr must be"):
        _run(_converted(), connector_lr=float("nan"))


def test_cli_connector_lr_reaches_finetune(base_dir, tmp_path):
    (tmp_path / "train.txt").write_bytes(TEXT)
    r = CliRunner().invoke(main, ["finetune", str(base_dir), "--data", str(tmp_path / "train.txt"), "--out",
                                  str(tmp_path / "o"), "--steps", "1", "--seq-len", "32", "--batch", "2",
                                  "--segment-size", "8", "--gate-source", "query", "--connector-lr", "0.001"])
    assert "no connector" in _one_line_error(r)  # refused inside finetune: the option got there
    assert not (tmp_path / "o").exists()

"""Gate-only fine-tuning: frozen base, gradient reach, exact resume, CLI round trip and errors."""
from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner

import mc_retrofit as mr
from mc_retrofit.cli import main
from mc_retrofit.finetune import _schedule, finetune, gate_parameters, lm_loss, sample_windows
from mc_retrofit.model import gate_state_dict

from conftest import tiny_model

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
    assert {"cache_weight", "log_temperature"} <= names and any("connector" in n for n, _ in gates)
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
    assert model.mc_config.gate_source == "learned" and model.mc_config.segment_size == 8
    weights = [v for k, v in gate_state_dict(model).items() if k.endswith("cache_weight")]
    assert weights and any(bool((w != 0).any()) for w in weights)  # started at 0 (base model), then trained
    base = tiny_model("mamba2", vocab_size=256).state_dict()
    tuned = model.state_dict()
    assert all(torch.equal(base[k], tuned[k]) for k in base)

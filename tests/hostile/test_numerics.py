"""What mc-retrofit promises about resumed runs, numbers and tuning data (issue 13, part B).

Read as a list; each test is named after the promise (and the issue's item number):

- Resuming never runs code from the checkpoint folder: every file in ``<out>.checkpoint``
  is read as plain tensors (``torch.load(weights_only=True)``), a planted pickle is refused
  with one line and never executed, and the carried state of ``--state-passing`` is saved
  as plain tensors and still resumes bit-exactly (S1).
- A checkpoint resumes only the run that wrote it: the same settings, model, MC config and
  training data, and a carried state written by that very run (S1).
- Non-finite options (``inf``, ``nan``) are refused by every float option of the CLI and by
  the Python API; a run that turns non-finite anyway stops with one line naming the step
  and writes no model and no checkpoint (W1).
- Gates that are not finite are refused when a converted directory loads; ``results.json``
  is strict JSON: a non-finite number is written as ``null`` and listed under
  ``non_finite`` (W2).
- ``finetune`` refuses settings under which no token reads a cached segment (every gate
  gradient would be exactly 0), e.g. ``--seq-len`` not longer than the segment size (W4).
- The evaluation-only books are refused by content, not by file name: a renamed copy, or
  their paragraphs inside other text, fail with one line; the hashes ship with the package
  (W8).
- A cache weight so large that the model's output stops being finite raises one line
  instead of returning NaN/inf (W18).
- ``cache_weight=0`` is the base model bit for bit, with any number of segments, with or
  without a cache; training from 0 still gets gradients (W19).
"""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from click.testing import CliRunner
from conftest import DATA, tiny_model
from safetensors.torch import load_file, save_file

import mc_retrofit as mr
from mc_retrofit import MCError
from mc_retrofit.cli import main
from mc_retrofit.finetune import checkpoint_dir, finetune, gate_parameters, lm_loss
from mc_retrofit.model import gate_modules, gate_state_dict

TEXT = b"the pass key is 40317. remember it. " * 20 + b"some filler text between the facts. " * 20
OTHER = b"a different corpus with other words in it. " * 40


def _converted(family="mamba2", cache_weight=0.5, segment_size=8, **kw):
    model = tiny_model(family, vocab_size=256)
    return mr.convert(model, mr.MCConfig(segment_size=segment_size, cache_weight=cache_weight,
                                         gate_source="learned", **kw))


def _run(model, data=TEXT, **kw):
    args = dict(steps=4, seq_len=32, batch=2, warmup=1, lr=5e-2, eval_every=2, seed=3, progress=False,
                log=lambda s: None)
    return finetune(model, data, **{**args, **kw})


def _one_line(err) -> str:
    text = str(err.value if hasattr(err, "value") else err)
    assert text and "\n" not in text, text
    return text


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _cli_error(result) -> str:
    assert result.exit_code != 0, result.output
    lines = [x for x in result.output.strip().splitlines() if x.strip()]
    return "\n".join(lines)


@pytest.fixture
def base_dir(tmp_path):
    d = tmp_path / "base"
    tiny_model("mamba2", vocab_size=256).save_pretrained(d)
    (tmp_path / "train.txt").write_bytes(TEXT)
    return d


class _Planted:
    """A pickle whose loading creates ``marker``: proof that the file was unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# -- S1 ---------------------------------------------------------------------------------
def test_S1_resume_never_unpickles(tmp_path):
    marker = tmp_path / "pwned"
    # a run without state passing has no carried state: a carry.pt there was planted
    _run(_converted(), out=tmp_path / "a", stop_at=2)
    ckpt = checkpoint_dir(tmp_path / "a")
    torch.save(_Planted(marker), ckpt / "carry.pt")
    with pytest.raises(MCError) as e:
        _run(_converted(), out=tmp_path / "a", resume=True)
    assert "carry.pt" in _one_line(e)
    assert not marker.exists() and ckpt.is_dir()  # never run; the evidence is kept

    # a run with state passing: its own carry.pt replaced by a planted one
    _run(_converted(), out=tmp_path / "b", stop_at=2, state_passing=1.0, tbptt=16)
    ckpt = checkpoint_dir(tmp_path / "b")
    torch.save(_Planted(marker), ckpt / "carry.pt")
    with pytest.raises(MCError) as e:
        _run(_converted(), out=tmp_path / "b", resume=True, state_passing=1.0, tbptt=16)
    _one_line(e)
    assert not marker.exists() and ckpt.is_dir()

    # the state file itself
    torch.save(_Planted(marker), ckpt / "state.pt")
    with pytest.raises(MCError) as e:
        _run(_converted(), out=tmp_path / "b", resume=True, state_passing=1.0, tbptt=16)
    _one_line(e)
    assert not marker.exists()


def test_S1_carried_state_is_plain_tensors_and_resumes_exactly(tmp_path):
    # RWKV-4's cache is a list of tensors with the MC memory hung on one of them: the
    # hardest shape to save as plain data. The oracle: an uninterrupted run.
    kw = dict(state_passing=1.0, tbptt=16)
    _run(_converted("rwkv4", segment_size=5), out=tmp_path / "straight", **kw)
    _run(_converted("rwkv4", segment_size=5), out=tmp_path / "split", stop_at=2, **kw)
    carry = checkpoint_dir(tmp_path / "split") / "carry.pt"
    torch.load(carry, weights_only=True)  # plain data: loads without any allow-list
    _run(_converted("rwkv4", segment_size=5), out=tmp_path / "split", resume=True, **kw)
    a, b = gate_state_dict(mr.load(tmp_path / "straight")), gate_state_dict(mr.load(tmp_path / "split"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_S1_checkpoint_belongs_to_this_run(tmp_path):
    kw = dict(stop_at=2, state_passing=1.0, tbptt=16)
    _run(_converted(), out=tmp_path / "x", **kw)
    _run(_converted(), data=TEXT + OTHER, out=tmp_path / "y", **kw)
    # other training data, same settings: another run
    with pytest.raises(MCError, match="another run") as e:
        _run(_converted(), data=OTHER + TEXT, out=tmp_path / "x", resume=True, state_passing=1.0, tbptt=16)
    _one_line(e)
    # another MC config, same settings
    with pytest.raises(MCError, match="another run"):
        _run(_converted(cache_weight=0.25), out=tmp_path / "x", resume=True, state_passing=1.0, tbptt=16)
    # the carried state of another run (y) copied into x's checkpoint
    shutil.copyfile(checkpoint_dir(tmp_path / "y") / "carry.pt", checkpoint_dir(tmp_path / "x") / "carry.pt")
    with pytest.raises(MCError, match="carry.pt") as e:
        _run(_converted(), out=tmp_path / "x", resume=True, state_passing=1.0, tbptt=16)
    _one_line(e)


# -- W1 ---------------------------------------------------------------------------------
@pytest.mark.parametrize("option, value", [
    ("--lr", "inf"), ("--lr", "nan"), ("--state-passing", "nan"), ("--cache-weight", "inf"),
    ("--temperature", "nan"), ("--online-bias", "-inf"), ("--cache-weight", "nan"),
])
def test_W1_non_finite_options_are_refused(base_dir, tmp_path, option, value):
    r = _cli("finetune", base_dir, "--data", tmp_path / "train.txt", "--out", tmp_path / "o", "--steps", "1",
             "--seq-len", "32", option, value)
    assert r.exit_code == 2 and option in r.output and "finite" in r.output, r.output
    assert not (tmp_path / "o").exists() and not checkpoint_dir(tmp_path / "o").exists()
    if option in ("--cache-weight", "--temperature", "--online-bias"):  # the shared MC options
        r = _cli("convert", base_dir, "--out", tmp_path / "c", option, value)
        assert r.exit_code == 2 and option in r.output and "finite" in r.output, r.output
    # the Python API
    api = {"--lr": "lr", "--state-passing": "state_passing"}.get(option)
    if api:
        with pytest.raises(MCError, match="finite"):
            _run(_converted(), **{api: float(value)})
    for name in ("weight_decay", "heldout_share"):
        with pytest.raises(MCError, match="finite"):
            _run(_converted(), **{name: float("nan")})


def test_W1_never_saves_a_non_finite_model(tmp_path):
    # A finite but absurd rate: AdamW moves every gate by about 1e30 in step 1, so the next
    # forward is no longer finite. The run must stop there, naming the step.
    for eval_every, where in ((1, "step 1: held-out"), (0, "step 2")):  # the evaluation after step 1, or step 2
        out = tmp_path / f"o{eval_every}"
        with pytest.raises(MCError, match=where) as e:
            _run(_converted("rwkv4", segment_size=5), out=out, lr=1e30, eval_every=eval_every, checkpoint_every=1)
        assert "--lr" in _one_line(e) or "cache weight" in str(e.value)
        assert not out.exists()
        ckpt = checkpoint_dir(out)
        if ckpt.exists():  # only a checkpoint of finite gates may be there
            state = torch.load(ckpt / "state.pt", weights_only=True)
            assert all(torch.isfinite(v).all() for v in state["gates"].values())


# -- W2 ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_W2_non_finite_gates_are_refused_on_load(tmp_path, bad):
    model = _converted()
    model.save_pretrained(tmp_path / "m")
    gates = load_file(str(tmp_path / "m" / "mc_gates.safetensors"))
    name = sorted(k for k in gates if k.endswith("cache_weight"))[0]
    gates[name][0] = bad
    save_file(gates, str(tmp_path / "m" / "mc_gates.safetensors"), metadata={"format": "pt"})
    with pytest.raises(MCError, match="not finite") as e:
        mr.load(tmp_path / "m")
    assert name in _one_line(e)
    with torch.no_grad():  # an exported file with such a gate
        gate_state_dict(model)[name][0] = bad
    mr.export(model, tmp_path / "m.safetensors")
    with pytest.raises(MCError, match="not finite") as e:
        mr.load(tmp_path / "m.safetensors")
    assert name in _one_line(e)


def test_W2_results_json_is_strict(tmp_path):
    from mc_retrofit.eval import write_json

    results = {"perplexity": {"by_length": {"base": {"16": {"bits_per_token": float("nan"), "tokens": 3}},
                                            "mc": {"16": {"bits_per_token": 1.5}}}},
               "curve": [1.0, float("inf"), -float("inf")]}
    write_json(results, tmp_path / "results.json")

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    data = json.loads((tmp_path / "results.json").read_text(), parse_constant=refuse)  # a strict parser
    assert data["perplexity"]["by_length"]["base"]["16"] == {"bits_per_token": None, "tokens": 3}
    assert data["perplexity"]["by_length"]["mc"]["16"]["bits_per_token"] == 1.5
    assert data["curve"] == [1.0, None, None]
    assert data["non_finite"] == ["perplexity.by_length.base.16.bits_per_token", "curve.1", "curve.2"]
    assert math.isnan(results["perplexity"]["by_length"]["base"]["16"]["bits_per_token"])  # input untouched


# -- W4 ---------------------------------------------------------------------------------
def _gate_grads(model, seq_len):
    for n, p in model.named_parameters():
        p.grad = None
        p.requires_grad_(".mc_gate." in f".{n}")
    windows = torch.tensor(list(TEXT[: 2 * (seq_len + 1)])).view(2, seq_len + 1)
    gates = [p for _, p in gate_parameters(model)]
    (lm_loss(model, windows) + 0 * sum(p.sum() for p in gates)).backward()  # a zero gradient, not none
    return [p.grad for _, p in gate_parameters(model)]


@pytest.mark.parametrize("segmentation, dead, live", [("constant", 8, 9), ("log", 16, 24)])
def test_W4_finetune_that_trains_nothing_is_refused(segmentation, dead, live):
    cfg = {"segmentation": segmentation} if segmentation == "log" else {}
    # the oracle: autograd says every gate gradient is exactly 0 at `dead`, not at `live`
    assert all(not bool(g.any()) for g in _gate_grads(_converted(**cfg), dead))
    assert any(bool(g.any()) for g in _gate_grads(_converted(**cfg), live))
    with pytest.raises(MCError, match="segment") as e:
        _run(_converted(**cfg), seq_len=dead, steps=1)
    _one_line(e)
    _run(_converted(**cfg), seq_len=live, steps=1)
    _run(_converted(**cfg), seq_len=dead, steps=1, state_passing=1.0)  # continued streams do read the cache


def test_W4_cli_refuses_before_loading(base_dir, tmp_path):
    r = _cli("finetune", base_dir, "--data", tmp_path / "train.txt", "--out", tmp_path / "o", "--steps", "1",
             "--seq-len", "8", "--segment-size", "8")
    line = _cli_error(r)
    assert r.exit_code == 1 and line.startswith("error:") and "\n" not in line and "--seq-len" in line, r.output
    assert "trainable" not in r.output  # refused before the model was loaded


# -- W8 ---------------------------------------------------------------------------------
def test_W8_hashes_ship_with_the_package():
    from mc_retrofit import eval_only

    from mc_retrofit.eval_only_books import BOOKS

    assert set(BOOKS) == {"austen-emma.txt", "melville-moby_dick.txt", "whitman-leaves.txt"}
    assert all(len(h.split()) >= 200 for _, h in BOOKS.values())  # a few hundred paragraph hashes each
    eval_only.check_not_eval_only(TEXT * 10, "text")  # ordinary text passes


def _books():
    if not (DATA / "austen-emma.txt").is_file():
        pytest.skip(f"{DATA} not available (../shared is absent)")
    return DATA


def test_W8_committed_hashes_match_the_books():
    from mc_retrofit import eval_only

    data = _books()
    from mc_retrofit.eval_only_books import BOOKS

    assert eval_only.compute_books(data) == BOOKS  # regenerated from the books themselves


def test_W8_eval_only_books_are_refused_by_content(tmp_path):
    from mc_retrofit.finetune.data import read_texts

    data = _books()
    emma = (data / "austen-emma.txt").read_bytes()
    (tmp_path / "novel.txt").write_bytes(emma)  # a renamed copy
    with pytest.raises(MCError, match="austen-emma.txt") as e:
        read_texts(tmp_path / "novel.txt")
    _one_line(e)
    # paragraphs of Moby Dick (a file with Windows line ends) inside other text, each re-wrapped
    # onto one line with Unix line ends
    whale = (data / "melville-moby_dick.txt").read_bytes()
    paragraphs = [p for p in whale.replace(b"\r\n", b"\n").split(b"\n\n") if len(p) > 400][100:130]
    assert len(paragraphs) == 30
    mixed = TEXT + b"\n\n" + b"\n\n".join(b" ".join(p.split()) for p in paragraphs) + b"\n\n" + TEXT
    (tmp_path / "mixed.txt").write_bytes(mixed)
    with pytest.raises(MCError, match="melville-moby_dick.txt"):
        read_texts(tmp_path / "mixed.txt")
    with pytest.raises(MCError, match="whitman-leaves.txt"):
        read_texts((data / "whitman-leaves.txt").read_bytes())  # bytes given directly
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_bytes(TEXT)
    (folder / "b.txt").write_bytes(emma[len(emma) // 2:])
    with pytest.raises(MCError, match="b.txt"):
        read_texts(folder)
    assert read_texts(data / "austen-persuasion.txt")  # a training book passes


# -- W18 --------------------------------------------------------------------------------
def test_W18_huge_cache_weight_raises_instead_of_nan():
    from mc_retrofit.eval.forward import backbone_hidden

    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    model = mr.convert(tiny_model("rwkv4"), mr.MCConfig(segment_size=4, cache_weight=1e30))
    with pytest.raises(MCError, match="cache weight") as e:
        with torch.no_grad():
            model(ids)
    _one_line(e)
    with pytest.raises(MCError, match="cache weight"):  # the evaluation's own forward, too
        backbone_hidden(model, ids)
    with torch.no_grad():  # an ordinary weight runs
        gate_modules(model)["rwkv.blocks.0.attention.mc_gate"].cache_weight.fill_(1.0)
        gate_modules(model)["rwkv.blocks.1.attention.mc_gate"].cache_weight.fill_(1.0)
        assert torch.isfinite(model(ids).logits).all()


# -- W19 --------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["mamba2", "mamba", "rwkv4"])
def test_W19_cache_weight_0_is_the_base_model_bit_for_bit(family):
    from mc_retrofit import compat
    from mc_retrofit.generation import cache_stats

    ids = torch.randint(0, 64, (2, 29), generator=torch.Generator().manual_seed(0))
    base = tiny_model(family)
    model = mr.convert(tiny_model(family), mr.MCConfig(segment_size=5, cache_weight=0.0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)  # 6 segments, not one
        # split prefill through a cache: each call equals the base model's
        (b1, bc), (m1, mc) = compat.forward_with_cache(base, ids[:, :13]), compat.forward_with_cache(model, ids[:, :13])
        (b2, _), (m2, mc) = compat.forward_with_cache(base, ids[:, 13:], bc), compat.forward_with_cache(model, ids[:, 13:], mc)
        assert torch.equal(m1.logits, b1.logits)
        if family == "mamba":  # transformers' Mamba drops the cached state of a multi-token call;
            # mc-retrofit's carry-in keeps it (tests/test_generation.py): the full forward is the oracle
            assert (m2.logits - base(ids).logits[:, 13:]).abs().max() <= 1e-5
        else:
            assert torch.equal(m2.logits, b2.logits)
        assert {v["tokens"] for v in cache_stats(mc)["layers"].values()} == {29}
        # the cache holds no cached segment for those tokens: turning MC on mid-cache is refused
        for gate in gate_modules(model).values():
            gate.cache_weight.fill_(1.0)
        with pytest.raises(MCError, match="cache weight") as e:
            compat.forward_with_cache(model, ids[:, :4], mc)
        _one_line(e)
        assert not torch.equal(model(ids).logits, base(ids).logits)  # a fresh call reads the cache again
        for gate in gate_modules(model).values():
            gate.cache_weight.zero_()
    # training from 0 (finetune's start): the segment loop still runs, cache_weight gets a gradient
    for n, p in model.named_parameters():
        p.requires_grad_(".mc_gate." in f".{n}")
    torch.nn.functional.cross_entropy(model(ids, use_cache=False).logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1)).backward()
    assert all(bool(g.cache_weight.grad.any()) for g in gate_modules(model).values())

"""What mc-retrofit promises when its inputs are wrong, odd or hostile (issue 13, part C).

Read as a list; each test is named after the promise (and the issue's item number):

- A deep copy of a converted model is a converted model of its own: its hooks use the
  copy's gates, so editing or tuning the copy never reaches the original (W3).
- ``--dtype`` is honoured for exported files too (W5) and recorded in ``results.json`` (W6).
- Weights the config does not account for are refused like missing ones: a config with
  fewer layers than the weights never yields a silently truncated model (W7).
- An evaluation recipe cannot choose where results go outside ``eval-results/`` (W9);
  unknown keys anywhere in a recipe are refused, not run as the default (W10); its ``seed``
  is used (W11). A recipe is checked completely before any model loads.
- Options that would be ignored are refused, with the reason: an empty ``--layers``, a
  layer ``inspect`` would silently skip, MC options for a directory that already has its
  own ``mc_config.json``, ``--segment-size`` under log segmentation, ``--top-k`` without ssc,
  and so on (W12-W14, W17).
- ``generate`` refuses a non-finite temperature (W15) and feeds a byte-level model the
  prompt file's bytes exactly (W16).
- ``MCConfig`` takes integers where it says integers (no ``True`` for 1) and a readable
  format version (W21).
- The Python API refuses wrong arguments with one clear line (and ``convert`` takes a plain
  dict as its config); a missing CUDA device, a missing tokenizer path, a tampered export and
  an export of another format version each give one line that says what to do, before any
  large allocation; transformers' multi-line load report never precedes that line.
"""
from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import mc_retrofit
from mc_retrofit import MCConfig, MCError
from mc_retrofit.cli import main
from mc_retrofit.model import gate_modules

WORDS = "the pass key river candle forest silver lantern meadow copper falcon willow morning".split()


# -- helpers -------------------------------------------------------------------------
def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def clear_error(result, *needles):
    """A failure the tool meant: exit 1, one line, an MCError (not a wrapped crash)."""
    assert result.exit_code == 1, result.output
    text = result.output.strip()
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), text
    assert "MC_RETROFIT_DEBUG" not in text and "Traceback" not in text, text  # a raw exception, wrapped
    for n in needles:
        assert n.lower() in text.lower(), (n, text)
    return text


@pytest.fixture(scope="module")
def orig(tmp_path_factory):
    d = tmp_path_factory.mktemp("m") / "orig"
    tiny_model("mamba2").save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def byte_dir(tmp_path_factory):
    """A byte-level checkpoint (vocab 256, no tokenizer) and a small book to evaluate on."""
    root = tmp_path_factory.mktemp("b")
    tiny_model("mamba2", vocab_size=256, chunk_size=16).save_pretrained(root / "ckpt")
    rng = torch.Generator().manual_seed(0)
    (root / "book.txt").write_text(" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (400,), generator=rng)))
    return root


def _recipe(tmp_path, name="r.json", **extra):
    body = {"perplexity": {"lengths": [32], "windows": 2, "position_bucket": 8}, **extra}
    p = tmp_path / name
    p.write_text(json.dumps(body))
    return p


def _eval(byte_dir, recipe, *args):
    return run("eval", byte_dir / "ckpt", "--recipe", recipe, "--data", byte_dir / "book.txt", "--quiet",
               "--no-plots", "--no-recipe-variants", *args)


def _exported(tmp_path, **mc):
    model = mc_retrofit.convert(tiny_model("mamba2"), MCConfig(segment_size=4, **mc))
    return mc_retrofit.export(model, tmp_path / "m.safetensors")


def _rewrite_metadata(path, **changes):
    """The same tensors with some metadata entries replaced (what a tamperer can do)."""
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    for k, v in changes.items():
        meta[k] = v if isinstance(v, str) else v(meta[k])
    save_file(tensors, str(path), metadata=meta)


def _with_hf(**fields):
    return lambda text: json.dumps({**json.loads(text), **fields})


# -- silent wrong results ----------------------------------------------------------------
def test_W3_deepcopy_is_independent(tmp_path):
    base = tiny_model("mamba2")
    oracle = copy.deepcopy(base)  # the unconverted model: what cache weight 0 must compute
    model = mc_retrofit.convert(base, MCConfig(segment_size=4))
    twin = copy.deepcopy(model)
    x = torch.randint(0, 64, (2, 21))
    with torch.no_grad():
        before = model(x).logits
        for gate in gate_modules(twin).values():
            gate.cache_weight.zero_()
        assert torch.allclose(twin(x).logits, oracle(x).logits, atol=1e-5)  # the copy's own gates rule it
        assert torch.equal(model(x).logits, before)  # and the original is untouched
    # Tuning the copy: gradients reach the copy's gates, never the original's.
    for gate in gate_modules(twin).values():
        gate.cache_weight.data.fill_(0.5)
    twin(x).logits.square().mean().backward()
    assert all(g.cache_weight.grad is not None and g.cache_weight.grad.abs().sum() > 0
               for g in gate_modules(twin).values())
    assert all(g.cache_weight.grad is None for g in gate_modules(model).values())
    with torch.no_grad():
        assert torch.equal(model(x).logits, before)
    twin.save_pretrained(tmp_path / "twin")  # the copy saves its own gates
    again = mc_retrofit.load(tmp_path / "twin")
    assert all(bool((g.cache_weight == 0.5).all()) for g in gate_modules(again).values())
    with torch.no_grad():
        assert torch.equal(again(x).logits, twin(x).logits)


def test_W5_dtype_applies_to_exported_files(tmp_path):
    from mc_retrofit.eval.variants import OWN, ModelSource, Variant

    path = _exported(tmp_path)
    model = mc_retrofit.load(path, dtype=torch.bfloat16)
    assert model.backbone.embeddings.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in mc_retrofit.model.gate_state_dict(model).values())  # gates stay fp32
    source = ModelSource(str(path), dtype=torch.bfloat16)
    assert source.base().backbone.embeddings.weight.dtype == torch.bfloat16
    own = source.build(Variant(OWN, source.own_config(), source=OWN))
    assert own.backbone.embeddings.weight.dtype == torch.bfloat16


def test_W6_dtype_is_recorded_in_results(byte_dir, tmp_path):
    r = _eval(byte_dir, _recipe(tmp_path), "--dtype", "bfloat16", "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "o" / "results.json").read_text())["dtype"] == "bfloat16"
    r = _eval(byte_dir, _recipe(tmp_path), "--out", tmp_path / "o32")
    assert json.loads((tmp_path / "o32" / "results.json").read_text())["dtype"] == "float32"  # what ran, not None


def test_W7_config_with_fewer_layers_than_weights_is_refused(orig, tmp_path):
    import shutil

    bad = tmp_path / "trunc"
    shutil.copytree(orig, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 1}))
    clear_error(run("convert", bad, "--out", tmp_path / "o"), "1 layer", "2")
    assert not (tmp_path / "o").exists()
    with pytest.raises(MCError):
        mc_retrofit.load_base(bad)
    clear_error(run("inspect", bad), "1 layer")  # nor costed as a 1-layer model


def test_W9_recipe_name_cannot_escape_eval_results(byte_dir, tmp_path, monkeypatch):
    work = tmp_path / "a" / "b" / "c"
    work.mkdir(parents=True)
    recipe = _recipe(tmp_path)
    recipe.write_text(json.dumps({**json.loads(recipe.read_text()), "name": "../../../../../../x"}))
    monkeypatch.chdir(work)
    before = set(tmp_path.rglob("*"))
    r = _eval(byte_dir, recipe)
    assert r.exit_code == 0, r.output
    new = set(tmp_path.rglob("*")) - before
    assert new and all((work / "eval-results") in p.parents or p == work / "eval-results" for p in new), new
    assert len(list((work / "eval-results").glob("*/results.json"))) == 1


def test_W10_unknown_keys_in_a_recipe_variant_are_refused(tmp_path):
    from mc_retrofit.eval import load_recipe

    for variant, needle in [({"name": "v", "mcc": {"segment_size": 8}}, "mcc"),
                            ({"name": "v", "bogus": 1}, "bogus"),
                            ({"name": "v", "mc": {"segmnet_size": 8}}, "segmnet_size"),
                            ({"name": "v", "mc": {"segment_size": "0x"}}, "0x")]:
        with pytest.raises(MCError, match=needle):
            load_recipe(str(_recipe(tmp_path, variants=[variant])))
    # the recipe's relative segment sizes still load (resolved later against the context)
    load_recipe(str(_recipe(tmp_path, variants=[{"name": "v", "mc": {"segment_size": "0.5x"}}])))


def test_W11_recipe_seed_is_honoured(byte_dir, tmp_path):
    def records(out):
        data = json.loads((out / "results.json").read_text())
        return data["seed"], [r["start"] for r in data["records"]]

    assert _eval(byte_dir, _recipe(tmp_path, "s.json", seed=5), "--out", tmp_path / "a").exit_code == 0
    assert _eval(byte_dir, _recipe(tmp_path), "--seed", "5", "--out", tmp_path / "b").exit_code == 0
    assert _eval(byte_dir, _recipe(tmp_path), "--out", tmp_path / "c").exit_code == 0
    assert _eval(byte_dir, _recipe(tmp_path, "s.json", seed=5), "--seed", "0", "--out", tmp_path / "d").exit_code == 0
    a, b, c, d = (records(tmp_path / n) for n in "abcd")
    assert a == b and a[0] == 5  # the recipe's seed is what --seed 5 gives
    assert c[0] == 0 and c[1] != a[1]  # and it matters
    assert d == c  # an explicit --seed wins over the recipe's
    clear_error(_eval(byte_dir, _recipe(tmp_path, "t.json", seed="five")), "seed")


def test_W12_empty_layers_is_refused(orig, tmp_path):
    clear_error(run("convert", orig, "--out", tmp_path / "o", "--layers", ",,,"), "--layers", "at least one")
    assert not (tmp_path / "o").exists()
    with pytest.raises(MCError, match="at least one"):
        MCConfig(layers=[])


def test_W13_inspect_refuses_layers_that_convert_refuses(orig):
    clear_error(run("inspect", orig, "--layers", "99"), "99", "do not exist")


def test_W14_inspect_of_a_converted_dir_refuses_mc_options(orig, tmp_path):
    assert run("convert", orig, "--out", tmp_path / "c", "--segment-size", 8).exit_code == 0
    clear_error(run("inspect", tmp_path / "c", "--segment-size", 3), "--segment-size", "mc_config.json")
    r = run("inspect", tmp_path / "c", "--json")
    assert r.exit_code == 0 and json.loads(r.output)["mc_config"]["segment_size"] == 8


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_W15_generate_refuses_a_non_finite_temperature(byte_dir, value):
    r = run("generate", byte_dir / "ckpt", "--prompt", "hi", "--temperature", value)
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert "temperature" in r.output.lower(), r.output


def test_W16_prompt_file_bytes_reach_a_byte_level_model(byte_dir, tmp_path, monkeypatch):
    from transformers.generation.utils import GenerationMixin

    seen = []
    original = GenerationMixin.generate

    def spy(self, inputs=None, *args, **kwargs):
        seen.append(inputs[0].tolist())
        return original(self, inputs, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", spy)
    raw = b"ab\xff\xfe\x80 caf\xc3\xa9"  # not UTF-8, and some that is
    (tmp_path / "p.bin").write_bytes(raw)
    r = run("generate", byte_dir / "ckpt", "--prompt-file", tmp_path / "p.bin", "--max-new-tokens", 1)
    assert r.exit_code == 0, r.output
    assert seen == [list(raw)]


def test_W16_prompt_file_for_a_tokenizer_must_be_utf8(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]"] + WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    tiny_model("mamba2").save_pretrained(tmp_path / "ckpt")
    fast.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "p.bin").write_bytes(b"the river \xff\xfe")
    clear_error(run("generate", tmp_path / "ckpt", "--prompt-file", tmp_path / "p.bin"), "UTF-8")


@pytest.mark.parametrize("args,needle", [
    (["--segmentation", "log", "--segment-size", "7"], "--segment-size"),
    (["--top-k", "3"], "--top-k"),
    (["--aggregation", "gated", "--top-k", "3"], "--top-k"),
    (["--cache-policy", "log"], "--cache-policy"),
    (["--aggregation", "residual", "--temperature", "2"], "--temperature"),
    (["--aggregation", "residual", "--online-bias", "1"], "--online-bias"),
    (["--aggregation", "residual", "--gate-source", "learned"], "--gate-source"),
])
def test_W17_ignored_flags_are_refused(orig, tmp_path, args, needle):
    clear_error(run("convert", orig, "--out", tmp_path / "o", *args), needle)
    assert not (tmp_path / "o").exists()


def test_W17_log_segmentation_is_reported_as_log(orig, tmp_path):
    r = run("convert", orig, "--out", tmp_path / "o", "--segmentation", "log")
    assert r.exit_code == 0, r.output
    assert "log segments" in r.output and "segment 256" not in r.output
    r = run("convert", orig, "--out", tmp_path / "s", "--aggregation", "ssc", "--top-k", "3")
    assert r.exit_code == 0, r.output  # the same flags where they do apply


def test_W17_a_commands_own_defaults_are_not_ignored_flags(byte_dir, tmp_path):
    """finetune's defaults (gate_source learned, cache weight 0) are not flags the user gave:
    --aggregation residual must not be refused for a --gate-source nobody passed."""
    r = run("finetune", byte_dir / "ckpt", "--data", byte_dir / "book.txt", "--out", tmp_path / "ft",
            "--aggregation", "residual", "--segment-size", "8", "--seq-len", "24", "--steps", "1", "--batch", "1",
            "--warmup", "0", "--eval-every", "0")
    assert r.exit_code == 0, r.output
    assert MCConfig.load(tmp_path / "ft").aggregation == "residual"


@pytest.mark.parametrize("field", ["segment_size", "top_k", "max_cached_segments", "temperature", "online_bias",
                                   "cache_weight", "format_version"])
def test_W21_mcconfig_refuses_bools_for_numbers(field):
    with pytest.raises(MCError, match=field):
        MCConfig(**{field: True})
    with pytest.raises(MCError, match="layers"):
        MCConfig(layers=[True])


def test_W21_mcconfig_refuses_an_unreadable_format_version():
    for bad in ("x", 0, 1.5, None):
        with pytest.raises(MCError, match="format_version"):
            MCConfig(format_version=bad)
    with pytest.raises(MCError, match="newer"):
        MCConfig(format_version=99)


# -- crashes and unclear messages ---------------------------------------------------------
def test_api_convert_takes_a_dict_config():
    model = mc_retrofit.convert(tiny_model("mamba2"), {"segment_size": 64, "aggregation": "soup"})
    assert (model.mc.config.segment_size, model.mc.config.aggregation) == (64, "gated")
    with pytest.raises(MCError, match="segmnet_size"):
        mc_retrofit.convert(tiny_model("mamba2"), {"segmnet_size": 64})
    with pytest.raises(MCError, match="MCConfig or a dict"):
        mc_retrofit.convert(tiny_model("mamba2"), "segment_size=64")


def test_api_convert_refuses_what_is_not_a_model():
    for bad in (None, "model_dir", torch.nn.Linear(2, 2)):
        with pytest.raises(MCError, match="transformers model"):
            mc_retrofit.convert(bad)


def test_api_load_refuses_a_model_object():
    model = tiny_model("mamba2")
    for fn in (mc_retrofit.load, mc_retrofit.load_base):
        with pytest.raises(MCError, match=r"takes a path.*mc_retrofit\.convert\(model"):
            fn(model)
        with pytest.raises(MCError, match="path"):
            fn(None)


BAD_RECIPES = {
    "a JSON list": b'[{"name": "x"}]',
    "a string mc": json.dumps({"perplexity": {"lengths": [32]}, "variants": [{"name": "v", "mc": "gated"}]}).encode(),
    "a binary file": b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe\xfd",
    "batch_size 0": json.dumps({"batch_size": 0, "perplexity": {"lengths": [32]}}).encode(),
    "batch_size four": json.dumps({"batch_size": "four", "perplexity": {"lengths": [32]}}).encode(),
    "passkey digits 0": json.dumps({"passkey": {"lengths": [64], "digits": 0}}).encode(),
    "multikey n_keys 0": json.dumps({"multikey": {"lengths": [64], "n_keys": 0}}).encode(),
    "name not a string": json.dumps({"name": 3, "perplexity": {"lengths": [32]}}).encode(),
    "an unknown variant field": json.dumps({"perplexity": {"lengths": [32]},
                                            "variants": [{"name": "v", "mc": {"top_k": 0}}]}).encode(),
}


@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
def test_bad_recipes_are_refused_before_any_model_loads(orig, tmp_path, monkeypatch, case):
    import mc_retrofit.eval as ev

    def no_evaluation(opts):
        raise AssertionError("the recipe reached the evaluation")

    monkeypatch.setattr(ev, "evaluate", no_evaluation)
    (tmp_path / "bad.json").write_bytes(BAD_RECIPES[case])
    clear_error(run("eval", orig, "--recipe", tmp_path / "bad.json"), "bad.json")


def test_device_cuda_without_cuda_is_refused(orig, monkeypatch):
    import mc_retrofit.eval as ev

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(ev, "evaluate", lambda opts: pytest.fail("reached the evaluation"))
    clear_error(run("eval", orig, "--device", "cuda"), "cuda", "--device cpu")
    clear_error(run("eval", orig, "--device", "cuda:1"), "cuda")
    clear_error(run("eval", orig, "--device", "gpu0"), "--device")


def test_missing_tokenizer_path_is_refused(orig, tmp_path, monkeypatch):
    import mc_retrofit.eval as ev

    monkeypatch.setattr(ev, "evaluate", lambda opts: pytest.fail("reached the evaluation"))
    for missing in (tmp_path / "nope", "data/tok", "./tok"):
        clear_error(run("eval", orig, "--tokenizer", missing), str(missing), "does not exist")


def test_transformers_load_report_is_silenced(orig, tmp_path):
    """transformers logs a table of missing/unexpected keys at warning level; the one-line
    error says it all, so the table must not be logged first."""
    import shutil

    bad = tmp_path / "more"
    shutil.copytree(orig, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers")  # transformers' loggers do not propagate to root
    logger.addHandler(handler)
    try:
        more = run("convert", bad, "--out", tmp_path / "o")
        # a tensor of the wrong shape: refused by name, also without the table
        (bad / "config.json").write_text(json.dumps({**cfg, "vocab_size": 80}))
        wrong = run("convert", bad, "--out", tmp_path / "o")
    finally:
        logger.removeHandler(handler)
    assert not [r for r in records if "LOAD REPORT" in r.getMessage()]
    clear_error(more, "3 layers", "2")
    clear_error(wrong, "backbone.embeddings.weight", "(64, 32)", "(80, 32)")


def test_tampered_export_is_checked_before_building(tmp_path, monkeypatch):
    from transformers import Mamba2ForCausalLM

    path = _exported(tmp_path)
    _rewrite_metadata(path, hf_config=_with_hf(num_hidden_layers=100_000))
    built = []
    init = Mamba2ForCausalLM.__init__
    monkeypatch.setattr(Mamba2ForCausalLM, "__init__", lambda self, *a, **k: (built.append(1), init(self, *a, **k))[1])
    with pytest.raises(MCError, match="100000 layers") as e:
        mc_retrofit.load(path)
    assert "2" in str(e.value) and not built
    clear_error(run("inspect", path), "100000 layers")  # inspect costs configs, but not a config of other weights
    # same layer count, a tensor of another shape: named, before anything real is allocated
    (tmp_path / "v").mkdir()
    path = _exported(tmp_path / "v")
    _rewrite_metadata(path, hf_config=_with_hf(vocab_size=50_000))
    with pytest.raises(MCError, match=r"backbone.embeddings.weight.*\(64, 32\).*\(50000, 32\)"):
        mc_retrofit.load(path)


def test_export_of_another_format_version_says_so(tmp_path):
    path = _exported(tmp_path)
    _rewrite_metadata(path, mc_retrofit="mc-retrofit/2")
    with pytest.raises(MCError, match="mc-retrofit/2.*upgrade") as e:
        mc_retrofit.load(path)
    assert "no mc_retrofit metadata" not in str(e.value)
    clear_error(run("inspect", path), "mc-retrofit/2", "upgrade")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    del meta["mc_retrofit"]
    save_file(load_file(str(path)), str(path), metadata=meta)
    with pytest.raises(MCError, match="not exported by mc-retrofit"):
        mc_retrofit.load(path)


"""Checkpoints as published in mamba_ssm's own format (state-spaces/mamba2-130m, mamba-130m:
no ``-hf``), and pickle weight files, which are only ever read with ``weights_only``.

The mamba_ssm folders are written here by hand from transformers' converters
(``convert_mamba2_ssm_checkpoint_to_pytorch.py``, ``convert_mamba_ssm_checkpoint_to_pytorch.py``:
mamba_ssm names the embedding ``backbone.embedding``, everything else as transformers; the
config is mamba_ssm's ``MambaConfig``), independently of mc_retrofit's mapping; the oracle is
the tiny transformers model whose weights they hold."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_model

import mc_retrofit as mr
from mc_retrofit.checkpoints import open_checkpoint
from mc_retrofit.cli import main
from mc_retrofit.errors import MCError

MC = mr.MCConfig(segment_size=4, aggregation="soup", cache_weight=0.5)
GPT_NEOX = "EleutherAI/gpt-neox-20b"

# The tiny models, and the mamba_ssm config.json each one is (by hand: mamba_ssm's field names;
# vocab 60 padded to a multiple of 16 is the embedding's 64 rows).
CASES = {
    "mamba2": (dict(vocab_size=64, tie_word_embeddings=True),
               {"d_model": 32, "d_intermediate": 0, "n_layer": 2, "vocab_size": 60,
                "ssm_cfg": {"layer": "Mamba2", "d_state": 8, "headdim": 16, "ngroups": 2, "chunk_size": 8},
                "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True,
                "fused_add_norm": True, "pad_vocab_size_multiple": 16, "tie_embeddings": True}),
    "mamba": (dict(vocab_size=64, tie_word_embeddings=False),
              {"d_model": 32, "n_layer": 2, "vocab_size": 64, "ssm_cfg": {"d_state": 8}, "rms_norm": True,
               "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8,
               "tie_embeddings": False}),
}
IDS = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def _mamba_ssm_name(name: str) -> str:
    old = "backbone.embeddings."
    return "backbone.embedding." + name[len(old):] if name.startswith(old) else name


def write_mamba_ssm(model, directory, config: dict):
    directory.mkdir(parents=True)
    names = {_mamba_ssm_name(k): v for k, v in model.state_dict().items()}
    assert "backbone.embedding.weight" in names and "lm_head.weight" in names  # mamba_ssm's state dict has both
    torch.save(names, directory / "pytorch_model.bin")
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module", params=sorted(CASES))
def foreign(request, tmp_path_factory):
    family = request.param
    overrides, config = CASES[family]
    model = tiny_model(family, **overrides)
    return family, model, write_mamba_ssm(model, tmp_path_factory.mktemp(family) / "ssm", config)


def _one_line(e) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


def test_mamba_ssm_config_is_recognised(foreign):
    family, model, path = foreign
    c = open_checkpoint(path)
    assert (c.kind, c.format, c.tokenizer_hint) == ("original", "mamba_ssm", GPT_NEOX)
    assert mr.adapters.adapter_for(c.hf_config).family == family
    fields = ["hidden_size", "num_hidden_layers", "vocab_size", "state_size", "expand", "conv_kernel",
              "tie_word_embeddings", "residual_in_fp32", "use_bias", "use_conv_bias", "layer_norm_epsilon"]
    fields += ["num_heads", "head_dim", "n_groups", "chunk_size"] if family == "mamba2" else \
        ["intermediate_size", "time_step_rank"]
    assert {f: getattr(c.hf_config, f) for f in fields} == {f: getattr(model.config, f) for f in fields}
    # a tokenizer of its own wins over the one the format implies
    (path / "tokenizer.json").write_text("{}")
    try:
        assert open_checkpoint(path).tokenizer_hint is None
    finally:
        (path / "tokenizer.json").unlink()


def test_mamba_ssm_loads_exactly(foreign):
    _, model, path = foreign
    base = mr.load_base(path)
    assert torch.equal(logits(base), logits(model))
    assert {k: v.shape for k, v in base.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_mamba_ssm_convert_save_load_export_round_trip(foreign, tmp_path):
    _, _, path = foreign
    converted = mr.convert(mr.load_base(path), MC)
    want = logits(converted)
    mr.model.save_converted(converted, tmp_path / "conv")
    # transformers' own layout: safetensors and a config with model_type, no pickle
    assert (tmp_path / "conv" / "model.safetensors").is_file()
    assert not (tmp_path / "conv" / "pytorch_model.bin").exists()
    assert "model_type" in json.loads((tmp_path / "conv" / "config.json").read_text())
    assert open_checkpoint(tmp_path / "conv").format == "transformers"
    assert torch.equal(logits(mr.load(tmp_path / "conv")), want)
    mr.export(converted, tmp_path / "m.safetensors")
    assert torch.equal(logits(mr.load(tmp_path / "m.safetensors")), want)


def test_mamba_ssm_weights_as_safetensors(foreign, tmp_path):
    """The fix the unsafe-pickle refusal suggests: the same tensors as model.safetensors."""
    from safetensors.torch import save_file

    _, model, path = foreign
    target = tmp_path / "st"
    target.mkdir()
    shutil.copy(path / "config.json", target)
    tensors = torch.load(path / "pytorch_model.bin", weights_only=True)
    save_file({k: v.clone() for k, v in tensors.items()}, str(target / "model.safetensors"))
    assert torch.equal(logits(mr.load_base(target)), logits(model))


# state-spaces/<name>/config.json as published (mamba_ssm's MambaConfig: d_model, n_layer, ssm_cfg,
# pad_vocab_size_multiple; vocab 50277), against the transformers configs of the same models in
# tests/published_configs (the -hf conversions, or transformers' converter applied by hand).
PUBLISHED = {"mamba2-130m": (768, 24, {"layer": "Mamba2"}, 16), "mamba2-1.3b": (2048, 48, {"layer": "Mamba2"}, 16),
             "mamba2-2.7b": (2560, 64, {"layer": "Mamba2"}, 16), "mamba-130m": (768, 24, {}, 8),
             "mamba-1.4b": (2048, 48, {}, 8), "mamba-2.8b": (2560, 64, {}, 8)}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_mamba_ssm_configs_translate_as_transformers_does(tmp_path, name):
    from conftest import ROOT

    d_model, n_layer, ssm_cfg, multiple = PUBLISHED[name]
    published = {"d_model": d_model, "n_layer": n_layer, "vocab_size": 50277, "ssm_cfg": ssm_cfg, "rms_norm": True,
                 "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": multiple}
    if ssm_cfg:  # the Mamba2 repos also write the hybrid fields, empty, and tie_embeddings
        published.update(d_intermediate=0, attn_layer_idx=[], attn_cfg={}, tie_embeddings=True)
    (tmp_path / "config.json").write_text(json.dumps(published))
    want = json.loads((ROOT / "tests" / "published_configs" / f"{name}.json").read_text())
    got = open_checkpoint(tmp_path).hf_config
    assert got.model_type == want["model_type"]
    skip = {"_source", "model_type", "architectures", "norm_before_gate"}  # not Mamba2Config fields
    assert {k: getattr(got, k) for k in want if k not in skip} == {k: v for k, v in want.items() if k not in skip}


@pytest.mark.parametrize("change, says", [
    ({"attn_layer_idx": [1]}, "attention layers"),
    ({"rms_norm": False}, "LayerNorm"),
    ({"d_intermediate": 64}, "MLP"),
    ({"ssm_cfg": {"layer": "Mamba2", "D_has_hdim": True}}, "D_has_hdim"),
    ({"ssm_cfg": {"layer": "Mamba2", "headdim": 24}}, "headdim"),
    ({"ssm_cfg": {"layer": "Mamba2", "mystery": 1}}, "mystery"),
    ({"n_layer": "two"}, "n_layer"),
])
def test_mamba_ssm_config_it_cannot_express_is_refused(tmp_path, change, says):
    config = {**CASES["mamba2"][1], **change}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(MCError) as e:
        open_checkpoint(tmp_path)
    assert says in _one_line(e) and "mamba_ssm" in str(e.value)


def test_mamba_ssm_weights_that_do_not_fit_are_refused_before_building(foreign, tmp_path):
    family, _, path = foreign
    d = tmp_path / "d"
    shutil.copytree(path, d)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "n_layer": 3}))
    with pytest.raises(MCError) as e:
        mr.load_base(d)
    assert "asks for 3 layers but the weights hold 2" in _one_line(e)
    (d / "pytorch_model.bin").unlink()
    with pytest.raises(MCError) as e:
        mr.load_base(d)
    assert "has no weights" in _one_line(e)


def test_config_of_no_known_format_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden": 3}))
    with pytest.raises(MCError) as e:
        open_checkpoint(tmp_path)
    assert "no model_type" in _one_line(e) and "mamba_ssm (mamba2)" in str(e.value)


# -- pickles: weights_only, nothing else ------------------------------------------------
BUILT: list = []  # every Payload unpickled (a safe load builds none)


class Payload:
    """A non-tensor object: unpickling it (with weights_only=False) runs __setstate__."""

    def __init__(self):
        self.note = "built"  # a state to set: pickle calls __setstate__ only with one

    def __setstate__(self, state):
        BUILT.append(state)


class Mkdir:
    """A pickle that calls os.mkdir(path) when unpickled: code, not data."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def _transformers_dir_with(tmp_path, extra, name="evil"):
    model = tiny_model("mamba2")
    model.save_pretrained(tmp_path / "tmp")
    d = tmp_path / name
    d.mkdir()
    shutil.copy(tmp_path / "tmp" / "config.json", d)
    torch.save({**model.state_dict(), **extra}, d / "pytorch_model.bin")
    return d, model


@pytest.mark.parametrize("kind", ["reduce", "instance", "foreign-format"])
def test_pickle_with_code_is_refused_and_nothing_runs(tmp_path, kind):
    marker = tmp_path / "marker"
    if kind == "foreign-format":
        model = tiny_model("mamba2", **CASES["mamba2"][0])
        d = write_mamba_ssm(model, tmp_path / "ssm", CASES["mamba2"][1])
        sd = torch.load(d / "pytorch_model.bin", weights_only=True)
        torch.save({**sd, "x": Mkdir(marker)}, d / "pytorch_model.bin")
    else:
        d, model = _transformers_dir_with(tmp_path, {"x": Mkdir(marker) if kind == "reduce" else Payload()})
    BUILT.clear()
    # the oracle: an unsafe load of this file does run its code
    unsafe = tmp_path / "unsafe.bin"
    shutil.copy(d / "pytorch_model.bin", unsafe)
    torch.load(unsafe, weights_only=False)
    assert marker.is_dir() or BUILT
    if marker.is_dir():
        marker.rmdir()
    BUILT.clear()

    with pytest.raises(MCError) as e:
        mr.load_base(d)
    assert "holds Python objects besides tensors; it is not loaded (unsafe)" in _one_line(e)
    assert "safetensors" in str(e.value)
    r = CliRunner().invoke(main, ["convert", str(d), "--out", str(tmp_path / "out")])
    assert r.exit_code == 1 and "it is not loaded (unsafe)" in r.output
    assert len([ln for ln in r.output.splitlines() if ln.strip()]) == 1
    assert not marker.exists() and not BUILT and not (tmp_path / "out").exists()
    # the command the line gives, run as if its source were trusted, makes it loadable
    command = str(e.value).split("convert it to safetensors with ", 1)[1]
    assert command.startswith('python -c "') and command.endswith('"')
    exec(command[len('python -c "'):-1], {})  # noqa: S102 - the test's own file
    assert torch.equal(logits(mr.load_base(d)), logits(model))


@pytest.mark.parametrize("layout", ["zip", "legacy", "sharded"])
def test_transformers_folder_with_pickle_only_equals_safetensors_twin(tmp_path, monkeypatch, layout):
    model = tiny_model("mamba2")
    model.save_pretrained(tmp_path / "st")
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(tmp_path / "st" / "config.json", d)
    sd = model.state_dict()
    if layout == "sharded":  # transformers' index layout: pytorch_model-0000k-of-00002.bin
        names = sorted(sd)
        half = {"pytorch_model-00001-of-00002.bin": names[:5], "pytorch_model-00002-of-00002.bin": names[5:]}
        for file, keys in half.items():
            torch.save({k: sd[k] for k in keys}, d / file)
        (d / "pytorch_model.bin.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {k: f for f, keys in half.items() for k in keys}}))
    else:
        torch.save(sd, d / "pytorch_model.bin", _use_new_zipfile_serialization=layout == "zip")
    (d / "training_args.bin").write_bytes(b"not weights: never read")
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    c = open_checkpoint(d)
    assert (c.format, c.tokenizer_hint) == ("transformers", None)
    base = mr.load_base(d)
    assert calls and all(w is True for w in calls)  # every pickle read with weights_only
    twin = mr.load_base(tmp_path / "st")
    assert torch.equal(logits(base), logits(twin)) and torch.equal(logits(base), logits(model))
    assert all(torch.equal(v, twin.state_dict()[k]) for k, v in base.state_dict().items())


def test_broken_pickle_is_one_line(tmp_path):
    d, _ = _transformers_dir_with(tmp_path, {})
    raw = (d / "pytorch_model.bin").read_bytes()
    (d / "pytorch_model.bin").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(MCError) as e:
        mr.load_base(d)
    assert "not a readable PyTorch weight file" in _one_line(e)


def test_pickle_that_is_not_a_state_dict_is_refused(tmp_path):
    d, _ = _transformers_dir_with(tmp_path, {})
    torch.save({"model": torch.load(d / "pytorch_model.bin", weights_only=True)}, d / "pytorch_model.bin")
    with pytest.raises(MCError) as e:
        mr.load_base(d)
    assert "not a state dict" in _one_line(e)


# -- the CLI ----------------------------------------------------------------------------
def test_cli_inspect_and_convert_a_mamba_ssm_folder(foreign, tmp_path, monkeypatch):
    from mc_retrofit import checkpoints

    family, _, path = foreign
    runner = CliRunner()
    # as a Hub id too (the one Hub hook pointed at the folder, as a download would give it)
    monkeypatch.setattr(checkpoints, "resolve_hub", lambda repo, revision=None, **hub: path)
    for spec in (str(path), f"state-spaces/{family}-tiny"):
        r = runner.invoke(main, ["inspect", spec, "--json"])
        assert r.exit_code == 0, r.output
        d = json.loads(r.output)
        assert d["family"] == family and d["num_layers"] == 2
    assert open_checkpoint(f"state-spaces/{family}-tiny").tokenizer_hint == GPT_NEOX
    r = runner.invoke(main, ["convert", str(path), "--out", str(tmp_path / "out"), "--segment-size", "4"])
    assert r.exit_code == 0, r.output
    assert f"({family}, 2 MC layers" in r.output
    loaded = mr.load(tmp_path / "out")
    assert loaded.mc.config.segment_size == 4
    assert torch.equal(logits(loaded), logits(mr.convert(mr.load_base(path), loaded.mc.config)))

"""``open_checkpoint``: every kind of path recognised, every non-checkpoint refused in one
line, and every command asks it (a Hub id resolved in its one place reaches them all).

(``test_checkpoints.py`` is about the committed checkpoints; this is about paths.)"""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from conftest import tiny_model

import mc_retrofit as mr
from mc_retrofit import checkpoints
from mc_retrofit.builtin import ROOT as BUILTIN_ROOT
from mc_retrofit.checkpoints import Checkpoint, open_checkpoint
from mc_retrofit.cli import main
from mc_retrofit.errors import MCError

MC = mr.MCConfig(segment_size=8, aggregation="soup", cache_weight=0.5)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("kinds")
    base = tiny_model("mamba2", vocab_size=256)
    base.save_pretrained(root / "orig")
    model = mr.convert(mr.load_base(root / "orig"), MC)
    mr.model.save_converted(model, root / "conv")
    mr.export(model, root / "M.SAFETENSORS")  # an upper-case suffix is still an exported file
    return {"orig": root / "orig", "conv": root / "conv", "file": root / "M.SAFETENSORS", "config": base.config}


def _same_config(got, want):
    drop = {"transformers_version", "_name_or_path"}  # where it was read from, and by which version
    return {k: v for k, v in got.to_dict().items() if k not in drop} == \
        {k: v for k, v in want.to_dict().items() if k not in drop}


def _one_line(e) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


def test_original_directory(paths):
    c = open_checkpoint(paths["orig"])
    assert (c.kind, c.converted, c.exported, c.origin, c.mc_config) == ("original", False, False, "local", None)
    assert c.path == paths["orig"] and c.source_dir == paths["orig"]
    assert _same_config(c.hf_config, paths["config"])
    assert c.weight_files == [paths["orig"] / "model.safetensors"]


def test_converted_directory(paths):
    c = open_checkpoint(paths["conv"])
    assert (c.kind, c.converted, c.exported) == ("converted", True, False)
    # the saved config is what convert recorded: the given options plus the family, and the
    # family's defaults for the knobs left unset (Mamba2's online bias: 0)
    assert MC.online_bias is None
    assert c.mc_config == mr.MCConfig.from_dict({**MC.to_dict(), "family": "mamba2", "online_bias": 0.0})
    assert json.loads((paths["conv"] / "mc_config.json").read_text()) == c.mc_config.to_dict()
    assert _same_config(c.hf_config, paths["config"])
    assert [p.name for p in c.weight_files] == ["model.safetensors"]  # the gates are not weights


def test_exported_file_with_an_upper_case_suffix(paths):
    c = open_checkpoint(str(paths["file"]))
    assert (c.kind, c.converted, c.exported, c.source_dir) == ("exported", True, True, None)
    assert c.mc_config == open_checkpoint(paths["conv"]).mc_config
    assert _same_config(c.hf_config, paths["config"])
    assert c.weight_files == [paths["file"]]


def test_builtin():
    c = open_checkpoint("builtin:mamba2-byte")
    assert (c.kind, c.origin, c.path) == ("original", "builtin", BUILTIN_ROOT / "mamba2-byte")
    want = json.loads((BUILTIN_ROOT / "mamba2-byte" / "config.json").read_text())
    assert c.hf_config.model_type == want["model_type"] and c.hf_config.hidden_size == want["hidden_size"]
    assert open_checkpoint("builtin:").path == c.path  # builtin: alone is the default
    with pytest.raises(MCError, match="no builtin checkpoint 'nope'"):
        open_checkpoint("builtin:nope")


def test_a_checkpoint_opens_as_itself(paths):
    c = open_checkpoint(paths["conv"])
    assert open_checkpoint(c) is c and isinstance(c, Checkpoint)


@pytest.mark.parametrize("spec", ["some-org/some-model", "some-org/some-model@v1.0", "org/name@0123abc"])
def test_a_hub_id_that_is_nowhere(spec, tmp_path, monkeypatch):
    """Not on disk, not in the (empty) Hugging Face cache, offline: one line (tests/test_hub.py
    has the Hub ids that resolve)."""
    monkeypatch.chdir(tmp_path)  # nothing by that name here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(MCError) as e:
        open_checkpoint(spec)
    text = _one_line(e)
    assert "is not in the Hugging Face cache" in text and spec in text and "does not exist" in text
    # the CLI says the same, in one line
    r = CliRunner().invoke(main, ["inspect", spec])
    assert r.exit_code == 1 and r.output.strip().count("\n") == 0 and "is not in the Hugging Face cache" in r.output


def test_a_local_path_wins_over_a_hub_id(paths, tmp_path, monkeypatch):
    import shutil

    shutil.copytree(paths["orig"], tmp_path / "org" / "name")
    monkeypatch.chdir(tmp_path)
    c = open_checkpoint("org/name")
    assert (c.kind, c.origin) == ("original", "local")


def test_what_is_no_checkpoint_is_refused_in_one_line(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("hi")
    with pytest.raises(MCError) as e:
        open_checkpoint(tmp_path / "d")
    assert "has no config.json: not a Hugging Face-format model directory" in _one_line(e)
    with pytest.raises(MCError) as e:
        open_checkpoint(tmp_path / "missing")
    assert _one_line(e).endswith("does not exist")  # an absolute path is never taken for a Hub id
    with pytest.raises(MCError) as e:
        open_checkpoint(tmp_path / "d" / "notes.txt")
    assert "not a .safetensors file exported by mc-retrofit" in _one_line(e)
    with pytest.raises(MCError, match="expected a path"):
        open_checkpoint(42)


def test_export_metadata_is_read_once_per_load(paths, monkeypatch):
    calls = []
    real = checkpoints.export_metadata
    monkeypatch.setattr(checkpoints, "export_metadata", lambda p: calls.append(p) or real(p))
    mr.load(paths["file"])
    assert calls == [paths["file"]]
    calls.clear()
    mr.describe(paths["file"])
    assert calls == [paths["file"]]


def test_load_and_load_base_refuse_the_other_kind(paths):
    with pytest.raises(MCError, match="is an original checkpoint, not a converted one"):
        mr.load(paths["orig"])
    with pytest.raises(MCError, match=r"exported mc-retrofit file.*mc_retrofit\.load"):
        mr.load_base(paths["file"])


def test_every_command_resolves_a_hub_id_in_one_place(paths, tmp_path, monkeypatch):
    """Point the one Hub hook at local folders: load, load_base, describe and every command
    then take a Hub id, so none of them decides what a path is on its own."""
    where = {"org/orig": paths["orig"], "org/conv": paths["conv"]}
    monkeypatch.setattr(checkpoints, "resolve_hub", lambda repo, revision=None, **hub: where[repo])
    monkeypatch.chdir(tmp_path)
    assert open_checkpoint("org/conv@main").origin == "hub"
    assert mr.load_base("org/orig").config.model_type == "mamba2"
    assert mr.load("org/conv").mc.config == open_checkpoint(paths["conv"]).mc_config
    assert mr.describe("org/conv").converted and not mr.describe("org/orig").converted

    def ok(*args):
        r = CliRunner().invoke(main, [str(a) for a in args])
        assert r.exit_code == 0, r.output
        return r.output

    assert "mamba2" in ok("inspect", "org/orig")
    ok("convert", "org/orig", "--out", tmp_path / "c", "--segment-size", "8")
    assert open_checkpoint(tmp_path / "c").kind == "converted"
    ok("export", "org/conv", "--out", tmp_path / "e.safetensors")
    assert open_checkpoint(tmp_path / "e.safetensors").kind == "exported"
    ok("generate", "org/conv", "--prompt", "ab", "--max-new-tokens", "2")
    (tmp_path / "t.txt").write_text("the quick brown fox jumps over the lazy dog. " * 8)
    ok("finetune", "org/conv", "--data", tmp_path / "t.txt", "--out", tmp_path / "f", "--steps", "1",
       "--seq-len", "16", "--batch", "1", "--warmup", "0", "--eval-every", "0")
    assert open_checkpoint(tmp_path / "f").kind == "converted"

    from mc_retrofit.eval.variants import ModelSource

    source = ModelSource("org/conv")
    assert source.converted and not source.exported and source.own_config() == open_checkpoint(paths["conv"]).mc_config

"""The command line as a user runs it: normal flows, and bad input giving one-line errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_model

import mc_retrofit
from mc_retrofit.cli import main


@pytest.fixture(scope="module")
def orig(tmp_path_factory):
    d = tmp_path_factory.mktemp("m") / "orig"
    tiny_model("mamba2").save_pretrained(d)
    return d


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result, *needles):
    assert result.exit_code != 0, result.output
    text = result.output.strip()
    assert "Traceback" not in text
    lines = [l for l in text.splitlines() if l.strip()]
    assert len(lines) == 1 or lines[0].startswith("Usage:"), text
    for n in needles:
        assert n.lower() in text.lower(), (n, text)


def test_convert_inspect_export_flow(orig, tmp_path):
    out = tmp_path / "conv"
    r = run("convert", orig, "--out", out, "--segment-size", 4, "--aggregation", "soup", "--layers", "1")
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "mc_config.json").read_text())
    assert (cfg["aggregation"], cfg["segment_size"], cfg["layers"], cfg["family"]) == ("gated", 4, [1], "mamba2")
    r = run("inspect", out, "--json")
    assert r.exit_code == 0 and json.loads(r.output)["segments_per_1k"] == 256
    r = run("inspect", out)
    assert r.exit_code == 0 and "cache bytes per 1K tokens" in r.output
    r = run("export", out, "--out", tmp_path / "m.safetensors")
    assert r.exit_code == 0, r.output
    a, b = mc_retrofit.load(out), mc_retrofit.load(tmp_path / "m.safetensors")
    x = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        assert torch.equal(a(x).logits, b(x).logits)


def test_builtin_default_converts(tmp_path):
    r = run("convert", "builtin:mamba2-byte", "--out", tmp_path / "c", "--segment-size", 128)
    assert r.exit_code == 0, r.output
    assert mc_retrofit.load(tmp_path / "c").mc.config.segment_size == 128


def test_no_overwrite_without_force(orig, tmp_path):
    out = tmp_path / "conv"
    assert run("convert", orig, "--out", out).exit_code == 0
    before = (out / "mc_config.json").read_text()
    one_line_error(run("convert", orig, "--out", out, "--segment-size", 9), "already exists", "--force")
    assert (out / "mc_config.json").read_text() == before
    assert run("convert", orig, "--out", out, "--segment-size", 9, "--force").exit_code == 0
    assert json.loads((out / "mc_config.json").read_text())["segment_size"] == 9
    assert [p.name for p in tmp_path.iterdir()] == ["conv"]  # no temporary leftovers


def test_missing_path(tmp_path):
    one_line_error(run("convert", tmp_path / "nope", "--out", tmp_path / "o"), "does not exist")
    assert not (tmp_path / "o").exists()


def test_not_a_model_dir(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("hi")
    one_line_error(run("convert", tmp_path / "d", "--out", tmp_path / "o"), "config.json")


def test_broken_config_json(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text("{not json")
    one_line_error(run("convert", tmp_path / "d", "--out", tmp_path / "o"), "not valid JSON")


def test_non_recurrent_model(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32)).save_pretrained(tmp_path / "gpt2")
    one_line_error(run("convert", tmp_path / "gpt2", "--out", tmp_path / "o"), "gpt2", "not a recurrent family")
    assert not (tmp_path / "o").exists()


def test_corrupted_safetensors(orig, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(orig, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    one_line_error(run("convert", bad, "--out", tmp_path / "o"), "corrupt")
    assert not (tmp_path / "o").exists()
    (bad / "model.safetensors").write_bytes(b"\x00" * 64)
    one_line_error(run("convert", bad, "--out", tmp_path / "o"), "corrupt")


def test_missing_weights(orig, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(orig, bad)
    (bad / "model.safetensors").unlink()
    one_line_error(run("convert", bad, "--out", tmp_path / "o"), "no weights")


def test_corrupted_gates_and_export(orig, tmp_path):
    out = tmp_path / "conv"
    assert run("convert", orig, "--out", out).exit_code == 0
    (out / "mc_gates.safetensors").write_bytes(b"garbage")
    one_line_error(run("export", out, "--out", tmp_path / "m.safetensors"), "mc_gates.safetensors", "corrupt")
    assert not (tmp_path / "m.safetensors").exists()
    (tmp_path / "x.safetensors").write_bytes(b"garbage")
    one_line_error(run("inspect", tmp_path / "x.safetensors"), "corrupt")


@pytest.mark.parametrize("args,needle", [
    (["--aggregation", "mean"], "invalid value"),
    (["--segment-size", "0"], "invalid value"),
    (["--layers", "a,b"], "comma-separated"),
    (["--layers", "7"], "do not exist"),
    (["--top-k", "-1"], "invalid value"),
])
def test_bad_options(orig, tmp_path, args, needle):
    one_line_error(run("convert", orig, "--out", tmp_path / "o", *args), needle)
    assert not (tmp_path / "o").exists()


def test_export_of_unconverted_dir(orig, tmp_path):
    one_line_error(run("export", orig, "--out", tmp_path / "m.safetensors"), "not a converted", "mc-retrofit convert")


def test_console_script_end_to_end(orig, tmp_path):
    """The installed entry point, in a real process: one line on stderr, exit 1."""
    exe = [sys.executable, "-m", "mc_retrofit"]
    p = subprocess.run(exe + ["convert", str(tmp_path / "missing"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, env={**os.environ, "MC_RETROFIT_DEBUG": ""})
    assert p.returncode == 1 and p.stderr.strip().count("\n") == 0 and "does not exist" in p.stderr


def test_outputs_get_the_usual_permissions(tmp_path):
    """Temporary siblings are private (mkdtemp/mkstemp); the renamed outputs must not be."""
    import os

    from mc_retrofit.files import atomic_dir, atomic_file

    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "d") as d:
            (d / "f").write_text("x")
        with atomic_file(tmp_path / "f.safetensors") as f:
            f.write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "f.safetensors").stat().st_mode & 0o777 == 0o644

"""What mc-retrofit promises about the files it writes, under careless or hostile use.

Nothing the user has is ever lost, and no output is ever half-written:

- D1  ``--out`` is never the current directory or one of its parents, with or without ``--force``.
- D2  ``--force`` replaces only an earlier mc-retrofit output of the same kind (its marker file
      ``.mc-retrofit.json``, or an exported file's metadata, says so), and only when that output
      holds no file mc-retrofit did not write; any other existing folder or file is refused.
- D3  ``--out`` is never the source checkpoint, nor a folder that contains it.
- D4  the same holds for ``export``, to a directory and to a file.
- D5  ``eval`` without ``--force`` never touches an existing folder, even one without results.json.
- D6-D8  two ``convert``, ``export`` or ``eval`` runs writing the same ``--out`` at once: the final
      rename is exclusive, so the run that finishes second fails with one line and the first
      one's output stays intact; the second's finished output is kept beside it (``NAME-2``),
      and the error says so. With ``--force`` the replacement is one atomic step. This also
      holds where the system has no exclusive rename (a lock file next to the target).
- D9  ``finetune`` without ``--resume`` does not overwrite an existing ``<out>.checkpoint``.
- W20 ``export`` treats the ``.safetensors`` suffix case-insensitively (``E.SAFETENSORS`` is a file).
- W22 every written file follows the umask, the weights included.
- A folder that cannot be written is reported before any work (before the evaluation), naming
  the folder, not a temporary file.

Every refusal is one line that says what to do.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_model

import mc_retrofit as mr
from mc_retrofit import files
from mc_retrofit.cli import main
from mc_retrofit.errors import MCError

WORDS = "the pass key river candle forest silver lantern meadow copper falcon willow morning evening".split()
# One short perplexity section and one variant: an evaluation of a second or two on one core.
RECIPE = {"name": "tiny", "batch_size": 2, "perplexity": {"lengths": [32], "windows": 1, "position_bucket": 16},
          "variants": [{"name": "g", "mc": {"segment_size": 16}}]}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("files")
    tiny_model("mamba2", vocab_size=256, chunk_size=32).save_pretrained(r / "orig")
    (r / "orig" / "notes.txt").write_text("the checkpoint's own notes")  # a file only the user has
    mr.model.save_converted(mr.convert(mr.load_base(r / "orig"), mr.MCConfig(segment_size=8)), r / "conv")
    rng = torch.Generator().manual_seed(0)
    (r / "book.txt").write_text(" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (600,), generator=rng).tolist()))
    (r / "recipe.json").write_text(json.dumps(RECIPE))
    return r


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def eval_args(root, out, *extra):
    return ["eval", root / "orig", "--recipe", root / "recipe.json", "--data", root / "book.txt", "--out", out,
            "--quiet", *extra]


def one_line_error(result, *needles):
    assert result.exit_code == 1, result.output
    lines = [x for x in result.output.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.output, result.output
    for n in needles:
        assert n.lower() in lines[0].lower(), (n, lines[0])
    return lines[0]


def snapshot(path: Path) -> dict:
    """Every file under ``path`` with its bytes (what must survive a refused run)."""
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_D1_force_refuses_the_current_directory_and_its_parents(root, tmp_path, monkeypatch):
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    (work / "sub" / "data.txt").write_text("mine too")
    before = snapshot(tmp_path)
    monkeypatch.chdir(work / "sub")
    for out in (".", "..", work, tmp_path):
        one_line_error(run("convert", root / "orig", "--out", out, "--force"), "current directory")
        one_line_error(run("export", root / "conv", "--out", out, "--force"), "current directory")
        one_line_error(run(*eval_args(root, out, "--force")), "current directory")
    assert snapshot(tmp_path) == before


def test_D2_force_refuses_a_folder_mc_retrofit_did_not_write(root, tmp_path):
    models = tmp_path / "models"
    (models / "other").mkdir(parents=True)
    (models / "other" / "model.safetensors").write_bytes(b"someone else's model")
    before = snapshot(models)
    for args in (("convert", root / "orig", "--out", models), ("export", root / "conv", "--out", models)):
        one_line_error(run(*args, "--force"), "not", "written by mc-retrofit", "another --out")
        one_line_error(run(*args), "not", "written by mc-retrofit")  # no advice to pass --force
    one_line_error(run(*eval_args(root, models, "--force")), "not", "written by mc-retrofit")
    assert snapshot(models) == before
    # An earlier output that has since gained a file of the user's is not replaced either ...
    conv = tmp_path / "conv"
    assert run("convert", root / "orig", "--out", conv).exit_code == 0
    (conv / "my-notes.txt").write_text("mine")
    one_line_error(run("convert", root / "orig", "--out", conv, "--force"), "my-notes.txt", "move them")
    assert (conv / "my-notes.txt").read_text() == "mine"
    # ... a folder of evaluation results is not a converted model ...
    ev = tmp_path / "ev"
    assert run(*eval_args(root, ev)).exit_code == 0
    one_line_error(run("convert", root / "orig", "--out", ev, "--force"), "not a converted model")
    # ... and a plain earlier output is replaced, in one step, leaving nothing behind.
    (conv / "my-notes.txt").unlink()
    assert run("convert", root / "orig", "--out", conv, "--force", "--segment-size", 9).exit_code == 0
    assert json.loads((conv / "mc_config.json").read_text())["segment_size"] == 9
    assert leftovers(tmp_path) == []


def test_D3_force_refuses_the_source_and_its_parents(root, tmp_path):
    src = tmp_path / "ckpt"
    shutil.copytree(root / "orig", src)
    before = snapshot(tmp_path)
    one_line_error(run("convert", src, "--out", src, "--force"), "source")
    one_line_error(run("convert", src, "--out", tmp_path, "--force"), "source")
    one_line_error(run("convert", src, "--out", src), "source")
    with pytest.raises(MCError, match="source"):  # the Python API too: save_pretrained onto its own checkpoint
        mr.convert(mr.load_base(src)).save_pretrained(src, force=True)
    assert snapshot(tmp_path) == before
    conv = tmp_path / "conv"
    shutil.copytree(root / "conv", conv)
    before = snapshot(conv)
    one_line_error(run("export", conv, "--out", conv, "--force"), "source")
    one_line_error(run(*eval_args(root, root / "orig", "--force")), "source")  # eval's MODEL
    one_line_error(run("eval", conv, "--recipe", root / "recipe.json", "--data", root / "book.txt", "--out", conv,
                       "--force"), "source")
    assert snapshot(conv) == before


def test_D4_export_force_refuses_what_mc_retrofit_did_not_write(root, tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    gates = tmp_path / "gates.safetensors"  # mc-retrofit's gate file is not an exported model
    shutil.copyfile(root / "conv" / "mc_gates.safetensors", gates)
    before = snapshot(tmp_path)
    for out in (folder, other, gates):
        one_line_error(run("export", root / "conv", "--out", out, "--force"), "not", "written by mc-retrofit")
    assert snapshot(tmp_path) == before
    exported = tmp_path / "m.safetensors"
    assert run("export", root / "conv", "--out", exported).exit_code == 0
    one_line_error(run("export", root / "conv", "--out", exported), "already exists", "--force")
    assert run("export", root / "conv", "--out", exported, "--force").exit_code == 0
    assert mr.load(exported).mc.config.segment_size == 8


def test_D5_eval_without_force_keeps_an_existing_folder(root, tmp_path):
    out = tmp_path / "ev"
    out.mkdir()
    (out / "results.md").write_text("my own notes")
    (out / "perplexity.png").write_bytes(b"my own plot")
    before = snapshot(out)
    one_line_error(run(*eval_args(root, out)), "not", "written by mc-retrofit")
    one_line_error(run(*eval_args(root, out, "--force")), "not", "written by mc-retrofit")
    assert snapshot(out) == before
    # An empty folder made for the results is fine (nothing in it to lose), and an earlier run's
    # results need --force.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(*eval_args(root, empty)).exit_code == 0
    assert (empty / "results.json").is_file() and (empty / "results.md").is_file()
    one_line_error(run(*eval_args(root, empty)), "already exists", "--force")
    assert run(*eval_args(root, empty, "--force")).exit_code == 0


# -- races: a slowed process reaches its final rename only after a second run has finished --
SLOWED = textwrap.dedent("""
    import pathlib, sys, time
    from mc_retrofit import files
    target, gate = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    commit = files._commit
    def slowed(tmp, out, *args, **kwargs):
        if pathlib.Path(out) == target:  # the final step of the output under test
            gate.with_name(gate.name + ".waiting").touch()
            end = time.time() + 300
            while not gate.exists() and time.time() < end:
                time.sleep(0.02)
        return commit(tmp, out, *args, **kwargs)
    files._commit = slowed
    from mc_retrofit.cli import main
    main(sys.argv[3:], prog_name="mc-retrofit")
""")


def race(tmp_path, target: Path, first: list, second: list) -> tuple[str, dict]:
    """Run ``first`` in another process, held just before its final rename; run ``second`` here
    to the end; then let the first go on. Returns the first's stderr and the target's files as
    the second left them."""
    gate = tmp_path / "gate"
    waiting = tmp_path / "gate.waiting"
    slow = subprocess.Popen([sys.executable, "-c", SLOWED, str(target), str(gate), *map(str, first)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env={**os.environ, "MC_RETROFIT_DEBUG": ""})
    try:
        end = time.time() + 300
        while not waiting.exists():
            if slow.poll() is not None:
                pytest.fail(f"the slowed run ended before its final rename: {slow.communicate()}")
            assert time.time() < end, "the slowed run never reached its final rename"
            time.sleep(0.05)
        fast = run(*second)
        assert fast.exit_code == 0, fast.output
        theirs = snapshot(target)
    finally:
        gate.touch()
        _, err = slow.communicate(timeout=300)
    assert slow.returncode == 1, err
    return err, theirs


def _assert_second_kept(err, theirs, target, kept):
    """The first run's output is as it left it; the slowed run's finished output is not thrown
    away either, but kept beside it under the next free name, which its one-line error names."""
    # transformers may print notices of its own first (slow kernel fallbacks): the error is one line, the last
    lines = [x for x in err.strip().splitlines() if x.strip() and not x.startswith("[transformers]")]
    assert len(lines) == 1 and lines[0].startswith("error:") and "appeared" in lines[0], err
    assert lines[0].endswith(f"kept at {kept}"), err
    assert snapshot(target) == theirs
    assert leftovers(target.parent) == []


def test_D6_racing_converts_keep_the_first_finished_output(root, tmp_path):
    out = tmp_path / "conv"
    err, theirs = race(tmp_path, out, ["convert", root / "orig", "--out", out, "--segment-size", 5],
                       ["convert", root / "orig", "--out", out, "--segment-size", 7])
    _assert_second_kept(err, theirs, out, tmp_path / "conv-2")
    assert json.loads((out / "mc_config.json").read_text())["segment_size"] == 7
    assert mr.load(tmp_path / "conv-2").mc.config.segment_size == 5


def test_D7_racing_exports_keep_the_first_finished_output(root, tmp_path):
    out = tmp_path / "m.safetensors"
    conv7 = tmp_path / "conv7"
    assert run("convert", root / "orig", "--out", conv7, "--segment-size", 7).exit_code == 0
    err, theirs = race(tmp_path, out, ["export", root / "conv", "--out", out], ["export", conv7, "--out", out])
    _assert_second_kept(err, theirs, out, tmp_path / "m-2.safetensors")
    assert mr.load(out).mc.config.segment_size == 7
    assert mr.load(tmp_path / "m-2.safetensors").mc.config.segment_size == 8


def test_D8_racing_evals_keep_the_first_finished_output(root, tmp_path):
    out = tmp_path / "ev"
    err, theirs = race(tmp_path, out, eval_args(root, out, "--seed", 1, "--no-plots"), eval_args(root, out, "--seed", 2))
    _assert_second_kept(err, theirs, out, tmp_path / "ev-2")
    assert json.loads((out / "results.json").read_text())["seed"] == 2 and (out / "perplexity.png").is_file()
    assert json.loads((tmp_path / "ev-2" / "results.json").read_text())["seed"] == 1


def test_D6_D8_without_an_exclusive_rename_a_lock_file_keeps_them_exclusive(tmp_path, monkeypatch):
    """Where renameat2/renamex_np are missing (or the filesystem refuses them): the same promises."""
    monkeypatch.setattr(files, "_native_rename", lambda src, dst, flag: False)
    out = tmp_path / "d"
    with pytest.raises(MCError, match="appeared"):
        with files.atomic_dir(out) as tmp:
            (tmp / "mine").write_text("mine")
            out.mkdir()
            (out / "theirs").write_text("theirs")
    assert snapshot(out) == {"theirs": b"theirs"} and (tmp_path / "d-2" / "mine").read_text() == "mine"
    f = tmp_path / "f.safetensors"
    with pytest.raises(MCError, match="appeared"):
        with files.atomic_file(f) as tmp:
            tmp.write_text("mine")
            f.write_text("theirs")
    assert f.read_text() == "theirs" and (tmp_path / "f-2.safetensors").read_text() == "mine"
    # --force still replaces an earlier output (moved aside, then dropped) ...
    with files.atomic_dir(tmp_path / "e") as tmp:
        (tmp / "old").write_text("old")
    with files.atomic_dir(tmp_path / "e", force=True) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(snapshot(tmp_path / "e")) == [".mc-retrofit.json", "new"]
    assert leftovers(tmp_path) == []
    # ... and a run that holds the lock keeps the others out; a stale lock is named in the error.
    monkeypatch.setattr(files, "LOCK_WAIT_S", 0.2)
    (tmp_path / ".g.tmp-lock").write_text("12345\n")
    with pytest.raises(MCError, match=r"\.g\.tmp-lock"):
        with files.atomic_dir(tmp_path / "g") as tmp:
            (tmp / "x").write_text("x")
    assert not (tmp_path / "g").exists() and (tmp_path / "g-2" / "x").read_text() == "x"


def test_D9_finetune_refuses_an_existing_checkpoint_without_resume(root, tmp_path):
    from mc_retrofit.finetune import checkpoint_dir, finetune

    out = tmp_path / "tuned"
    train = dict(steps=4, seq_len=32, batch=2, warmup=1, eval_every=2, progress=False, log=lambda s: None)
    model = mr.convert(mr.load_base(root / "orig"), mr.MCConfig(segment_size=8, cache_weight=0.0, gate_source="learned"))
    finetune(model, str(root / "book.txt"), out=out, stop_at=2, **train)
    ckpt = checkpoint_dir(out)
    before = snapshot(ckpt)
    assert "state.pt" in before
    args = ["finetune", root / "orig", "--data", root / "book.txt", "--out", out, "--steps", 4, "--seq-len", 32,
            "--batch", 2, "--warmup", 1, "--eval-every", 2, "--segment-size", 8]
    one_line_error(run(*args), "a checkpoint exists", str(ckpt), "--resume", "--force")
    assert snapshot(ckpt) == before and not out.exists()
    with pytest.raises(MCError, match="a checkpoint exists"):  # the Python API too
        finetune(mr.load(root / "conv"), str(root / "book.txt"), out=out, **train)
    r = run(*args, "--force")  # start over
    assert r.exit_code == 0, r.output
    assert (out / "mc_config.json").is_file() and not ckpt.exists()


@pytest.mark.parametrize("name", ["E.SAFETENSORS", "e.SafeTensors"])
def test_W20_export_suffix_is_case_insensitive(root, tmp_path, name):
    out = tmp_path / name
    r = run("export", root / "conv", "--out", out)
    assert r.exit_code == 0, r.output
    assert out.is_file()
    assert mr.load(out).mc.config.segment_size == 8


def test_W22_every_written_file_follows_the_umask(root, tmp_path):
    old = os.umask(0o022)
    try:
        assert run("convert", root / "orig", "--out", tmp_path / "conv").exit_code == 0
        assert run("export", tmp_path / "conv", "--out", tmp_path / "m.safetensors").exit_code == 0
        assert run(*eval_args(root, tmp_path / "ev")).exit_code == 0
    finally:
        os.umask(old)
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in tmp_path.rglob("*")}
    want = {k: oct(0o755 if (tmp_path / k).is_dir() else 0o644) for k in modes}
    assert modes == want


@pytest.fixture
def readonly_dir(tmp_path):
    """A folder this process cannot write in (root ignores permission bits: then /sys)."""
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    try:
        if not os.access(d, os.W_OK):
            yield d
        elif Path("/sys").is_dir() and not _writable(Path("/sys")):
            yield Path("/sys")
        else:
            pytest.skip("no read-only folder available to this user")
    finally:
        d.chmod(0o755)


def _writable(d: Path) -> bool:
    try:
        (d / ".mc-retrofit-probe").mkdir()
    except OSError:
        return False
    (d / ".mc-retrofit-probe").rmdir()
    return True


def test_a_readonly_out_is_refused_before_any_work(root, readonly_dir, monkeypatch):
    import mc_retrofit.eval as ev

    def no(*a, **k):
        raise AssertionError("the work started although --out cannot be written")

    monkeypatch.setattr(ev, "evaluate", no)
    monkeypatch.setattr(mr.model, "load_base", no)
    monkeypatch.setattr(mr.model, "load", no)
    for args in (eval_args(root, readonly_dir / "ev"), eval_args(root, readonly_dir / "a" / "b"),
                 ["convert", root / "orig", "--out", readonly_dir / "conv"],
                 ["export", root / "conv", "--out", readonly_dir / "m.safetensors"]):
        line = one_line_error(run(*args), "cannot write", str(readonly_dir), "writable")
        assert ".tmp-" not in line

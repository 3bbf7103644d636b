"""Hugging Face Hub ids (``org/name[@rev]``) wherever a path is accepted, without a network.

A Hugging Face hub cache is built on disk in huggingface_hub's own layout
(``models--org--name/{blobs,snapshots/<commit>,refs}``, snapshot files symlinked to their
blob) holding tiny models of three families; with HF_HUB_OFFLINE=1 every command then
runs by Hub id, and must give what the same command gives on the snapshot folder. A fake
Hub on loopback (the real huggingface_hub client against it) checks what is downloaded
and the one-line errors of a Hub that answers no, and of one that cannot be reached.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_model
from fla_oracles import tiny_fla_model

import mc_retrofit as mr
from mc_retrofit import hub
from mc_retrofit.checkpoints import open_checkpoint
from mc_retrofit.cli import main
from mc_retrofit.errors import MCError

WORDS = "the pass key river candle forest silver lantern meadow copper falcon willow morning evening".split()
FAMILIES = ["mamba2", "rwkv4", "gla"]


def commit_of(*parts) -> str:
    return hashlib.sha1("/".join(map(str, parts)).encode()).hexdigest()


def put_snapshot(cache: Path, repo: str, src: Path, commit: str, refs=("main",)) -> Path:
    """Lay ``src``'s files into ``cache`` as huggingface_hub does: each file's bytes in
    blobs/<sha256>, the snapshot's file a relative symlink to it, each ref naming the commit."""
    storage = cache / ("models--" + repo.replace("/", "--"))
    snap = storage / "snapshots" / commit
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / f.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (storage / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return snap


def tiny_tokenizer(text: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def _model(family: str, seed: int = 0, vocab_size: int = 256):
    if family == "gla":
        return tiny_fla_model("gla", seed=seed, vocab_size=vocab_size)
    return tiny_model(family, seed=seed, vocab_size=vocab_size, **({"chunk_size": 16} if family == "mamba2" else {}))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The cache: org/<family> for each family (gla ships a tokenizer), org/mamba2 at two
    commits (main, and tag v2 with other weights), a config-only repo, a tokenizer-only repo."""
    root = tmp_path_factory.mktemp("hub")
    cache = root / "cache"
    rng = torch.Generator().manual_seed(0)
    text = " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (800,), generator=rng).tolist())
    (root / "book.txt").write_text(text)
    tok = tiny_tokenizer(text)
    snaps, models = {}, {}
    for family in FAMILIES:
        model = _model(family, vocab_size=len(tok) if family == "gla" else 256)
        model.save_pretrained(root / "src" / family)
        if family == "gla":
            tok.save_pretrained(root / "src" / family)
        snaps[family] = put_snapshot(cache, f"org/{family}", root / "src" / family, commit_of(family))
        models[family] = model
    v2 = _model("mamba2", seed=1)
    v2.save_pretrained(root / "src" / "mamba2-v2")
    snaps["mamba2-v2"] = put_snapshot(cache, "org/mamba2", root / "src" / "mamba2-v2", commit_of("mamba2", 2),
                                      refs=("v2",))
    models["mamba2-v2"] = v2
    (root / "src" / "cfg").mkdir()
    shutil.copy(root / "src" / "mamba2" / "config.json", root / "src" / "cfg" / "config.json")
    snaps["cfg"] = put_snapshot(cache, "org/configonly", root / "src" / "cfg", commit_of("cfg"))
    tok.save_pretrained(root / "src" / "tok")
    snaps["tok"] = put_snapshot(cache, "org/tok", root / "src" / "tok", commit_of("tok"))
    return {"root": root, "cache": cache, "snaps": snaps, "models": models, "tok": tok, "book": root / "book.txt"}


@pytest.fixture
def offline(world, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(world["cache"]))
    return world


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(*args) -> str:
    """A command's stdout (huggingface_hub's download progress goes to stderr)."""
    r = run(*args)
    assert r.exit_code == 0, r.output
    return r.stdout


def one_line_error(result, *needles) -> str:
    """The one line a terminal shows: a progress bar that erased itself (carriage
    returns) is no line; one that stayed would be."""
    assert result.exit_code == 1, result.output
    shown = [x.rsplit("\r", 1)[-1] for x in result.output.split("\n")]
    lines = [x for x in shown if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for n in needles:
        assert n.lower() in lines[0].lower(), (n, lines[0])
    return lines[0]


def same_state(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# -- the offline cache ---------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_load_base_by_hub_id_is_the_snapshot(offline, family):
    snap = offline["snaps"][family]
    c = open_checkpoint(f"org/{family}")
    assert (c.origin, c.kind, c.path) == ("hub", "original", snap)
    by_id = mr.load_base(f"org/{family}")
    assert same_state(by_id, mr.load_base(snap))
    assert same_state(by_id, offline["models"][family])  # and that is the model that was saved


@pytest.mark.parametrize("family", FAMILIES)
def test_convert_and_inspect_by_hub_id(offline, family, tmp_path):
    out = tmp_path / "conv"
    assert f"converted org/{family}" in ok("convert", f"org/{family}", "--out", out, "--segment-size", 8)
    converted = mr.load(out)
    base = converted.state_dict()
    want = offline["models"][family].state_dict()
    assert all(torch.equal(base[k], want[k]) for k in want)  # the Hub model's weights, untouched
    if family == "gla":  # its tokenizer came along from the snapshot
        assert (out / "tokenizer.json").read_bytes() == (offline["snaps"][family] / "tokenizer.json").read_bytes()
        assert not (out / "tokenizer.json").is_symlink()  # a copy: pruning the cache cannot break the output
    by_id = json.loads(ok("inspect", f"org/{family}", "--json"))
    local = json.loads(ok("inspect", offline["snaps"][family], "--json"))
    assert {k: v for k, v in by_id.items() if k != "path"} == {k: v for k, v in local.items() if k != "path"}
    # a converted model on the Hub: mc_config.json and mc_gates.safetensors in the snapshot
    put_snapshot(offline["cache"], f"conv/{family}", out, commit_of("conv", family))
    assert json.loads(ok("inspect", f"conv/{family}", "--json"))["converted"]
    again = mr.load(f"conv/{family}")
    assert same_state(again, converted) and again.mc.config == converted.mc.config


def test_inspect_reads_only_the_config(offline, tmp_path):
    """A snapshot with config.json alone is enough for inspect; what needs weights says so."""
    assert json.loads(ok("inspect", "org/configonly", "--json"))["family"] == "mamba2"
    one_line_error(run("convert", "org/configonly", "--out", tmp_path / "o"), "no weights")
    assert not (tmp_path / "o").exists()


def test_eval_finetune_generate_by_hub_id(offline, tmp_path):
    snap, book = offline["snaps"]["mamba2"], offline["book"]
    common = ["--recipe", "smoke", "--only", "perplexity", "--data", book, "--quiet", "--no-plots", "--seed", 3]
    ok("eval", "org/mamba2", *common, "--out", tmp_path / "hub")
    ok("eval", snap, *common, "--out", tmp_path / "local")
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("hub", "local"))
    assert [r for r in a["records"]] == [r for r in b["records"]] and a["records"]
    gen = ["--prompt", "the river", "--max-new-tokens", 6]
    assert ok("generate", "org/mamba2", *gen) == ok("generate", snap, *gen)
    tuned = tmp_path / "ft"
    ok("finetune", "org/mamba2", "--data", book, "--out", tuned, "--steps", 2, "--seq-len", 24, "--batch", 1,
       "--warmup", 0, "--eval-every", 0, "--segment-size", 8)
    base = offline["models"]["mamba2"].state_dict()
    got = mr.load(tuned).state_dict()
    assert all(torch.equal(got[k], base[k]) for k in base)  # gates trained, the Hub model's weights kept


def test_generate_uses_the_tokenizer_of_the_snapshot(offline):
    gen = ["--prompt", "the pass key", "--max-new-tokens", 4]
    out = ok("generate", "org/gla", *gen)
    assert out == ok("generate", offline["snaps"]["gla"], *gen)
    ids = offline["tok"]("the pass key").input_ids
    model = offline["models"]["gla"]
    with torch.no_grad():
        want = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.strip() == offline["tok"].decode(want[0, len(ids):]).strip()


def test_revisions_by_at_and_by_option(offline):
    main_weights, v2 = offline["models"]["mamba2"], offline["models"]["mamba2-v2"]
    old, new = commit_of("mamba2"), commit_of("mamba2", 2)
    assert same_state(mr.load_base(f"org/mamba2@{new}"), v2)
    assert same_state(mr.load_base("org/mamba2@v2"), v2)
    assert same_state(mr.load_base("org/mamba2", revision="v2"), v2)
    assert same_state(mr.load_base(f"org/mamba2@{old}", revision="v2"), main_weights)  # @rev wins
    assert open_checkpoint("org/mamba2", revision=new).path == offline["snaps"]["mamba2-v2"]
    gen = ["--prompt", "the river", "--max-new-tokens", 8]
    want_v2, want_main = ok("generate", offline["snaps"]["mamba2-v2"], *gen), ok("generate", offline["snaps"]["mamba2"], *gen)
    assert want_v2 != want_main  # other weights, other text: the test can tell them apart
    assert ok("generate", "org/mamba2", "--revision", "v2", *gen) == want_v2
    assert ok("generate", f"org/mamba2@{old}", "--revision", "v2", *gen) == want_main


def test_cache_dir_option_and_hf_home(offline, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "nothing-here"))
    one_line_error(run("inspect", "org/gla"), "not in the hugging face cache", str(tmp_path / "nothing-here"))
    assert json.loads(ok("inspect", "org/gla", "--cache-dir", offline["cache"], "--json"))["family"] == "gla"
    assert open_checkpoint("org/gla", cache_dir=offline["cache"]).path == offline["snaps"]["gla"]
    shutil.copytree(offline["cache"], tmp_path / "home" / "hub", symlinks=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))  # HF_HOME/hub, as huggingface_hub reads it
    assert open_checkpoint("org/gla").path == tmp_path / "home" / "hub" / offline["snaps"]["gla"].relative_to(
        offline["cache"])


def test_hf_home_in_a_fresh_process(offline, tmp_path):
    """Set before the process starts, as a user does: huggingface_hub's own reading of the
    variables, not only ours."""
    shutil.copytree(offline["cache"], tmp_path / "home" / "hub", symlinks=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1")
    script = ("import json; from huggingface_hub import constants; from mc_retrofit import hub; "
              "from mc_retrofit.checkpoints import resolve_path; "
              "print(json.dumps([str(resolve_path('org/rwkv4')), constants.HF_HUB_CACHE, str(hub.cache_folder()), "
              "constants.HF_HUB_OFFLINE]))")
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    path, theirs, ours, offline_read = json.loads(r.stdout.strip().splitlines()[-1])
    home = tmp_path / "home" / "hub"
    assert path == str(home / offline["snaps"]["rwkv4"].relative_to(offline["cache"]))
    assert theirs == ours == str(home) and offline_read is True  # huggingface_hub and mc-retrofit agree


def test_missing_id_offline_is_one_line_and_writes_nothing(offline, tmp_path):
    text = one_line_error(run("convert", "org/nothing", "--out", tmp_path / "o"),
                          "org/nothing", "is not in the Hugging Face cache", "HF_HUB_OFFLINE=1",
                          "hf download org/nothing")
    assert str(offline["cache"]) in text
    assert not (tmp_path / "o").exists()
    with pytest.raises(MCError) as e:
        mr.load_base("org/nothing")
    assert "\n" not in str(e.value) and "does not exist locally" in str(e.value)
    assert not (offline["cache"] / "models--org--nothing").exists()
    one_line_error(run("inspect", "org/x--y"), "org/x--y does not exist locally", "not a valid Hugging Face Hub id")


def test_a_revision_that_is_not_cached(offline, tmp_path):
    missing = "f" * 40
    text = one_line_error(run("convert", f"org/mamba2@{missing}", "--out", tmp_path / "o"),
                          f"revision {missing} of org/mamba2 is not in the Hugging Face cache", "HF_HUB_OFFLINE=1",
                          f"hf download org/mamba2 --revision {missing}")
    assert "main" in text and "v2" in text and commit_of("mamba2") in text  # what is cached instead
    one_line_error(run("inspect", "org/mamba2", "--revision", "nobranch"), "revision nobranch of org/mamba2")
    assert not (tmp_path / "o").exists()


def test_an_auto_map_config_runs_no_code(offline, tmp_path):
    """A config naming remote code (auto_map) loads as the family's own class; the code in
    the snapshot never runs (nothing passes trust_remote_code)."""
    src = tmp_path / "src"
    shutil.copytree(offline["root"] / "src" / "mamba2", src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (src / "config.json").write_text(json.dumps(cfg))
    marker = tmp_path / "ran"
    (src / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nraise SystemExit('evil')\n")
    put_snapshot(offline["cache"], "org/evil", src, commit_of("evil"))
    model = mr.load_base("org/evil")
    assert type(model).__name__ == "Mamba2ForCausalLM" and same_state(model, offline["models"]["mamba2"])
    ok("inspect", "org/evil")
    ok("convert", "org/evil", "--out", tmp_path / "c")
    ok("generate", "org/evil", "--prompt", "ab", "--max-new-tokens", 2)
    assert not marker.exists()
    roots = [Path(mr.__file__).parent, *(Path(mr.__file__).parents[1] / d for d in ("adapters", "kernels"))]
    passing = re.compile(r"trust_remote_code\s*=\s*(?!False\b)")  # comments may name it; no code sets it
    offenders = [str(p) for r in roots for p in r.rglob("*.py") if passing.search(p.read_text())]
    assert offenders == []


# -- tokenizers ------------------------------------------------------------------
def test_resolve_tokenizer(offline, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    local = offline["root"] / "src" / "tok"
    assert hub.resolve_tokenizer(local) == local  # a folder stays as it is
    folder = hub.resolve_tokenizer("org/tok")
    assert folder == offline["snaps"]["tok"]
    assert hub.resolve_tokenizer(f"org/tok@{commit_of('tok')}", revision="nope") == folder
    text = "the silver falcon"
    assert AutoTokenizer.from_pretrained(str(folder))(text).input_ids == offline["tok"](text).input_ids
    with pytest.raises(MCError, match="is not in the Hugging Face cache"):
        hub.resolve_tokenizer("org/notok")
    with pytest.raises(MCError, match="no tokenizer files"):
        hub.resolve_tokenizer("org/configonly")
    with pytest.raises(MCError, match="does not exist"):
        hub.resolve_tokenizer(tmp_path / "nope")


def test_eval_takes_a_hub_tokenizer(offline, tmp_path, monkeypatch):
    """--tokenizer org/name is fetched (here: found in the cache) before the model loads;
    the evaluation gets the id, and resolves it with the same function."""
    import mc_retrofit.eval as ev

    def stop(opts):
        raise MCError(f"reached the evaluation with {opts.tokenizer} -> {hub.resolve_tokenizer(opts.tokenizer)}")

    monkeypatch.setattr(ev, "evaluate", stop)
    one_line_error(run("eval", offline["snaps"]["gla"], "--tokenizer", "org/tok", "--out", tmp_path / "o"),
                   f"reached the evaluation with org/tok -> {offline['snaps']['tok']}")
    r = run("eval", offline["snaps"]["gla"], "--tokenizer", "org/notok", "--out", tmp_path / "o2")
    one_line_error(r, "--tokenizer org/notok", "not in the Hugging Face cache")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o2").exists()


# -- a fake Hub on loopback: what is downloaded, and a Hub that says no -------------------
class FakeHub(ThreadingHTTPServer):
    """The few Hub endpoints snapshot_download uses (repo info, tree, resolve), serving
    ``repos`` ({repo: {file: bytes}}, one commit each, at main); ``gated`` repos refuse
    their files; every file served is recorded in ``served``."""

    daemon_threads = True

    def __init__(self, repos: dict, gated=()):
        super().__init__(("127.0.0.1", 0), _HubHandler)
        self.repos, self.gated, self.served = repos, set(gated), []
        self.commits = {repo: commit_of("fake", repo) for repo in repos}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _HubHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def _send(self, status: int, body: bytes = b"", headers=None, head=False):
        self.send_response(status)
        for k, v in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, value, status=200, headers=None):
        self._send(status, json.dumps(value).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _route(self, head: bool):
        hub_, parts = self.server, unquote(urlparse(self.path).path).strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6:
            repo, kind, rev = "/".join(parts[2:4]), parts[4], parts[5]
            if repo not in hub_.repos:
                return self._json({"error": "Repository not found"}, 404, {"X-Error-Code": "RepoNotFound"})
            commit = hub_.commits[repo]
            if rev not in ("main", commit):
                return self._json({"error": "Invalid rev id"}, 404, {"X-Error-Code": "RevisionNotFound"})
            files = hub_.repos[repo]
            if kind == "revision":
                return self._json({"id": repo, "sha": commit, "private": False, "siblings": [{"rfilename": f}
                                                                                               for f in files]})
            if kind == "tree":
                return self._json([{"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                                   for f, b in files.items()])
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, rev, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            if repo in hub_.gated:
                return self._send(403, b"gated", {"X-Error-Code": "GatedRepo"}, head)
            data = hub_.repos.get(repo, {}).get(name)
            if data is None:
                return self._send(404, b"", {"X-Error-Code": "EntryNotFound"}, head)
            if not head:
                hub_.served.append(f"{repo}/{name}")
            return self._send(200, data, {"X-Repo-Commit": hub_.commits[repo],
                                          "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}, head)
        self._send(404, b"")

    def do_GET(self):
        self._route(head=False)

    def do_HEAD(self):
        self._route(head=True)


def _files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.fixture
def fake_hub(world, tmp_path, monkeypatch):
    """A Hub with org/full (safetensors, plus what no model needs: a pickle copy, onnx/,
    flax weights, code) and org/pickle (pytorch_model.bin only)."""
    from huggingface_hub import constants

    model_files = _files(world["snaps"]["mamba2"])
    full = {**model_files, "pytorch_model.bin": b"a pickle copy", "onnx/model.safetensors": b"x",
            "flax_model.msgpack": b"x", "modeling_evil.py": b"raise SystemExit", "README.md": b"# card",
            "LICENSE": b"MIT"}
    model = tiny_model("mamba2", vocab_size=256, chunk_size=16)
    model.save_pretrained(tmp_path / "bin")  # transformers 5 writes no pickle: that part by hand
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "model.safetensors").unlink()
    pickle = {**_files(tmp_path / "bin"), "notes.txt": b"x"}
    assert "pytorch_model.bin" in pickle and not any(f.endswith(".safetensors") for f in pickle)
    server = FakeHub({"org/full": full, "org/pickle": pickle, "org/gated": model_files}, gated=["org/gated"])
    threading.Thread(target=server.serve_forever, daemon=True).start()
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    yield server, model
    server.shutdown()
    server.server_close()


def test_only_what_a_model_needs_is_downloaded(fake_hub, world, tmp_path, monkeypatch):
    server, _ = fake_hub
    assert json.loads(ok("inspect", "org/full", "--json"))["family"] == "mamba2"
    assert server.served == ["org/full/config.json"]  # inspect: the config, nothing else
    # offline, the cached file listing tells the snapshot lacks the weights: said in one line
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    one_line_error(run("convert", "org/full", "--out", tmp_path / "c"), "org/full", "incomplete copy",
                   "HF_HUB_OFFLINE=1", "hf download org/full")
    assert not (tmp_path / "c").exists()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    ok("convert", "org/full", "--out", tmp_path / "c")
    fetched = sorted(f.removeprefix("org/full/") for f in server.served)
    # config.json is not fetched again: inspect put it in the same snapshot folder
    assert fetched == sorted(["config.json", "generation_config.json", "model.safetensors", "README.md", "LICENSE"])
    assert same_state(mr.load_base("org/full"), world["models"]["mamba2"])
    # now cached: offline, the same snapshot, and nothing more is asked of the Hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = len(server.served)
    assert open_checkpoint("org/full").path.name == server.commits["org/full"]
    assert len(server.served) == before


def test_pickle_weights_only_when_there_are_no_safetensors(fake_hub):
    server, model = fake_hub
    folder = hub.resolve_hub("org/pickle")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "generation_config.json", "pytorch_model.bin"]
    assert "org/pickle/notes.txt" not in server.served
    assert hub.resolve_hub("org/pickle", config_only=True) == folder
    assert [p.name for p in hub.resolve_hub("org/full").iterdir() if p.suffix == ".bin"] == []


def test_a_hub_that_says_no(fake_hub, tmp_path):
    server, _ = fake_hub
    one_line_error(run("convert", "org/nothing", "--out", tmp_path / "o"),
                   "org/nothing does not exist locally", "has no model org/nothing", "hf auth login")
    one_line_error(run("convert", "org/gated", "--out", tmp_path / "o"), "org/gated is a gated model",
                   "hf auth login")
    one_line_error(run("convert", "org/full@v9", "--out", tmp_path / "o"), "org/full", "has no revision 'v9'")
    one_line_error(run("eval", "org/full", "--tokenizer", "org/nothing", "--out", tmp_path / "o"),
                   "--tokenizer org/nothing does not exist locally")
    assert not (tmp_path / "o").exists()


def test_a_hub_that_cannot_be_reached(fake_hub, world, tmp_path, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    one_line_error(run("convert", "org/full", "--out", tmp_path / "o"), "org/full does not exist locally",
                   "could not be reached", "ConnectError", "HF_HUB_OFFLINE=1")
    assert not (tmp_path / "o").exists()
    # what is cached still opens without the Hub (huggingface_hub falls back to the cache)
    monkeypatch.setenv("HF_HUB_CACHE", str(world["cache"]))
    assert open_checkpoint("org/gla").path == world["snaps"]["gla"]


def test_a_mamba_ssm_repo_evaluates_with_the_tokenizer_its_format_names(offline, tmp_path):
    """The README's Hub command in miniature: a state-spaces-style repo (mamba_ssm config,
    pickle weights, no tokenizer) and the gpt-neox-20b tokenizer, both only in the cache."""
    from test_formats import CASES, GPT_NEOX, write_mamba_ssm

    overrides, config = CASES["mamba2"]
    tok = offline["tok"]
    vocab = -(-len(tok) // 16) * 16  # mamba_ssm pads the vocabulary to a multiple of 16
    model = tiny_model("mamba2", **{**overrides, "vocab_size": vocab})
    src = write_mamba_ssm(model, tmp_path / "ssm", {**config, "vocab_size": len(tok)})
    put_snapshot(offline["cache"], "state-spaces/mamba2-tiny", src, commit_of("ssm"))
    put_snapshot(offline["cache"], GPT_NEOX, offline["root"] / "src" / "tok", commit_of("neox"))
    ok("eval", "state-spaces/mamba2-tiny", "--recipe", "smoke", "--only", "perplexity", "--data", offline["book"],
       "--quiet", "--no-plots", "--out", tmp_path / "res")
    results = json.loads((tmp_path / "res" / "results.json").read_text())
    assert results["tokenizer"] == GPT_NEOX and results["records"]

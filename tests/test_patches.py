"""The one registry of foreign symbols (``mc_retrofit.compat``), ``unconvert``, and a converted
model's state in one place (``model.mc``) and its saving.

Oracles: the base model's own state_dict, forward output and module attributes recorded
before ``convert``; the libraries' own attributes recorded before anything is installed (in a
fresh interpreter, so nothing of this session's other tests is installed yet)."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import mc_retrofit as mr
from conftest import tiny_model
from mc_retrofit import compat
from mc_retrofit.errors import MCError
from mc_retrofit.model import MCState, mc_state

HAS_FLA = __import__("importlib").util.find_spec("fla") is not None
ROOT = Path(__file__).resolve().parents[1]
MC = mr.MCConfig(segment_size=8, cache_weight=0.7)
pytestmark = pytest.mark.filterwarnings("ignore:Triton is not supported")


def _model(family: str):
    if family in ("mamba", "mamba2", "rwkv4"):
        return tiny_model(family).eval()
    from fla_oracles import tiny_fla_model, tiny_qwen3_next

    if family == "qwen3_next":
        return tiny_qwen3_next()
    if family == "retnet":  # parallel mode: convert switches it to chunk, unconvert must switch it back
        return tiny_fla_model("retnet", attn_mode="parallel")
    return tiny_fla_model(family)


FAMILIES = ["mamba2", "mamba", "rwkv4"] + (["gla", "delta_net", "retnet", "qwen3_next"] if HAS_FLA else [])


def _snapshot(model):
    """What the base model is: tensors, plain attributes and hooks of every module."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    attrs = {name: dict(vars(m)) for name, m in model.named_modules()}
    hooks = {name: [len(getattr(m, h)) for h in ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks")]
             for name, m in model.named_modules()}
    return sd, attrs, hooks


def _plain(d):
    return {k: v for k, v in d.items() if not isinstance(v, (torch.Tensor, dict, torch.nn.Module))}


@pytest.mark.parametrize("family", FAMILIES)
def test_unconvert_gives_the_exact_base_model(family):
    model = _model(family)
    ids = torch.randint(0, 64, (1, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(ids).logits
    sd, attrs, hooks = _snapshot(model)
    with pytest.warns(UserWarning) if family == "retnet" else _nothing():
        assert mr.convert(model, MC) is model
    with torch.no_grad():
        converted = model(ids).logits  # a forward leaves the running-layer token on the mixers
    if family != "qwen3_next":  # its one GDN layer may read nothing cached at this length
        assert not torch.equal(converted, base)
    assert mr.unconvert(model) is model
    assert mc_state(model) is None and "mc" not in vars(model)
    sd2, attrs2, hooks2 = _snapshot(model)
    assert list(sd2) == list(sd) and all(torch.equal(sd2[k], sd[k]) for k in sd)
    assert hooks2 == hooks  # no MC hook left anywhere
    assert list(attrs2) == list(attrs)  # no gate module left
    for name in attrs:  # no attribute convert (or a forward) set, every setting as it was
        assert set(attrs2[name]) == set(attrs[name]), name
        assert _plain(attrs2[name]) == _plain(attrs[name]), name
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)  # bit for bit
    with pytest.warns(UserWarning) if family == "retnet" else _nothing():
        mr.convert(model, MC)  # and it converts again as the first time
    with torch.no_grad():
        assert torch.equal(model(ids).logits, converted)
    mr.unconvert(model)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_unconvert_refuses_an_unconverted_model_in_one_line():
    with pytest.raises(MCError, match="not converted") as e:
        mr.unconvert(tiny_model("mamba2"))
    assert "\n" not in str(e.value)


def test_state_lives_in_one_place_and_copies_hold_their_own():
    model = mr.convert(tiny_model("mamba2"), MC)
    state = model.mc
    assert isinstance(state, MCState) and state.config.family == "mamba2" and state.family == "mamba2"
    for loose in ("mc_config", "_mc_hooks", "mc_source_dir", "save_pretrained"):
        assert loose not in vars(model), loose  # nothing else hangs on the user's object
    twin = copy.deepcopy(model)
    assert twin.mc is not state and twin.mc.config == state.config
    ids = torch.randint(0, 64, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = twin(ids).logits
    mr.unconvert(model)  # the copy is still converted: its op wrappers stay installed
    assert compat.patched(sys.modules["transformers.models.mamba2.modeling_mamba2"], "mamba2_chunk_scan")
    with torch.no_grad():
        assert torch.equal(twin(ids).logits, want)
    mr.unconvert(twin)


def test_load_base_source_dir_moves_into_the_state_and_back(tmp_path):
    tiny_model("mamba2").save_pretrained(tmp_path / "orig")
    base = mr.load_base(tmp_path / "orig")
    noted = vars(base).get("mc_source_dir")
    model = mr.convert(base, MC)
    assert model.mc.source_dir == noted and "mc_source_dir" not in vars(model)
    mr.unconvert(model)
    assert vars(model).get("mc_source_dir") == noted


def test_save_pretrained_writes_a_converted_directory_without_rebinding(tmp_path):
    """No method is rebound on the instance: the registered class-level redirect sends a
    converted model to mc_retrofit.save, every other model through transformers unchanged."""
    from transformers import PreTrainedModel

    model = mr.convert(tiny_model("mamba2"), MC)
    assert "save_pretrained" not in vars(model)
    entry = compat.patched(PreTrainedModel, "save_pretrained")
    assert entry is not None and entry.patch.layer == "mc" and entry.window == "transformers>=5.23,<5.25"
    model.save_pretrained(tmp_path / "a")
    mr.save(model, tmp_path / "b")
    for d in ("a", "b"):
        assert (tmp_path / d / "mc_config.json").is_file() and (tmp_path / d / "mc_gates.safetensors").is_file()
        back = mr.load(tmp_path / d)
        assert back.mc.config == model.mc.config
        assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())
    plain = tiny_model("mamba")
    plain.save_pretrained(tmp_path / "plain")  # an unconverted model: transformers' own save
    assert not (tmp_path / "plain" / "mc_config.json").exists()
    mr.unconvert(model)
    model.save_pretrained(tmp_path / "c")  # unconverted again: the base, as transformers writes it
    assert not (tmp_path / "c" / "mc_config.json").exists()
    assert json.loads((tmp_path / "c" / "config.json").read_text())["model_type"] == "mamba2"


def test_every_family_class_saves_through_the_redirect():
    """A family class with its own save_pretrained would bypass the redirect (a silently
    unconverted save): none has one."""
    from transformers import PreTrainedModel

    from mc_retrofit.adapters import ADAPTERS

    for adapter in ADAPTERS:
        mro = adapter.model_class().__mro__
        assert PreTrainedModel in mro
        own = [c for c in mro[:mro.index(PreTrainedModel)] if "save_pretrained" in vars(c)]
        assert not own, (adapter.family, own)


def test_the_registry_lists_every_patch_with_its_window():
    listed = compat.patches()
    assert len({p.key for p in listed}) == len(listed)
    for p in listed:
        assert p.where and p.why and p.layer in compat.LAYERS and p.group
        assert p.window == compat.PATCH_WINDOWS[p.dist]
        owner = p.resolve_owner()  # every declared symbol exists in the installed libraries
        assert hasattr(owner, p.name), p.where
    groups = {p.group for p in listed if p.layer == "mc"}
    assert {"mamba", "mamba2", "rwkv4", "save"} <= groups
    if HAS_FLA:
        assert {"gla", "delta_net", "gated_deltanet", "retnet", "rwkv6", "rwkv7", "qwen3_next"} <= groups
        assert any(p.layer == "fla-cpu" for p in listed) and any(p.layer == "compat" for p in listed)


def test_an_unsupported_version_is_one_line_at_install(monkeypatch):
    import transformers.models.mamba2.modeling_mamba2 as m2

    before = vars(m2)["mamba2_chunk_scan"]
    patch = compat.Patch("transformers.models.mamba2.modeling_mamba2", "mamba2_chunk_scan", lambda f: f,
                         layer="compat", group="test", why="test")
    monkeypatch.setattr(compat, "installed", lambda dist: "5.30.0")
    compat._checked.cache_clear()
    try:
        with pytest.raises(MCError) as e:
            compat.install([patch])
    finally:
        compat._checked.cache_clear()
    text = str(e.value)
    assert "\n" not in text and "transformers 5.30.0" in text and "transformers>=5.23,<5.25" in text
    assert vars(m2)["mamba2_chunk_scan"] is before and not patch.installed


# -- the registry's mechanics, on a stand-in module (nothing real is touched) ----------------
@pytest.fixture
def dummy(monkeypatch):
    module = types.ModuleType("transformers._mc_registry_test")

    class Base:
        @classmethod
        def apply(cls, x):
            return ("base", x)

    class Leaf(Base):
        pass

    module.op, module.Leaf = (lambda x: ("op", x)), Leaf
    monkeypatch.setitem(sys.modules, module.__name__, module)
    yield module
    for key in [k for k in compat.PATCHES if k[0].startswith(module.__name__)]:
        compat.PATCHES.pop(key)


def _wrapping(tag):
    def make(current):
        return lambda *a: (tag, current(*a))

    return make


def test_patches_stack_by_layer_and_uninstall_exactly(dummy):
    original_op = dummy.op
    low = compat.Patch(dummy.__name__, "op", _wrapping("routed"), layer="fla-cpu", group="t", why="t")
    high = compat.Patch(dummy.__name__, "op", _wrapping("mc"), layer="mc", group="t", why="t")
    apply = compat.Patch(f"{dummy.__name__}:Leaf", "apply", lambda cur: staticmethod(_wrapping("routed")(cur)),
                         layer="fla-cpu", group="t", why="t")
    compat.install([high, low, apply])  # any order given: the lower layer goes in first
    assert dummy.op(1) == ("mc", ("routed", ("op", 1))) and dummy.Leaf.apply(2) == ("routed", ("base", 2))
    replaced = dummy.op
    compat.install([high, low, apply])  # idempotent
    assert dummy.op is replaced
    with pytest.raises(MCError, match="sits on"):
        compat.uninstall_patches("fla-cpu")  # not from under the mc wrapper
    compat.uninstall_patches("mc")
    assert dummy.op(1) == ("routed", ("op", 1))
    compat.uninstall_patches("fla-cpu")
    assert dummy.op is original_op
    assert "apply" not in vars(dummy.Leaf) and dummy.Leaf.apply(3) == ("base", 3)  # inherited again


def test_a_lower_layer_is_refused_on_top_and_a_foreign_replacement_is_kept(dummy):
    high = compat.Patch(dummy.__name__, "op", _wrapping("mc"), layer="mc", group="t", why="t")
    compat.install([high])
    with pytest.raises(MCError, match="goes below") as e:
        compat.install([compat.Patch(dummy.__name__, "op", _wrapping("routed"), layer="fla-cpu", group="t", why="t")])
    assert "\n" not in str(e.value)
    theirs = lambda x: "theirs"  # noqa: E731
    dummy.op = theirs
    with pytest.raises(MCError, match="someone else"):
        compat.uninstall_patches("mc")
    assert dummy.op is theirs


def test_a_temporary_patch_lasts_for_its_block_only(dummy):
    original_op = dummy.op
    patch = compat.Patch(dummy.__name__, "op", _wrapping("fast"), layer="fla-cpu", group="t", why="t")
    with compat.temporarily([patch]):
        assert dummy.op(1) == ("fast", ("op", 1)) and patch.installed
    assert dummy.op is original_op and not patch.installed
    compat.install([patch])
    with compat.temporarily([patch]):  # installed before: it stays after the block
        pass
    assert patch.installed


def test_explicit_uninstall_is_refused_while_a_converted_model_lives():
    model = mr.convert(tiny_model("mamba2"), MC)
    with pytest.raises(MCError, match="unconvert") as e:
        compat.uninstall_patches("mc")
    assert "\n" not in str(e.value)
    mr.unconvert(model)


# -- the process as imported, after convert + unconvert of every family ----------------------
SCRIPT = r'''
import sys, warnings
sys.path[:0] = [TESTS]
warnings.simplefilter("ignore")
import torch
import mc_retrofit as mr
from mc_retrofit import compat

ABSENT = object()
listed = compat.patches()
owners = {p.key: p.resolve_owner() for p in listed}
before = {p.key: vars(owners[p.key]).get(p.name, ABSENT) for p in listed}
assert not compat.PATCHES, [e.where for e in compat.PATCHES.values()]

from test_patches import FAMILIES, MC, _model
ids = torch.randint(0, 64, (1, 19))
models, outs = {}, {}
for family in FAMILIES:
    m = _model(family)
    with torch.no_grad():
        outs[family] = m(ids).logits
    models[family] = mr.convert(m, MC)
    with torch.no_grad():
        m(ids)
installed = {e.patch.key for e in compat.PATCHES.values()}
report = {"listed": len(listed), "installed": len(installed),
          "by_layer": {l: sum(1 for p in listed if p.layer == l) for l in compat.LAYERS},
          "by_group": {}}
for p in listed:
    report["by_group"][p.layer + ":" + p.group] = report["by_group"].get(p.layer + ":" + p.group, 0) + 1
for family, m in models.items():
    mr.unconvert(m)
mc_left = [e.where for e in compat.PATCHES.values() if e.patch.layer == "mc"]
assert not mc_left, mc_left
routing_kept = sum(1 for e in compat.PATCHES.values() if e.patch.layer == "fla-cpu")
for family, m in models.items():  # fla models still run on CPU (the routing stays), as before
    with torch.no_grad():
        assert torch.equal(m(ids).logits, outs[family]), family
compat.uninstall_patches()
assert not compat.PATCHES
for p in listed:
    now = vars(owners[p.key]).get(p.name, ABSENT)
    assert now is before[p.key], p.where
report["routing_kept"] = routing_kept
import json
print("REPORT", json.dumps(report))
'''


def test_convert_then_unconvert_leaves_the_libraries_as_imported():
    script = SCRIPT.replace("TESTS", repr(str(ROOT / "tests")))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("REPORT "))[7:])
    assert report["installed"] >= len(FAMILIES)
    assert (report["routing_kept"] > 0) == HAS_FLA  # the documented lifetime of the routing layer

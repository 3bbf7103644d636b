"""The cache path, forced for every family on the installed transformers version.

transformers 5.24 renamed the recurrent cache argument (``cache_params`` -> ``cache``);
a hook that looked for the old name found nothing and each decoding step silently started
without the MC memory. Checkpoints that ship ``use_cache: false`` hid it, so every test
here builds its model with ``use_cache=False`` in the config and forces the cache on:
split prefill then token-by-token decoding equals one full forward, ``generate`` with the
cache equals greedy decoding by full recomputation (the oracle: no cache at all), and the
memory really rides on the cache object.
"""
from __future__ import annotations

import importlib.util
import re
import pytest
import torch
from conftest import ROOT, logits_in_calls, shared_path, tiny_model

import mc_retrofit
from mc_retrofit import MCConfig, MCError, cache_stats, compat

HAS_FLA = importlib.util.find_spec("fla") is not None
FLA = ["delta_net", "gated_deltanet", "retnet", "gla", "rwkv6", "rwkv7"] if HAS_FLA else []
FAMILIES = ["mamba2", "mamba", "rwkv4"] + (["qwen3_next"] + FLA if HAS_FLA else [])  # Qwen3-Next routes through fla on CPU


def _tiny(family: str):
    if family in ("mamba2", "mamba", "rwkv4"):
        model = tiny_model(family)
    elif family == "qwen3_next":
        from fla_oracles import tiny_qwen3_next

        model = tiny_qwen3_next()
    else:
        from fla_oracles import tiny_fla_model

        model = tiny_fla_model(family)
    return _forced(model)


def _forced(model):
    model.config.use_cache = False  # what the Mamba2 reference checkpoint ships: the cache must be forced
    model.generation_config.eos_token_id = None  # decode every requested token (the oracle does)
    return model


def _greedy_by_recomputation(model, ids: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding with a full forward over the whole text at every step (no cache)."""
    logits = []
    for _ in range(n):
        step = model(ids, use_cache=False).logits[:, -1]
        logits.append(step)
        ids = torch.cat([ids, step.argmax(-1, keepdim=True)], 1)
    return ids, torch.stack(logits, 1)


def _assert_generate_is_recomputation(model, x: torch.Tensor, n: int) -> None:
    """``generate`` with the cache equals greedy decoding by full recomputation."""
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=n, do_sample=False, use_cache=True, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
        ids, logits = _greedy_by_recomputation(model, x, n)
    assert torch.equal(out.sequences, ids)
    assert (torch.stack(out.logits, 1) - logits).abs().max() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_split_prefill_then_decoding_equals_one_forward(family):
    model = mc_retrofit.convert(_tiny(family), MCConfig(segment_size=3, aggregation="gated"))
    B = 1 if family == "rwkv4" else 2  # transformers' RWKV-4 one-token step is broken for batch > 1
    x = torch.randint(0, model.config.vocab_size, (B, 14), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(x, use_cache=False).logits
        got, cache = logits_in_calls(  # calls across boundaries
            model, x, [(0, 5), (5, 8)] + [(t, t + 1) for t in range(8, 14)],
            call_kwargs=lambda a, b, cache: {} if cache is None or family not in ("mamba2", "mamba")
            else {"cache_position": torch.arange(a, b)})
    assert (got - full).abs().max() <= 1e-5
    stats = cache_stats(cache)  # the memory travelled with the cache: 14 // 3 segments closed
    assert stats["segments"] > 0 and all(v["segments"] == 4 for v in stats["layers"].values())


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_the_cache_equals_greedy_recomputation(family):
    model = mc_retrofit.convert(_tiny(family), MCConfig(segment_size=3, aggregation="ssc", top_k=1))
    x = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(1))
    _assert_generate_is_recomputation(model, x, 6)


@pytest.mark.parametrize("family", FLA)
def test_base_fla_generate_uses_its_cache(family):
    """Without Memory Caching too: transformers 5.24's generate passes ``cache=``, which
    fla 0.6's forward swallows in ``**kwargs``; mc-retrofit's registered fix renames it."""
    mc_retrofit.adapters.adapter_by_family(family).model_class()  # imports fla the way load_base does
    model = _tiny(family)
    x = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(2))
    _assert_generate_is_recomputation(model, x, 5)


@pytest.mark.parametrize("folder", ["mamba2-byte-ctx512", "rwkv4-tiny-660K-hf", "rwkv7-tiny-834K-fla"])
def test_real_checkpoints_generate_with_the_cache(folder):
    """Real checkpoints with ``use_cache: false`` in their config (as the Mamba2 one ships):
    generate must still take the cache path when asked, and equal recomputation."""
    path = shared_path("checkpoints", folder)
    if folder.startswith("rwkv7") and not HAS_FLA:
        pytest.skip("flash-linear-attention is not installed")
    model = mc_retrofit.convert(_forced(mc_retrofit.load_base(path)), MCConfig(segment_size=8, aggregation="gated"))
    _assert_generate_is_recomputation(model, torch.tensor([list(b"The pass key is 1234")]), 6)


# -- the one place that knows both APIs -------------------------------------------------------
def test_cache_argument_follows_the_installed_version():
    model = tiny_model("mamba2")
    params = compat._parameters(type(model).forward)
    expected = "cache" if "cache" in params else "cache_params"
    assert compat.cache_argument(model) == expected
    assert compat.cache_argument(tiny_model("rwkv4")) == "state"


def test_no_known_cache_argument_is_one_line_naming_the_window():
    def forward(self, input_ids, memory=None):
        return input_ids

    with pytest.raises(MCError) as e:
        compat.argument_name(forward, ("cache", "cache_params"), "Foo.forward")
    msg = str(e.value)
    assert "\n" not in msg and "Foo.forward" in msg and compat.TESTED["transformers"] in msg
    assert f"transformers {compat.installed('transformers')}" in msg


def test_versions_outside_the_window_give_one_line_each():
    lines = compat.outside_window({"torch": "2.13.0+cpu", "transformers": "5.30.1", "triton": "3.9.0",
                                   "flash-linear-attention": None})
    assert len(lines) == 1 and "transformers 5.30.1" in lines[0] and compat.TESTED["transformers"] in lines[0]
    assert compat.outside_window({"transformers": "5.23.0", "torch": "2.13.0"}) == []
    assert len(compat.outside_window({"torch": "2.12.1", "triton": "3.10.0"})) == 2


def test_the_tested_window_is_the_one_pyproject_declares():
    text = (ROOT / "pyproject.toml").read_text()
    deps = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
    declared = {}
    for item in re.findall(r'"([^"]+)"', deps):
        name, spec = re.match(r"([A-Za-z0-9_.-]+)(.*)", item).groups()
        declared[name] = spec
    for dist, window in compat.TESTED.items():
        assert sorted(declared[dist].split(",")) == sorted(window.split(",")), dist


def test_the_lock_file_lies_inside_the_window():
    lock = (ROOT / ".ci" / "lock.txt").read_text().splitlines()
    pins = dict(line.split("==") for line in lock if "==" in line and not line.startswith("#"))
    versions = {dist: pins.get(dist) for dist in compat.TESTED}
    versions["torch"] = "2.13.0"  # installed first, from the CPU wheel (not in the lock)
    assert compat.outside_window(versions) == []


def test_every_declared_range_starts_at_the_locked_version():
    """No dependency range admits a version older than the oldest CI runs (the lock file)."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
    extras = "".join(re.search(rf"^{name} = \[(.*?)\]", text, re.M).group(1) for name in ("test", "harness"))
    pins = dict(line.split("==") for line in (ROOT / ".ci" / "lock.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    pins = {re.sub(r"[-_.]+", "-", k).lower(): v for k, v in pins.items()}  # lm_eval == lm-eval
    pins["torch"] = "2.13.0"  # installed first, from the CPU wheel
    block = "\n".join(line for line in block.splitlines() if not line.strip().startswith("#"))
    for item in re.findall(r'"([^"]+)"', block) + re.findall(r'"([^"]+)"', extras):
        req = Requirement(item)
        locked = Version(pins[re.sub(r"[-_.]+", "-", req.name).lower()])
        assert locked in req.specifier, item
        lows = [Version(s.version) for s in req.specifier if s.operator == ">="]
        assert lows and all(low.release == locked.release[:len(low.release)] for low in lows), (item, locked)


def test_registered_patches_uninstall_exactly():
    if not HAS_FLA:
        pytest.skip("flash-linear-attention is not installed")
    from fla.models.generation_utils import FLAGenerationMixin

    before = FLAGenerationMixin.__dict__["prepare_inputs_for_generation"]
    compat.uninstall_patches("compat")  # this layer only: the CPU routing stays for the other tests
    original = FLAGenerationMixin.__dict__["prepare_inputs_for_generation"]
    try:
        compat.fix_fla_generation()
        if compat.generate_passes_cache():
            assert FLAGenerationMixin.__dict__["prepare_inputs_for_generation"] is not original
            assert all(p.where and p.window and p.why for p in compat.PATCHES.values())
        compat.uninstall_patches("compat")
        assert FLAGenerationMixin.__dict__["prepare_inputs_for_generation"] is original
    finally:
        compat.fix_fla_generation()
    assert before is not None

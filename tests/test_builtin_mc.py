"""The shipped gate-tuned variant ``builtin:mamba2-byte-v2-mc`` (the README's main command):
its base is the v2 model bit for bit, its gates are light, it is exactly the base wherever no
segment is cached or its cache weights are 0, and the main command's recipe runs on it."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import mc_retrofit
from mc_retrofit.builtin import available, builtin_path
from mc_retrofit.model import gate_modules

NAME = "builtin:mamba2-byte-v2-mc"


@pytest.fixture(scope="module")
def models():
    return mc_retrofit.load(NAME), mc_retrofit.load_base("builtin:mamba2-byte-v2")


def test_it_is_listed_and_its_base_is_the_v2_model_bit_for_bit(models):
    model, v2 = models
    assert "mamba2-byte-v2-mc" in available()
    base = {k: v for k, v in model.state_dict().items() if ".mc_gate." not in f".{k}"}
    ref = v2.state_dict()
    assert base.keys() == ref.keys() and all(torch.equal(base[k], ref[k]) for k in ref)


def test_its_gates_are_under_one_percent_and_as_its_config_says(models):
    model, _ = models
    cfg = model.mc.config
    assert (cfg.aggregation, cfg.top_k, cfg.gate_source, cfg.gate_rank, cfg.segment_size) == ("ssc", 2, "lowrank", 2, 256)
    gates = sum(p.numel() for n, p in model.named_parameters() if ".mc_gate." in f".{n}")
    assert gates == 3168 and gates / sum(p.numel() for p in model.parameters()) < 0.01
    # tuned: the cache weights moved away from the 0 they started at
    assert any(bool(g.cache_weight.detach().ne(0).any()) for g in gate_modules(model).values())


def test_it_is_the_base_before_the_first_segment_closes_and_at_cache_weight_zero(models):
    model, v2 = models
    x = torch.randint(0, 256, (2, 600), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = v2(x).logits
        out = model(x).logits
        assert torch.equal(out[:, :256], ref[:, :256])  # nothing cached yet: the base's output exactly
        assert not torch.allclose(out[:, 300:], ref[:, 300:])  # the cached segment is read
        off = mc_retrofit.load(NAME)
        for g in gate_modules(off).values():
            g.cache_weight.zero_()
        assert torch.equal(off(x).logits, ref)


def test_the_main_command_recipe_runs_on_it(tmp_path):
    from mc_retrofit.cli import main

    # the README's main command, cut to its shortest lengths: the same recipe file and code path
    recipe = json.loads((builtin_path("mamba2-byte-v2").parents[1] / "eval" / "suites" / "retrieval.json").read_text())
    recipe["perplexity"].update(lengths=["1x"], windows=1)
    recipe["passkey"].update(lengths=["1x"], samples=1)
    recipe["multikey"].update(lengths=["1x"], samples=2)
    (tmp_path / "r.json").write_text(json.dumps(recipe))
    r = CliRunner().invoke(main, ["eval", NAME, "--recipe", str(tmp_path / "r.json"), "--out", str(tmp_path / "o"),
                                  "--quiet", "--no-plots", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    names = [v["name"] for v in res["variants"]]
    assert names == ["base", "model"]  # a converted input: its own gates against its base
    # inside the training context both retrieve (the evidence study: 60/60 each at 512 bytes)
    acc = res["passkey"]["by_length"]
    assert acc["model"]["512"]["accuracy"] == acc["base"]["512"]["accuracy"]

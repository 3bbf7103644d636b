"""``--device-map`` (accelerate's big-model placement) with Memory Caching.

On a CPU-only machine ``auto`` places everything on the CPU: the numbers must be those of
``--device cpu`` exactly (eval's in-place variants under a device map against its deep
copies, generate's tokens). A map with a disk-offloaded layer runs accelerate's hooks on
CPU too (weights on the meta device until the layer runs): a converted model must give the
unplaced model's output. The two-GPU test runs where there are two GPUs.
"""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import mc_retrofit
from conftest import tiny_model
from mc_retrofit import MCConfig
from mc_retrofit.cli import main
from mc_retrofit.devices import input_device, module_device
from mc_retrofit.errors import MCError
from mc_retrofit.model import gate_modules


@pytest.fixture
def ckpt(tmp_path):
    model = tiny_model("mamba2", vocab_size=256, chunk_size=32)
    model.save_pretrained(tmp_path / "ckpt")
    conv = mc_retrofit.convert(mc_retrofit.load_base(tmp_path / "ckpt"), MCConfig(segment_size=32, cache_weight=0.5))
    mc_retrofit.save(conv, tmp_path / "conv")
    return tmp_path


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_auto_on_cpu_places_everything_on_the_cpu(ckpt):
    plain = mc_retrofit.load(ckpt / "conv")
    mapped = mc_retrofit.load(ckpt / "conv", device_map="auto")
    assert {p.device.type for p in mapped.parameters()} == {"cpu"} and input_device(mapped) == torch.device("cpu")
    ids = torch.randint(0, 256, (1, 100), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_logits(mapped, ids), _logits(plain, ids))


def test_a_disk_offloaded_layer_runs_memory_caching(ckpt, tmp_path):
    """accelerate's hooks: layer 1's weights live on disk (meta until it runs); its gate goes
    to the layer's execution device, and the lowrank gate reads the layer input there."""
    cfg = MCConfig(segment_size=16, cache_weight=0.5, gate_source="lowrank", gate_rank=4)
    plain = mc_retrofit.convert(mc_retrofit.load_base(ckpt / "ckpt"), cfg)
    dm = {"backbone.embeddings": "cpu", "backbone.layers.0": "cpu", "backbone.layers.1": "disk",
          "backbone.norm_f": "cpu", "lm_head": "cpu"}
    base = type(plain).from_pretrained(str(ckpt / "ckpt"), device_map=dm, offload_folder=str(tmp_path / "off"))
    mixer = base.backbone.layers[1].mixer
    assert mixer.in_proj.weight.device.type == "meta"  # really offloaded: the hooks bring it in
    assert module_device(base, mixer) == torch.device("cpu")
    mapped = mc_retrofit.convert(base, cfg)
    assert all(p.device.type == "cpu" for g in gate_modules(mapped).values() for p in g.parameters())
    ids = torch.randint(0, 256, (2, 70), generator=torch.Generator().manual_seed(1))
    want = _logits(plain, ids)
    assert not torch.equal(want, _logits(mc_retrofit.load_base(ckpt / "ckpt"), ids))  # MC changes the output
    assert torch.equal(_logits(mapped, ids), want)


def _eval(path, out, *placement):
    res = CliRunner().invoke(main, ["eval", str(path), "--recipe", "smoke", "--only", "perplexity", "--quiet",
                                    "--no-plots", "--out", str(out), *placement])
    assert res.exit_code == 0, res.output
    return json.loads((out / "results.json").read_text())


def test_cli_eval_with_device_map_auto_equals_device_cpu(ckpt):
    from conftest import shared_path

    shared_path("data", "gutenberg", "austen-emma.txt")
    # a converted input: the base, then the model's own gates (converted in place under the map)
    cpu = _eval(ckpt / "conv", ckpt / "cpu", "--device", "cpu")
    auto = _eval(ckpt / "conv", ckpt / "auto", "--device-map", "auto")
    assert [v["name"] for v in auto["variants"]] == ["base", "model"]
    assert auto["records"] == cpu["records"]
    assert auto["environment"]["device_map"] == "auto" and cpu["environment"]["device_map"] is None
    own = [r["nll_sum"] for r in auto["records"] if r["variant"] == "model"]
    assert own != [r["nll_sum"] for r in auto["records"] if r["variant"] == "base"]  # the gates were loaded


def _generate(path, *placement):
    res = CliRunner().invoke(main, ["generate", str(path), "--prompt", "It is a truth universally acknowledged",
                                    "--max-new-tokens", "24", *placement])
    assert res.exit_code == 0, res.output
    return res.output


def test_cli_generate_with_device_map_auto_equals_device_cpu(ckpt):
    assert _generate(ckpt / "conv", "--device-map", "auto") == _generate(ckpt / "conv", "--device", "cpu")


def test_placement_refusals(ckpt):
    res = CliRunner().invoke(main, ["generate", str(ckpt / "conv"), "--prompt", "x", "--device", "cpu",
                                    "--device-map", "auto"])
    assert res.exit_code == 1 and "give --device or --device-map, not both" in res.output
    res = CliRunner().invoke(main, ["eval", str(ckpt / "conv"), "--device-map", "everywhere"])
    assert res.exit_code == 1 and "--device-map takes auto" in res.output
    with pytest.raises(MCError, match="not both"):
        mc_retrofit.load_base(ckpt / "ckpt", device="cpu", device_map="auto")
    mc_retrofit.export(mc_retrofit.load(ckpt / "conv"), ckpt / "m.safetensors")
    with pytest.raises(MCError, match="exported file, which loads whole"):
        mc_retrofit.load(ckpt / "m.safetensors", device_map="auto")


def test_device_map_needs_accelerate(monkeypatch):
    import importlib.util

    from mc_retrofit.devices import check_placement

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    with pytest.raises(MCError, match="pip install accelerate"):
        check_placement(None, None, "auto")
    check_placement("cpu", None)  # --device needs nothing more


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpu_map_equals_one_gpu(ckpt):
    """Layers on two GPUs: each gate on its layer's GPU, the output that of one GPU."""
    dm = {"backbone.embeddings": 0, "backbone.layers.0": 0, "backbone.layers.1": 1, "backbone.norm_f": 1,
          "lm_head": 1}
    one = mc_retrofit.load(ckpt / "conv", device="cuda:0")
    two = mc_retrofit.load(ckpt / "conv", device_map=dm)
    assert {str(p.device) for p in two.backbone.layers[1].mixer.mc_gate.parameters()} == {"cuda:1"}
    ids = torch.randint(0, 256, (2, 100), generator=torch.Generator().manual_seed(2))
    a, b = _logits(one, ids.to("cuda:0")), _logits(two, ids.to(input_device(two)))
    torch.testing.assert_close(b.to(a.device), a, rtol=0, atol=1e-5)
    with torch.no_grad():  # and decoding with the cache across the two devices
        g1 = one.generate(ids[:1].to("cuda:0"), max_new_tokens=20, do_sample=False, use_cache=True)
        g2 = two.generate(ids[:1].to(input_device(two)), max_new_tokens=20, do_sample=False, use_cache=True)
    assert torch.equal(g1.cpu(), g2.cpu())

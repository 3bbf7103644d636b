"""convert -> save -> load and export -> load round-trip bit-exactly; inspect's numbers."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import TRANSFORMERS_FAMILIES, tiny_model
from safetensors import safe_open
from safetensors.torch import save_file

import mc_retrofit
from mc_retrofit import MCConfig, MCError
from mc_retrofit.describe import describe
from mc_retrofit.model import gate_state_dict


def _perturb_gates(model):
    with torch.no_grad():
        for name, p in gate_state_dict(model).items():
            p.add_(torch.randn_like(p) * 0.1)


def _same(a, b, x):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    with torch.no_grad():
        assert torch.equal(a(x).logits, b(x).logits)


@pytest.mark.parametrize("family", TRANSFORMERS_FAMILIES)
@pytest.mark.parametrize("gate_source", ["query", "learned"])
def test_save_load_and_export_roundtrip(family, gate_source, tmp_path):
    model = mc_retrofit.convert(tiny_model(family), MCConfig(segment_size=5, gate_source=gate_source))
    _perturb_gates(model)
    x = torch.randint(0, 64, (2, 17))
    with torch.no_grad():
        model(x)  # an eval forward first: RWKV rescales weights in place then
    model.save_pretrained(tmp_path / "conv")
    files = sorted(p.name for p in (tmp_path / "conv").iterdir())
    assert {"config.json", "model.safetensors", "mc_config.json", "mc_gates.safetensors"} <= set(files)
    loaded = mc_retrofit.load(tmp_path / "conv")
    biases = [v for k, v in gate_state_dict(loaded).items() if k.endswith(".mc_gate.online_bias")]
    assert biases and all(v.unique().numel() == v.numel() for v in biases)  # tuned per head, kept per head
    _same(model, loaded, x)
    mc_retrofit.export(loaded, tmp_path / "m.safetensors")
    exported = mc_retrofit.load(tmp_path / "m.safetensors")
    _same(model, exported, x)
    assert exported.mc.config == model.mc.config


def _drop_gate_keys(path, suffix):
    """Rewrite a safetensors file without the tensors named ``...suffix`` (metadata kept)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if not k.endswith(suffix)}
    assert len(tensors) < len(safe_open(str(path), framework="pt").keys())
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("family", ["mamba2", "rwkv4"])
def test_files_from_before_the_per_head_online_bias_load(family, tmp_path):
    """A gate file or exported file written before ``online_bias`` was a gate tensor (one float
    of the mc_config) loads with the bias at its config value: the model that file computed;
    a missing gate tensor of any other kind is still refused."""
    model = mc_retrofit.convert(tiny_model(family), MCConfig(segment_size=5, online_bias=0.4))
    with torch.no_grad():  # tuned gates, bias still at its config value (all the old format could hold)
        for name, p in gate_state_dict(model).items():
            if not name.endswith(".online_bias"):
                p.add_(torch.randn_like(p) * 0.1)
    x = torch.randint(0, 64, (2, 17))
    with torch.no_grad():
        model(x)
    model.save_pretrained(tmp_path / "conv")
    mc_retrofit.export(model, tmp_path / "m.safetensors")
    _drop_gate_keys(tmp_path / "conv" / "mc_gates.safetensors", ".mc_gate.online_bias")
    _drop_gate_keys(tmp_path / "m.safetensors", ".mc_gate.online_bias")
    for path in (tmp_path / "conv", tmp_path / "m.safetensors"):
        old = mc_retrofit.load(path)
        assert all(torch.equal(v, torch.full_like(v, 0.4))
                   for k, v in gate_state_dict(old).items() if k.endswith(".online_bias"))
        _same(model, old, x)
    _drop_gate_keys(tmp_path / "conv" / "mc_gates.safetensors", ".mc_gate.cache_weight")
    _drop_gate_keys(tmp_path / "m.safetensors", ".mc_gate.cache_weight")
    for path in (tmp_path / "conv", tmp_path / "m.safetensors"):
        with pytest.raises(MCError, match="missing.*cache_weight"):
            mc_retrofit.load(path)


def test_converted_dir_keeps_original_weights(tmp_path):
    base = tiny_model("mamba2")
    base.save_pretrained(tmp_path / "orig")
    model = mc_retrofit.convert(mc_retrofit.load_base(tmp_path / "orig"), MCConfig())
    model.save_pretrained(tmp_path / "conv")
    plain = type(base).from_pretrained(tmp_path / "conv")  # loads with the family's own class
    for k, v in base.state_dict().items():
        assert torch.equal(plain.state_dict()[k], v)


def test_export_to_directory(tmp_path):
    model = mc_retrofit.convert(tiny_model("mamba"), MCConfig(segment_size=3))
    mc_retrofit.export(model, tmp_path / "dir")
    _same(model, mc_retrofit.load(tmp_path / "dir"), torch.randint(0, 64, (1, 10)))


@pytest.mark.parametrize("family", TRANSFORMERS_FAMILIES)
def test_inspect_numbers_hand_computed(family, tmp_path):
    model = mc_retrofit.convert(tiny_model(family), MCConfig(segment_size=128, layers=[1]))
    model.save_pretrained(tmp_path / "conv")
    d = describe(tmp_path / "conv")
    c = model.config
    if family == "mamba2":  # 4 heads x head_dim 16 x state 8, fp32; summaries 4 heads x 8
        state, summary = 4 * 16 * 8 * 4, 4 * 8 * 4
    elif family == "mamba":  # intermediate 64 x state 8; one head of width 8
        state, summary = 64 * 8 * 4, 8 * 4
    else:  # (num, den, max) x 32 channels; one head of width 32
        state, summary = 3 * 32 * 4, 32 * 4
    assert (d.family, d.num_layers, d.mc_layers, d.converted) == (model.mc.config.family, c.num_hidden_layers, [1], True)
    assert d.state_bytes == state and d.summary_bytes == summary
    assert d.segment_bytes == state + summary  # one MC layer
    assert d.segments_per_1k == 8 and d.cache_bytes_per_1k == 8 * (state + summary)


def test_inspect_log_segmentation_and_unconverted(tmp_path):
    base = tiny_model("mamba2")
    base.save_pretrained(tmp_path / "orig")
    d = describe(tmp_path / "orig", MCConfig(segment_size=256))
    assert not d.converted and d.segments_per_1k == 4 and d.mc_layers == [0, 1]
    d = describe(tmp_path / "orig", MCConfig(segmentation="log"))
    assert d.segments_per_1k == 0  # 1024 is a single power of two, left open

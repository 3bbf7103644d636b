"""Sharded safetensors checkpoints (several ``model-0000i-of-0000n.safetensors`` and
``model.safetensors.index.json``, as ``save_pretrained(max_shard_size=...)`` writes them).

Oracles: the model that wrote the shards (its state_dict and forward), and round trips
(converted directory, exported file) compared bit for bit.
"""
from __future__ import annotations

import json

import pytest
import torch

import mc_retrofit
from conftest import tiny_model
from fla_oracles import tiny_fla_model
from mc_retrofit import MCConfig
from mc_retrofit.checkpoints import weight_files
from mc_retrofit.errors import MCError
from mc_retrofit.model import _header_shapes, check_layer_count

SHARD = "20KB"


def _sharded(family, path):
    model = tiny_fla_model(family) if family == "gla" else tiny_model(family)
    model.save_pretrained(path, max_shard_size=SHARD)
    return model


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", ["mamba2", "gla"])
def test_sharded_checkpoint_loads_converts_saves_and_exports(family, tmp_path):
    orig = _sharded(family, tmp_path / "ckpt")
    shards = weight_files(tmp_path / "ckpt")
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and {p.name for p in shards} == set(index["weight_map"].values())
    # the headers of all shards together name every tensor the index maps (and nothing else)
    assert set(_header_shapes(shards)) == set(index["weight_map"])
    check_layer_count(orig.config, index["weight_map"], "ckpt")  # every layer is in some shard

    base = mc_retrofit.load_base(tmp_path / "ckpt")
    assert _same_state(base, orig)
    ids = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(0))
    conv = mc_retrofit.convert(base, MCConfig(segment_size=8, cache_weight=0.5))
    want = _logits(conv, ids)

    # save_converted keeps the family's own sharded layout, with max_shard_size passed through
    mc_retrofit.save(conv, tmp_path / "conv", max_shard_size=SHARD)
    names = {p.name for p in (tmp_path / "conv").iterdir()}
    assert "model.safetensors.index.json" in names and len(weight_files(tmp_path / "conv")) > 2
    assert {"mc_config.json", "mc_gates.safetensors"} <= names
    again = mc_retrofit.load(tmp_path / "conv")
    assert _same_state(again, conv) and torch.equal(_logits(again, ids), want)

    # one file, and back, bit for bit
    mc_retrofit.export(again, tmp_path / "one.safetensors")
    back = mc_retrofit.load(tmp_path / "one.safetensors")
    assert _same_state(back, conv) and torch.equal(_logits(back, ids), want)


def test_a_missing_or_foreign_shard_is_refused(tmp_path):
    _sharded("mamba2", tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    # the layer-count check reads the names of every shard: a config asking for more layers fails
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(MCError, match="asks for 3 layers but the weights hold 2"):
        mc_retrofit.load_base(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    # a shard gone: its weights are missing, said in one line
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    layer1 = sorted({f for k, f in index["weight_map"].items() if ".layers.1." in k})[-1]
    (tmp_path / "ckpt" / layer1).unlink()
    with pytest.raises(MCError) as e:
        mc_retrofit.load_base(tmp_path / "ckpt")
    assert layer1 in str(e.value) and "\n" not in str(e.value)

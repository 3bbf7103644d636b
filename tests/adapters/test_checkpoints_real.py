"""The real checkpoints under ../shared, converted: rwkv.cpp's reference logits still hold."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import shared_path

import mc_retrofit
from mc_retrofit import MCConfig

BYTES = [0x22, 0x69, 0x6E]


def test_rwkv4_converted_reproduces_rwkv_cpp_logits(tmp_path):
    src = shared_path("checkpoints", "rwkv4-tiny-660K-hf")
    expected = torch.from_numpy(np.fromfile(src / "expected-logits-after-bytes-22-69-6e.f32", dtype=np.float32))
    model = mc_retrofit.convert(mc_retrofit.load_base(src), MCConfig(segment_size=2, cache_weight=0.0))
    with torch.no_grad():
        got = model(torch.tensor([BYTES])).logits[0, -1]
    assert (got - expected).abs().max() <= 1e-4
    # and after a save/load round trip (RWKV rescales weights in place in eval mode)
    model.save_pretrained(tmp_path / "conv")
    again = mc_retrofit.load(tmp_path / "conv")
    with torch.no_grad():
        assert torch.equal(again(torch.tensor([BYTES])).logits[0, -1], got)


def test_rwkv4_reads_caches_when_on():
    src = shared_path("checkpoints", "rwkv4-tiny-660K-hf")
    base = mc_retrofit.load_base(src)
    x = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = base(x).logits
        model = mc_retrofit.convert(mc_retrofit.load_base(src), MCConfig(segment_size=8))
        out = model(x).logits
    assert torch.equal(out[:, :8], ref[:, :8])  # the first segment reads nothing
    assert (out[:, 8:] - ref[:, 8:]).abs().max() > 1e-4


def test_mamba2_builtin_equals_shared_checkpoint():
    src = shared_path("checkpoints", "mamba2-byte-ctx512")
    a, b = mc_retrofit.load_base(src), mc_retrofit.load_base("builtin:mamba2-byte")
    for (ka, va), (kb, vb) in zip(sorted(a.state_dict().items()), sorted(b.state_dict().items())):
        assert ka == kb and torch.equal(va, vb)

"""GPU checks (marked ``gpu``; skipped without CUDA): the CPU leaf-op routing equals
fla's Triton path (bf16 tolerances), and Memory Caching on GPU equals it on CPU."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("fla")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.filterwarnings("ignore:According to Bo")]

from fla_oracles import FAMILIES, tiny_fla_model  # noqa: E402

import mc_retrofit as mc  # noqa: E402


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()


@pytest.mark.parametrize("family", FAMILIES)
def test_cpu_routing_equals_triton(family):
    ids = torch.randint(0, 64, (2, 96), generator=torch.Generator().manual_seed(0))
    cpu = tiny_fla_model(family)
    gpu = tiny_fla_model(family).cuda().to(torch.bfloat16)
    with torch.no_grad():
        want = cpu(ids).logits
        got = gpu(ids.cuda()).logits.cpu()
    assert _rel(got, want) < 5e-2  # bf16 Triton vs fp32 CPU


@pytest.mark.parametrize("family", FAMILIES)
def test_mc_gpu_equals_mc_cpu(family):
    ids = torch.randint(0, 64, (2, 96), generator=torch.Generator().manual_seed(1))
    cfg = mc.MCConfig(segment_size=32, aggregation="gated")
    cpu = mc.convert(tiny_fla_model(family), cfg)
    gpu = mc.convert(tiny_fla_model(family).cuda().to(torch.bfloat16), cfg)
    with torch.no_grad():
        want = cpu(ids).logits
        got = gpu(ids.cuda()).logits.cpu()
    assert _rel(got, want) < 5e-2

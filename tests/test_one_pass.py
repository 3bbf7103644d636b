"""One-pass capture (the family op once per layer call, boundary states from
``kernels.capture``, one read-out with per-token visibility) equals the per-segment loop:
outputs, caches for later calls, and gate gradients. CUDA takes it by default; here it is
forced on CPU with ``MC_RETROFIT_ONE_PASS``."""
from __future__ import annotations

import pytest
import torch
from conftest import count_calls, logits_in_calls, spans, tiny_model

import mc_retrofit
from mc_retrofit import MCConfig, cache_stats
from mc_retrofit.finetune import gate_parameters


def _both(monkeypatch, fn):
    monkeypatch.setenv("MC_RETROFIT_ONE_PASS", "0")
    loop = fn()
    monkeypatch.setenv("MC_RETROFIT_ONE_PASS", "1")
    return loop, fn()


@pytest.fixture
def captures(monkeypatch):
    """Counts one-pass captures (so a test knows the path it meant to test really ran)."""
    import mc_retrofit.adapters.transformers.mamba2 as mod

    return count_calls(monkeypatch, mod, "mamba2_boundary_states")


@pytest.mark.parametrize("aggregation", ["residual", "gated", "ssc"])
@pytest.mark.parametrize("T,C", [(23, 4), (24, 8), (5, 5)])
def test_one_pass_forward_equals_the_segment_loop(monkeypatch, captures, aggregation, T, C):
    model = mc_retrofit.convert(tiny_model("mamba2"), MCConfig(segment_size=C, aggregation=aggregation, top_k=1))
    x = torch.randint(0, 64, (2, T), generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        loop, one = _both(monkeypatch, lambda: model(x).logits)
    assert captures, "the one-pass path did not run"
    assert (loop - one).abs().max() <= 1e-5


def test_one_pass_then_split_calls_and_decoding_continue_the_same_cache(monkeypatch, captures):
    model = mc_retrofit.convert(tiny_model("mamba2"), MCConfig(segment_size=4, aggregation="gated"))
    x = torch.randint(0, 64, (2, 30), generator=torch.Generator().manual_seed(1))

    def split():
        # calls at 0, 8 (one pass, leaves an open tail), 13, 14 (mid-segment: loop), 16 (one pass)
        got, cache = logits_in_calls(model, x, spans(8, 5, 1, 2, 12), call_kwargs=lambda a, b, cache: {
            "cache_position": None if cache is None else torch.arange(a, b)})
        return got, cache_stats(cache)

    with torch.no_grad():
        (a, sa), (b, sb) = _both(monkeypatch, split)
        full = model(x[:, :28]).logits
    assert len(captures) == (3 + 1) * 2  # three one-pass calls and the full forward, two layers each
    assert sa == sb
    assert (a - b).abs().max() <= 1e-5 and (b - full).abs().max() <= 1e-5


def test_one_pass_gate_gradients_equal_the_loop(monkeypatch, captures):
    model = mc_retrofit.convert(tiny_model("mamba2"), MCConfig(segment_size=4, aggregation="gated",
                                                               gate_source="learned", cache_weight=0.7))
    with torch.no_grad():
        for n, p in gate_parameters(model):
            if "connector" in n:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(2))
    x = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(3))

    def grads():
        model.zero_grad(set_to_none=True)
        model(x, labels=x).loss.backward()
        return {n: p.grad.clone() for n, p in gate_parameters(model)}

    loop, one = _both(monkeypatch, grads)
    assert captures
    for n in loop:
        assert torch.allclose(loop[n], one[n], atol=1e-5, rtol=1e-4), n


def test_a_cap_that_bites_inside_the_call_keeps_the_loop(monkeypatch, captures):
    model = mc_retrofit.convert(tiny_model("mamba2"), MCConfig(segment_size=2, max_cached_segments=3))
    x = torch.randint(0, 64, (1, 16))
    with torch.no_grad():
        loop, one = _both(monkeypatch, lambda: model(x).logits)
    assert not captures  # 8 segments in one call would exceed the cap of 3: per-segment loop
    assert torch.equal(loop, one)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("aggregation", ["residual", "gated", "ssc"])
def test_cuda_default_path_equals_the_cpu_loop(monkeypatch, aggregation):
    """On CUDA the default is one pass + the Triton read-out; the oracle is the CPU loop."""
    monkeypatch.delenv("MC_RETROFIT_ONE_PASS", raising=False)
    monkeypatch.delenv("MC_RETROFIT_FORCE_REFERENCE", raising=False)
    cfg = MCConfig(segment_size=8, aggregation=aggregation, top_k=2)
    cpu = mc_retrofit.convert(tiny_model("mamba2"), cfg)
    gpu = mc_retrofit.convert(tiny_model("mamba2"), cfg).cuda()
    x = torch.randint(0, 64, (2, 70), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = cpu(x).logits
        got = gpu(x.cuda()).logits.cpu()
    assert (ref - got).abs().max() <= 1e-4

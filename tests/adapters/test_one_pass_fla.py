"""One-pass capture for every fla family (the layer's op once per call, the boundary states
from ``kernels.capture.gated_linear_boundary_states`` for GLA/RetNet/RWKV-6 or from the
recording chunkwise forms of ``adapters.fla.chunk`` for the delta rules) equals the
per-segment loop: outputs, caches for later calls, decoding. As ``tests/test_one_pass.py``
does for Mamba2, the path is forced on CPU with ``MC_RETROFIT_ONE_PASS``."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("fla")
pytestmark = pytest.mark.filterwarnings("ignore:Triton is not supported")

from conftest import count_calls, logits_in_calls, spans  # noqa: E402
from fla_oracles import FAMILIES, tiny_fla_model  # noqa: E402
from test_one_pass import _both  # noqa: E402  (loop first, then one pass)

import mc_retrofit  # noqa: E402
from mc_retrofit import MCConfig, cache_stats  # noqa: E402
from mc_retrofit import segments  # noqa: E402

TOL = 1e-5


@pytest.fixture
def one_pass_calls(monkeypatch):
    """Counts layer calls that really took the one-pass path (a capture returned states)."""
    return count_calls(monkeypatch, segments, "_run_one_pass")


def _ids(T, seed, B=2):
    return torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("T,C,aggregation", [(23, 4, "gated"), (24, 8, "ssc"), (70, 16, "residual")])
def test_one_pass_forward_equals_the_segment_loop(monkeypatch, one_pass_calls, family, T, C, aggregation):
    # T = 70 > 64 runs the layers' chunk ops, shorter calls their fused-recurrent ops
    model = mc_retrofit.convert(tiny_fla_model(family), MCConfig(segment_size=C, aggregation=aggregation, top_k=1))
    x = _ids(T, T)
    with torch.no_grad():
        loop, one = _both(monkeypatch, lambda: model(x).logits)
    assert len(one_pass_calls) == model.config.num_hidden_layers, "the one-pass path did not run in every layer"
    assert (loop - one).abs().max() <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_one_pass_then_split_calls_and_decoding_continue_the_same_cache(monkeypatch, one_pass_calls, family):
    model = mc_retrofit.convert(tiny_fla_model(family), MCConfig(segment_size=4, aggregation="gated"))
    x = _ids(30, 1)

    def split():
        # calls at 0 (one pass), 8 (one pass, leaves an open tail), 13, 14, 15 (decoding off a boundary: the
        # loop), 16 (one pass on the cache the loop continued)
        got, cache = logits_in_calls(model, x, spans(8, 5, 1, 1, 1, 12))
        return got, cache_stats(cache)

    with torch.no_grad():
        (a, sa), (b, sb) = _both(monkeypatch, split)
        full = model(x[:, :28]).logits
    layers = model.config.num_hidden_layers
    assert len(one_pass_calls) == (3 + 1) * layers  # three one-pass calls and the full forward
    assert sa == sb
    assert (a - b).abs().max() <= TOL and (b - full).abs().max() <= TOL


@pytest.mark.parametrize("T", [23, 70])
def test_qwen3_next_gated_deltanet_layers_take_one_pass(monkeypatch, one_pass_calls, T):
    """The hybrid's Gated DeltaNet layers share Gated DeltaNet's spec (and its chunkwise capture)."""
    from fla_oracles import tiny_qwen3_next

    model = mc_retrofit.convert(tiny_qwen3_next(), MCConfig(segment_size=4, aggregation="gated"))
    x = _ids(T, 5)
    with torch.no_grad():
        loop, one = _both(monkeypatch, lambda: model(x).logits)
    assert len(one_pass_calls) == 1  # its one linear-attention layer
    assert (loop - one).abs().max() <= TOL


@pytest.mark.parametrize("family", ["gla", "delta_net"])
def test_a_call_off_a_boundary_keeps_the_loop(monkeypatch, one_pass_calls, family):
    """A call that starts inside a segment (a cache whose clock is not on a boundary)."""
    model = mc_retrofit.convert(tiny_fla_model(family), MCConfig(segment_size=4))
    x = _ids(14, 2)

    def run():
        out, cache = mc_retrofit.forward_with_cache(model, x[:, :3], None)
        rest, _ = mc_retrofit.forward_with_cache(model, x[:, 3:], cache)
        return torch.cat([out.logits, rest.logits], 1)

    with torch.no_grad():
        loop, one = _both(monkeypatch, run)
    assert not one_pass_calls
    assert torch.equal(loop, one)


def test_chunkwise_capture_records_every_segment_end():
    """The recording chunkwise form against the token-by-token recurrence (fla's naive one),
    with a segment size the default chunk does not divide."""
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule

    from mc_retrofit.adapters.fla import chunk

    g = torch.Generator().manual_seed(0)
    B, T, H, K, V, C = 1, 23, 2, 4, 3, 6
    q, k = (torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=g), dim=-1) for _ in range(2))
    v, beta = torch.randn(B, T, H, V, generator=g), torch.rand(B, T, H, generator=g)
    gate = torch.nn.functional.logsigmoid(torch.randn(B, T, H, generator=g))
    with chunk.capturing(C) as sink:
        o, final = chunk.gated_delta_rule_chunked(q, k, v, beta, gate, output_final_state=True)
    assert sink.chunk == 6 and len(sink.states) == T // C
    S = None
    for i in range(T // C):
        a, b = i * C, (i + 1) * C
        _, S = naive_recurrent_gated_delta_rule(q[:, a:b], k[:, a:b], v[:, a:b], beta[:, a:b], gate[:, a:b],
                                                initial_state=S, output_final_state=True)
        torch.testing.assert_close(sink.states[i], S, atol=1e-5, rtol=1e-5)
    want, want_final = naive_recurrent_gated_delta_rule(q, k, v, beta, gate, output_final_state=True)
    torch.testing.assert_close(o, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final, want_final, atol=1e-5, rtol=1e-5)
    assert chunk.during_capture("naive", "chunked") == "naive"  # outside the block: fla_cpu's own recurrence


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", ["gla", "retnet", "rwkv6"])
def test_cuda_one_pass_equals_the_cpu_loop(monkeypatch, family):
    """On CUDA the gated-linear families capture through fla's ``chunk_fwd_h`` (segment 64);
    the oracle is the CPU per-segment loop."""
    monkeypatch.delenv("MC_RETROFIT_FORCE_REFERENCE", raising=False)
    cfg = MCConfig(segment_size=64, aggregation="gated")
    cpu = mc_retrofit.convert(tiny_fla_model(family), cfg)
    gpu = mc_retrofit.convert(tiny_fla_model(family), cfg).cuda()
    x = _ids(200, 4)
    with torch.no_grad():
        monkeypatch.setenv("MC_RETROFIT_ONE_PASS", "0")
        ref = cpu(x).logits
        monkeypatch.delenv("MC_RETROFIT_ONE_PASS")
        got = gpu(x.cuda()).logits.cpu()
    assert (ref - got).abs().max() <= 2e-2

"""adapters/fla/chunk.py: the chunkwise recurrences used while training fla families on CPU
against fla's own naive (per-token) recurrences, forward and gradients, and a whole tiny
model of each family with and without the chunkwise routing."""
from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("fla")
pytestmark = pytest.mark.filterwarnings("ignore:Triton is not supported")

from conftest import ROOT  # noqa: E402

sys.path.insert(0, str(ROOT / "recipes"))
from mc_retrofit import compat  # noqa: E402
from mc_retrofit.adapters.fla import chunk as fast_chunk  # noqa: E402
import families  # noqa: E402

from fla.ops.delta_rule.naive import delta_rule_recurrence  # noqa: E402
from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule  # noqa: E402
from fla.ops.generalized_delta_rule.dplr.naive import dplr_recurrence  # noqa: E402
from fla.ops.gla.naive import naive_recurrent_gla  # noqa: E402

B, H, K, V = 2, 2, 8, 6


def _inputs(kind, T, seed, strong_gate=False):
    """Inputs of one naive recurrence as fla_cpu calls it (its layout), fp32, requiring grad."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    if kind == "delta_rule":  # [B, H, T, D], unit keys as DeltaNet's l2 norm gives
        x = dict(q=r(B, H, T, K), k=F.normalize(r(B, H, T, K), dim=-1), v=r(B, H, T, V),
                 beta=torch.rand(B, H, T, generator=g))
    elif kind == "gated_delta_rule":  # [B, T, H, D], scalar gate per head
        x = dict(q=r(B, T, H, K), k=F.normalize(r(B, T, H, K), dim=-1), v=r(B, T, H, V),
                 beta=torch.rand(B, T, H, generator=g), g=F.logsigmoid(r(B, T, H)))
    elif kind == "gla":  # [B, T, H, K], per-key gates; strong: some saturated (log decay -40)
        gk = F.logsigmoid(r(B, T, H, K))
        if strong_gate:
            gk = torch.where(torch.rand(B, T, H, K, generator=g) < 0.2, torch.full_like(gk, -40.0), gk)
        x = dict(q=r(B, T, H, K), k=r(B, T, H, K), v=r(B, T, H, V), gk=gk)
    else:  # dplr as RWKV-7 calls it: alpha = -kk, beta = kk * a, RWKV-7's bounded decay
        kk = F.normalize(r(B, H, T, K), dim=-1)
        x = dict(q=r(B, H, T, K), k=r(B, H, T, K), v=r(B, H, T, V), alpha=-kk,
                 beta=kk * torch.rand(B, H, T, K, generator=g), gk=-0.6065 * torch.rand(B, H, T, K, generator=g))
    return {n: t.requires_grad_(True) for n, t in x.items()}


NAIVE = {"delta_rule": (delta_rule_recurrence, fast_chunk.delta_rule_chunked),
         "gated_delta_rule": (naive_recurrent_gated_delta_rule, fast_chunk.gated_delta_rule_chunked),
         "gla": (naive_recurrent_gla, fast_chunk.gla_chunked),
         "dplr": (dplr_recurrence, fast_chunk.dplr_chunked)}


def _run(fn, x, state, kind):
    kw = dict(x, initial_state=state, output_final_state=True)
    if kind == "gated_delta_rule":
        kw["scale"] = 0.3
    o, S = fn(**kw)
    loss = (o * torch.linspace(-1, 1, o.shape[-1])).sum() + (S * 0.5).sum()  # both outputs reach the grads
    grads = torch.autograd.grad(loss, list(x.values()) + ([state] if state is not None else []))
    return o.detach(), S.detach(), grads


@pytest.mark.parametrize("kind", sorted(NAIVE))
@pytest.mark.parametrize("T,chunk,with_state", [(37, 16, True), (16, 16, False), (5, 4, True), (23, 8, False)])
def test_chunkwise_equals_naive_forward_and_gradients(kind, T, chunk, with_state, monkeypatch):
    monkeypatch.setattr(fast_chunk, "CHUNK", chunk)
    naive, fast = NAIVE[kind]
    x = _inputs(kind, T, seed=T)
    state = torch.randn(B, H, K, V, generator=torch.Generator().manual_seed(1)).requires_grad_(True) \
        if with_state else None
    o1, S1, g1 = _run(naive, x, state, kind)
    o2, S2, g2 = _run(fast, x, state, kind)
    torch.testing.assert_close(o2, o1, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(S2, S1, atol=1e-4, rtol=1e-4)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["gla", "dplr"])
def test_exact_broadcast_path_for_strong_decays(kind, monkeypatch):
    """Above SAFE_SPAN (a saturated gate) the scores use the masked-exponent broadcast: still
    the naive results, and finite. Forcing it (SAFE_SPAN = 0) gives the same as the matmul path."""
    x = _inputs(kind, 21, seed=3, strong_gate=True)
    o1, S1, g1 = _run(NAIVE[kind][0], x, None, kind)
    results = []
    for span in (fast_chunk.SAFE_SPAN, 0.0):
        monkeypatch.setattr(fast_chunk, "SAFE_SPAN", span)
        results.append(_run(NAIVE[kind][1], x, None, kind))
    for o2, S2, g2 in results:
        torch.testing.assert_close(o2, o1, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(S2, S1, atol=1e-4, rtol=1e-4)
        for a, b in zip(g2, g1):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_per_channel_beta_keeps_the_recurrent_reference():
    x = _inputs("delta_rule", 9, seed=0)
    beta = torch.rand(B, H, 9, V)
    with fast_chunk.patched():
        o, S = fast_chunk.delta_rule_chunked(x["q"], x["k"], x["v"], beta)
    want, want_S = delta_rule_recurrence(x["q"], x["k"], x["v"], beta)
    assert torch.equal(o, want) and torch.equal(S, want_S)


def test_patched_swaps_and_restores_the_naive_recurrences():
    import fla.ops.gla.naive as gla_naive

    before = gla_naive.naive_recurrent_gla
    with pytest.raises(RuntimeError, match="boom"), fast_chunk.patched():
        assert gla_naive.naive_recurrent_gla.func is fast_chunk.gla_chunked  # bound to the recurrent original
        assert compat.patched(gla_naive, "naive_recurrent_gla") is not None  # declared in the one registry
        raise RuntimeError("boom")
    assert gla_naive.naive_recurrent_gla is before and compat.patched(gla_naive, "naive_recurrent_gla") is None


TINY = {"delta_net": {"num_heads": 2}, "gated_deltanet": {"num_heads": 2, "head_dim": 16},
        "retnet": {"num_heads": 2}, "gla": {"num_heads": 2}, "rwkv7": {"head_dim": 16, "num_hidden_layers": 2}}


CORE = {"delta_net": "gated_delta_core", "gated_deltanet": "gated_delta_core", "retnet": "gla_core",
        "gla": "gla_core", "rwkv7": "dplr_core"}


@pytest.mark.parametrize("family", sorted(TINY))
def test_whole_model_loss_and_grads_equal_with_and_without(family, monkeypatch):
    """A tiny model of each fla family in training mode (chunk mode: 70 > 64 tokens): the
    same loss and parameter gradients through fla_cpu's recurrent references and chunkwise."""
    calls = []
    core = getattr(fast_chunk, CORE[family])
    monkeypatch.setattr(fast_chunk, CORE[family], lambda *a, **k: calls.append(1) or core(*a, **k))
    model = families.build(family, vocab_size=32, seed=0,
                           **{"hidden_size": 32, "num_hidden_layers": 1, **TINY[family]}).train()
    ids = torch.randint(0, 32, (2, 71), generator=torch.Generator().manual_seed(0))

    def run():
        model.zero_grad()
        logits = model(input_ids=ids[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, 32), ids[:, 1:].reshape(-1))
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    loss, grads = run()
    with families.speed_context(family):
        fast_loss, fast_grads = run()
    assert len(calls) == model.config.num_hidden_layers  # the chunkwise core ran in every layer
    torch.testing.assert_close(fast_loss, loss, atol=1e-5, rtol=1e-5)
    assert len(fast_grads) == len(grads)
    scale = max(float(g.abs().max()) for g in grads)
    for a, b in zip(fast_grads, grads):
        torch.testing.assert_close(a, b, atol=1e-4 * scale, rtol=1e-4)

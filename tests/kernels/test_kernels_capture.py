"""One-pass boundary-state capture against running the recurrence segment by segment."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mc_retrofit.adapters.transformers.mamba2 import mamba2_boundary_states
from mc_retrofit.kernels.capture import linear_boundary_states


def stepwise(k, v, g, gk, gv, S, a, b):
    """Token-by-token recurrence over tokens a:b from state S (the oracle)."""
    S = S.clone()
    for t in range(a, b):
        dk = torch.exp(g[:, t, :, None] + gk[:, t])  # [B,H,K]
        dv = torch.exp(gv[:, t])  # [B,H,V]
        S = dk[..., None] * S * dv[:, :, None, :] + k[:, t, :, :, None] * v[:, t, :, None, :]
    return S


def rand_linear(B, T, H, K, V, seed):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return dict(k=r(B, T, H, K), v=r(B, T, H, V), g=-torch.rand(B, T, H, generator=gen) * 0.3,
                gk=-torch.rand(B, T, H, K, generator=gen) * 0.3, gv=-torch.rand(B, T, H, V, generator=gen) * 0.2,
                h0=r(B, H, K, V))


@settings(max_examples=12, deadline=None)
@given(T=st.integers(1, 23), C=st.integers(1, 8), seed=st.integers(0, 999), with_h0=st.booleans())
def test_linear_boundaries_match_segment_by_segment(T, C, seed, with_h0):
    x = rand_linear(2, T, 2, 4, 3, seed)
    h0 = x["h0"] if with_h0 else torch.zeros_like(x["h0"])
    bounds, final = linear_boundary_states(x["k"], x["v"], g=x["g"], gk=x["gk"], gv=x["gv"],
                                           initial_state=h0 if with_h0 else None, segment_size=C)
    S, expect = h0, []
    for a in range(0, T, C):
        S = stepwise(x["k"], x["v"], x["g"], x["gk"], x["gv"], S, a, min(T, a + C))
        if a + C <= T:
            expect.append(S)
    assert bounds.shape == (2, T // C, 2, 4, 3)
    for i, e in enumerate(expect):
        torch.testing.assert_close(bounds[:, i], e, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(final, S, atol=1e-4, rtol=1e-4)


def test_mamba2_boundaries_match_transformers_op_per_segment():
    """The oracle is transformers' own torch ``mamba2_chunk_scan`` run segment by segment
    with ``initial_states`` chained (what the runner does today)."""
    from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

    orig = getattr(mamba2_chunk_scan, "__wrapped__", mamba2_chunk_scan)  # under an MC wrapper
    gen = torch.Generator().manual_seed(0)
    Bsz, T, H, P, G, N, C = 2, 22, 4, 5, 2, 6, 8
    x = torch.randn(Bsz, T, H, P, generator=gen)
    dt = torch.randn(Bsz, T, H, generator=gen)
    A = -torch.rand(H, generator=gen) - 0.5
    Bm = torch.randn(Bsz, T, G, N, generator=gen)
    Cm = torch.randn(Bsz, T, G, N, generator=gen)
    dt_bias = torch.randn(H, generator=gen) * 0.1
    h0 = torch.randn(Bsz, H, P, N, generator=gen)
    kw = dict(dt_bias=dt_bias, dt_softplus=True)
    bounds, final = mamba2_boundary_states(x, dt, A, Bm, C, initial_states=h0, **kw)
    S = h0
    for i, a in enumerate(range(0, T, C)):
        b = min(T, a + C)
        _, S = orig(x[:, a:b], dt[:, a:b], A, Bm[:, a:b], Cm[:, a:b], 4, initial_states=S, return_final_states=True,
                    **kw)
        if b - a == C:
            torch.testing.assert_close(bounds[:, i], S.float(), atol=1e-4, rtol=1e-4)
    assert bounds.shape[1] == T // C
    torch.testing.assert_close(final, S.float(), atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("T", [256, 300])
def test_fla_chunk_h_boundaries_match_reference(T):
    from mc_retrofit.kernels.capture import fla_boundary_states

    x = {k: v.cuda() for k, v in rand_linear(1, T, 2, 64, 64, 0).items()}
    ref_b, ref_f = linear_boundary_states(x["k"], x["v"], gk=x["gk"], initial_state=x["h0"], segment_size=128)
    b, f = fla_boundary_states(x["k"], x["v"], gk=x["gk"], initial_state=x["h0"], segment_size=128)
    torch.testing.assert_close(b.float(), ref_b, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(f.float(), ref_f, atol=2e-2, rtol=2e-2)

"""The CPU leaf-op routing (mc_retrofit.adapters.fla.cpu) against fla's own torch references and
``naive`` recurrences, and against hand computations."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("fla")
pytestmark = pytest.mark.filterwarnings("ignore:Triton is not supported")

from mc_retrofit.adapters.fla import cpu as fla_cpu  # noqa: E402

fla_cpu.enable()
G = torch.Generator().manual_seed(0)


def rnd(*shape, scale=1.0):
    return torch.randn(*shape, generator=G) * scale


def test_norms_match_fla_refs():
    from fla.modules import FusedRMSNormGated, GroupNorm, LayerNorm, RMSNorm
    from fla.modules.norm.layernorm import group_norm_ref, layer_norm_ref, rms_norm_ref

    x, res = rnd(2, 5, 16), rnd(2, 5, 16)
    rms, ln, gn = RMSNorm(16), LayerNorm(16), GroupNorm(4, 16, bias=True)
    for m in (rms, ln, gn):
        with torch.no_grad():
            m.weight.normal_(generator=G)
    assert torch.allclose(rms(x), rms_norm_ref(x, rms.weight, None, eps=rms.eps), atol=1e-6)
    y, r = rms(x, residual=res, prenorm=True)
    want, want_r = rms_norm_ref(x, rms.weight, None, residual=res, eps=rms.eps, prenorm=True)
    assert torch.allclose(y, want, atol=1e-6) and torch.allclose(r, want_r)
    assert torch.allclose(ln(x), layer_norm_ref(x, ln.weight, ln.bias, eps=ln.eps), atol=1e-5)
    assert torch.allclose(gn(x), group_norm_ref(x, gn.weight, gn.bias, 4, eps=gn.eps), atol=1e-5)
    gated = FusedRMSNormGated(16)
    g = rnd(2, 5, 16)
    assert torch.allclose(gated(x, g), rms_norm_ref(x, gated.weight, None, eps=gated.eps) * F.silu(g), atol=1e-6)


def test_token_shift_conv_rotary_l2norm():
    from fla.modules import ShortConvolution
    from fla.modules.l2norm import l2norm
    from fla.modules.rotary import RotaryEmbedding, rotary_embedding_ref
    from fla.modules.token_shift import token_shift, token_shift_ref

    x = rnd(2, 7, 8)
    assert torch.allclose(token_shift(x), token_shift_ref(x))
    d1, c = token_shift(x[:, :3], output_cache=True)
    d2, _ = token_shift(x[:, 3:], cache=c, output_cache=True)
    assert torch.allclose(torch.cat([d1, d2], 1), token_shift_ref(x))

    conv = ShortConvolution(8, 4, activation="silu")
    y, _ = conv(x)
    want = F.silu(F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), conv.weight, conv.bias, groups=8)).transpose(1, 2)
    assert torch.allclose(y, want, atol=1e-6)
    with torch.no_grad():  # prefill with a cache, then one-token steps (in-place cache update)
        y1, cache = conv(x[:, :4], output_final_state=True)
        steps = [conv(x[:, t:t + 1], cache=cache, output_final_state=True)[0] for t in range(4, 7)]
    assert torch.allclose(torch.cat([y1] + steps, 1), want, atol=1e-6)

    rot = RotaryEmbedding(8)
    q, k = rnd(2, 7, 2, 8), rnd(2, 7, 2, 8)
    q2, _ = rot(q, k, seqlen_offset=3)
    rot._update_cos_sin_cache(16, q.device, q.dtype)
    want = rotary_embedding_ref(q, rot._cos_cached[3:10], rot._sin_cached[3:10])
    assert torch.allclose(q2, want, atol=1e-6)
    assert torch.allclose(l2norm(q), F.normalize(q, dim=-1), atol=1e-5)


def _split(ref, kw, time_args, t):
    """Run ``ref`` in two calls chained by the state: must equal one call."""
    o, S = ref(**kw, output_final_state=True)
    a = {n: (v[:, :t] if n in time_args else v) for n, v in kw.items()}
    b = {n: (v[:, t:] if n in time_args else v) for n, v in kw.items()}
    o1, S1 = ref(**a, output_final_state=True)
    o2, S2 = ref(**b, initial_state=S1, output_final_state=True)
    assert torch.allclose(torch.cat([o1, o2], 1), o, atol=1e-5) and torch.allclose(S2, S, atol=1e-5)
    return o, S


B, T, H, K, V = 2, 9, 2, 8, 6


def test_delta_rule_matches_naive():
    from fla.ops.delta_rule.naive import delta_rule_recurrence

    q, k, v, beta = rnd(B, T, H, K), F.normalize(rnd(B, T, H, K), dim=-1), rnd(B, T, H, V), rnd(B, T, H).sigmoid()
    o, S = _split(fla_cpu.delta_rule_ref, dict(q=q, k=k, v=v, beta=beta), "qkvbeta", 4)
    wo, wS = delta_rule_recurrence(*(x.transpose(1, 2) for x in (q, k, v, beta)), output_final_state=True)
    assert torch.allclose(o, wo.transpose(1, 2), atol=1e-5) and torch.allclose(S, wS, atol=1e-5)


def test_gated_delta_rule_matches_naive_with_gate_gva_and_v_first():
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule

    HV = 4
    q, k, v = rnd(B, T, H, K), rnd(B, T, H, K), rnd(B, T, HV, V)
    a, b, A_log, dt_bias = rnd(B, T, HV), rnd(B, T, HV), rnd(HV, scale=0.3), rnd(HV, scale=0.3)
    kw = dict(q=q, k=k, v=v, g=a, beta=b, use_qk_l2norm_in_kernel=True, use_beta_sigmoid_in_kernel=True,
              use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias, state_v_first=True)
    o, S = _split(fla_cpu.gated_delta_rule_ref, kw, ("q", "k", "v", "g", "beta"), 5)
    g = -A_log.exp() * F.softplus(a + dt_bias)
    qn, kn = (F.normalize(x, dim=-1, eps=0).repeat_interleave(2, dim=2) for x in (q, k))
    wo, wS = naive_recurrent_gated_delta_rule(qn, kn, v, b.sigmoid(), g, output_final_state=True)
    assert torch.allclose(o, wo, atol=1e-5) and torch.allclose(S, wS.transpose(-1, -2), atol=1e-5)


def test_gla_and_retention_match_naive():
    from fla.ops.gla.naive import naive_recurrent_gla
    from fla.ops.retention.naive import naive_retention

    q, k, v, gk = rnd(B, T, H, K), rnd(B, T, H, K), rnd(B, T, H, V), F.logsigmoid(rnd(B, T, H, K))
    o, S = _split(fla_cpu.gla_ref, dict(q=q, k=k, v=v, g=gk, state_v_first=True), "qkvg", 3)
    wo, wS = naive_recurrent_gla(q, k, v, gk, output_final_state=True)
    assert torch.allclose(o, wo, atol=1e-5) and torch.allclose(S, wS.transpose(-1, -2), atol=1e-5)
    o, _ = _split(fla_cpu.retention_ref, dict(q=q, k=k, v=v), "qkv", 4)
    wo = naive_retention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    assert torch.allclose(o, wo, atol=1e-4)


def test_rwkv6_matches_naive_and_hand_step():
    from fla.ops.rwkv6.recurrent_naive import naive_recurrent_rwkv6

    r, k, v, w, u = rnd(B, T, H, K), rnd(B, T, H, K), rnd(B, T, H, V), -rnd(B, T, H, K).exp(), rnd(H, K)
    o, S = _split(fla_cpu.rwkv6_ref, dict(r=r, k=k, v=v, w=w, u=u, scale=1.0), "rkvw", 4)
    wo, _ = naive_recurrent_rwkv6(*(x.transpose(1, 2) for x in (r, k, v, w)), u, scale=1.0)
    assert torch.allclose(o, wo.transpose(1, 2), atol=1e-5)
    h = torch.zeros(B, H, K, V)  # pre-update state plus the bonus on the current token
    for t in range(T):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]
        assert torch.allclose(o[:, t], torch.einsum("bhk,bhkv->bhv", r[:, t], h + u[None, :, :, None] * kv), atol=1e-5)
        h = h * w[:, t].exp()[..., None] + kv
    assert torch.allclose(S, h, atol=1e-5)


def test_rwkv7_matches_dplr_naive_and_hand_step():
    from fla.ops.generalized_delta_rule.dplr.naive import dplr_recurrence

    r, k, v = rnd(B, T, H, K), rnd(B, T, H, K), rnd(B, T, H, V)
    kk, a, w = F.normalize(rnd(B, T, H, K), dim=-1), rnd(B, T, H, K).sigmoid(), -0.6 * rnd(B, T, H, K).sigmoid()
    kw = dict(r=r, w=w, k=k, v=v, kk=kk, a=a)
    o, S = _split(fla_cpu.rwkv7_mul_ref, kw, ("r", "w", "k", "v", "kk", "a"), 5)
    wo, _ = dplr_recurrence(*(x.transpose(1, 2) for x in (r * K ** 0.5, k, v, -kk, kk * a, w)))
    assert torch.allclose(o, wo.transpose(1, 2), atol=1e-4)
    h = torch.zeros(B, H, K, V)
    for t in range(T):
        sa = torch.einsum("bhk,bhkv->bhv", -kk[:, t], h)
        h = w[:, t].exp()[..., None] * h + (kk[:, t] * a[:, t])[..., None] * sa[:, :, None] \
            + k[:, t, :, :, None] * v[:, t, :, None, :]
        assert torch.allclose(o[:, t], torch.einsum("bhk,bhkv->bhv", r[:, t], h), atol=1e-5)
    assert torch.allclose(S, h, atol=1e-5)


def test_gpu_tensors_bypass_the_routing():
    """Only CPU tensors are routed: the dispatcher keeps fla's original op for others."""
    import fla.layers.gla as gla_layer

    from mc_retrofit import compat

    op = compat.PATCHES[("fla.layers.gla", "chunk_gla", "fla-cpu")].replacement  # under any MC wrapper
    assert op.__mc_cpu_ref__ is fla_cpu.gla_ref
    from fla.ops.gla import chunk_gla

    assert op.__mc_cpu_original__ is chunk_gla


@pytest.mark.parametrize("name,act", [("swiglu", F.silu), ("sigmoidglu", torch.sigmoid)])
def test_glu_backward_routes_give_autograd_gradients(name, act):
    """The gated MLP's backward (``*glu_fwdbwd``, and through it ``*glu`` / ``*glu_linear``)
    gives the gradients autograd gets for ``act(x) * y`` (and its linear layer)."""
    from fla.modules import activations

    x, y, g = rnd(3, 5, 8), rnd(3, 5, 8), rnd(3, 5, 8)
    xr, yr = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    z = act(xr) * yr
    want_dx, want_dy = torch.autograd.grad(z, (xr, yr), g)
    dx, dy, zz = getattr(activations.ops, f"{name}_fwdbwd")(x, y, g, use_weight=True)
    assert torch.allclose(dx, want_dx, atol=1e-6) and torch.allclose(dy, want_dy, atol=1e-6)
    assert torch.allclose(zz, z.detach(), atol=1e-6)
    assert len(getattr(activations.ops, f"{name}_fwdbwd")(x, y, g)) == 2

    w, b = rnd(4, 8), rnd(4)
    xa, ya, wa = x.clone().requires_grad_(True), y.clone().requires_grad_(True), w.clone().requires_grad_(True)
    xb, yb, wb = x.clone().requires_grad_(True), y.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out_grad = rnd(3, 5, 4)
    (getattr(activations, f"{name}_linear")(xa, ya, wa, b) * out_grad).sum().backward()
    (F.linear(act(xb) * yb, wb, b) * out_grad).sum().backward()
    for a, want in ((xa, xb), (ya, yb), (wa, wb)):
        assert torch.allclose(a.grad, want.grad, atol=1e-5)

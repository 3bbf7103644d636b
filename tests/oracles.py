"""Slow, obviously correct Memory Caching oracles, written independently of mc_retrofit.

Each family's mixer is re-implemented from its weights, stepping the recurrence one
token at a time, snapshotting the state at every segment boundary, and aggregating
with explicit per-token, per-head loops. Only constant segmentation is modelled.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def aggregate(online, reads, u, pooled, online_pool, *, aggregation, top_k, temperature, online_bias, mix):
    """One token: online ``[H,V]``, reads list of ``[H,V]``, u ``[H,U]``, pooled list of
    ``[H,U]``, online_pool ``[H,U]``, mix ``[H]``, online_bias a float or ``[H]``. Returns ``[H,V]``."""
    H = online.shape[0]
    out = online.clone()
    if not reads:
        return out
    for h in range(H):
        if aggregation == "residual":
            agg = online[h] + sum(r[h] for r in reads)
        else:
            s = 1.0 / (math.sqrt(u.shape[-1]) * temperature)
            b = float(online_bias[h]) if isinstance(online_bias, torch.Tensor) else online_bias
            l0 = float(u[h] @ online_pool[h]) * s + b
            li = [float(u[h] @ p[h]) * s for p in pooled]
            keep = list(range(len(reads)))
            if aggregation == "ssc":
                keep = sorted(keep, key=lambda i: -li[i])[:top_k]
            logits = [l0] + [li[i] for i in keep]
            m = max(logits)
            e = [math.exp(x - m) for x in logits]
            z = sum(e)
            agg = e[0] / z * online[h]
            for j, i in enumerate(keep):
                agg = agg + e[j + 1] / z * reads[i][h]
        out[h] = online[h] + float(mix[h]) * (agg - online[h])
    return out


def _segments_of(T, C):
    return [t // C for t in range(T)]


def linear_mc(q, k, step, S0, read, C, cfg):
    """Generic token loop for a linear memory, one sequence.

    q, k ``[T,H,U]``; ``step(S, t) -> S`` advances the state over token t; ``read(S, t)``
    gives the online output ``[H,V]`` of token t from the state after it; cached reads
    use the same ``read`` on a snapshot. Returns ``[T,H,V]``."""
    T = q.shape[0]
    S = S0
    snaps, pooled, outs = [], [], []
    seg_keys = []
    for t in range(T):
        if t > 0 and t % C == 0:  # the previous segment just ended
            snaps.append(S.clone())
            pooled.append(torch.stack(seg_keys).mean(0))
            seg_keys = []
        S = step(S, t)
        seg_keys.append(k[t])
        online = read(S, t)
        reads = [read(Si, t) for Si in snaps]
        outs.append(aggregate(online, reads, q[t], pooled, torch.stack(seg_keys).mean(0), **cfg))
    return torch.stack(outs)


def mc_cfg(config, gate):
    return dict(aggregation=config.aggregation, top_k=config.top_k, temperature=config.temperature,
                online_bias=gate.online_bias.detach(), mix=gate.cache_weight.detach())


# -- Mamba2 --------------------------------------------------------------------------
def mamba2_mixer(mixer, hidden, config):
    """Mamba2Mixer with MC, token by token. hidden ``[B,T,D]`` -> ``[B,T,D]``."""
    Bsz, T, _ = hidden.shape
    H, P, N, G = mixer.num_heads, mixer.head_dim, mixer.ssm_state_size, mixer.n_groups
    I = mixer.intermediate_size
    proj = mixer.in_proj(hidden)
    z, xBC, dt = proj.split([I, mixer.conv_dim, H], dim=-1)
    xBC = F.silu(mixer.conv1d(xBC.transpose(1, 2))[..., :T].transpose(1, 2))
    x, Bm, Cm = xBC.split([I, G * N, G * N], dim=-1)
    x = x.view(Bsz, T, H, P)
    Bm = Bm.view(Bsz, T, G, N).repeat_interleave(H // G, 2)
    Cm = Cm.view(Bsz, T, G, N).repeat_interleave(H // G, 2)
    dt = F.softplus(dt + mixer.dt_bias).clamp(*mixer.time_step_limit)
    A = -torch.exp(mixer.A_log.float())
    out = []
    for b in range(Bsz):
        def step(S, t, b=b):
            dA = torch.exp(dt[b, t] * A)  # [H]
            return S * dA[:, None, None] + (dt[b, t][:, None, None] * x[b, t][:, :, None] * Bm[b, t][:, None, :])

        def read(S, t, b=b):
            return torch.einsum("hpn,hn->hp", S, Cm[b, t])

        y = linear_mc(Cm[b], Bm[b], step, torch.zeros(H, P, N), read, config.segment_size,
                      mc_cfg(config, mixer.mc_gate if hasattr(mixer, "mc_gate") else _off(H)))
        out.append(y + mixer.D[:, None] * x[b])
    y = torch.stack(out).reshape(Bsz, T, I)
    return mixer.out_proj(mixer.norm(y, z))


# -- Mamba -------------------------------------------------------------------------------
def mamba_mixer(mixer, hidden, config):
    Bsz, T, _ = hidden.shape
    N, I = mixer.ssm_state_size, mixer.intermediate_size
    proj = mixer.in_proj(hidden).transpose(1, 2)
    x, z = proj.chunk(2, dim=1)
    x = F.silu(mixer.conv1d(x)[..., :T])  # [B, I, T]
    dbc = mixer.x_proj(x.transpose(1, 2))
    dt, Bm, Cm = dbc.split([mixer.time_step_rank, N, N], dim=-1)
    dt = F.softplus(mixer.dt_proj(dt))  # [B, T, I]
    A = -torch.exp(mixer.A_log.float())  # [I, N]
    xs = x.transpose(1, 2)
    out = []
    for b in range(Bsz):
        def step(S, t, b=b):  # S [1, I, N]: one head, V-first
            return S * torch.exp(dt[b, t][:, None] * A)[None] + (dt[b, t] * xs[b, t])[None, :, None] * Bm[b, t][None, None, :]

        def read(S, t, b=b):
            return S @ Cm[b, t]  # [1, I]

        y = linear_mc(Cm[b][:, None], Bm[b][:, None], step, torch.zeros(1, I, N), read, config.segment_size,
                      mc_cfg(config, mixer.mc_gate if hasattr(mixer, "mc_gate") else _off(1)))[:, 0]
        y = (y + xs[b] * mixer.D) * F.silu(z[b].transpose(0, 1))
        out.append(y)
    return mixer.out_proj(torch.stack(out))


# -- RWKV-4 ------------------------------------------------------------------------------
def rwkv4_attention(att, hidden, config):
    """RwkvSelfAttention with MC: absolute (not max-stabilised) sums in float64."""
    Bsz, T, _ = hidden.shape
    shifted = F.pad(hidden, (0, 0, 1, -1))
    mix = lambda m: hidden * m + shifted * (1 - m)
    k = att.key(mix(att.time_mix_key)).double()
    v = att.value(mix(att.time_mix_value)).double()
    r = torch.sigmoid(att.receptance(mix(att.time_mix_receptance)))
    w = torch.exp(att.time_decay.double())  # decay per step is exp(-w)
    u = att.time_first.double()
    C = config.segment_size
    gate = att.mc_gate if hasattr(att, "mc_gate") else _off(1)
    cfg = mc_cfg(config, gate)
    outs = []
    for b in range(Bsz):
        num = torch.zeros_like(k[b, 0])
        den = torch.zeros_like(k[b, 0])
        snaps, pooled, seg_keys, ys = [], [], [], []
        for t in range(T):
            if t > 0 and t % C == 0:
                snaps.append((num.clone(), den.clone()))
                pooled.append(torch.stack(seg_keys).mean(0))
                seg_keys = []
            seg_keys.append(k[b, t])
            e = torch.exp(u + k[b, t])
            on_n, on_d = num + e * v[b, t], den + e
            ys.append(_rwkv_merge(on_n, on_d, snaps, k[b, t], pooled, torch.stack(seg_keys).mean(0), cfg))
            num = torch.exp(-w) * num + torch.exp(k[b, t]) * v[b, t]
            den = torch.exp(-w) * den + torch.exp(k[b, t])
        outs.append(torch.stack(ys))
    wkv = torch.stack(outs).float()
    return att.output(r * wkv)


def _rwkv_merge(on_n, on_d, snaps, u, pooled, online_pool, cfg):
    online = on_n / on_d
    if not snaps:
        return online
    # Gate weights from the same rule as ``aggregate``, on a dummy value of 1 per memory.
    weights = []
    for j in range(len(snaps) + 1):
        fake_online = torch.tensor([[1.0 if j == 0 else 0.0]], dtype=torch.float64)
        fake_reads = [torch.tensor([[1.0 if i + 1 == j else 0.0]], dtype=torch.float64) for i in range(len(snaps))]
        c = dict(cfg, mix=torch.ones(1))
        w = aggregate(fake_online, fake_reads, u[None], [p[None] for p in pooled], online_pool[None], **c)
        weights.append(float(w[0, 0]))
    n = weights[0] * on_n + sum(wi * s[0] for wi, s in zip(weights[1:], snaps))
    d = weights[0] * on_d + sum(wi * s[1] for wi, s in zip(weights[1:], snaps))
    return online + float(cfg["mix"][0]) * (n / d - online)


def _off(H):
    class _G:
        cache_weight = torch.zeros(H)

    return _G()


ORACLES = {"mamba2": mamba2_mixer, "mamba": mamba_mixer, "rwkv4": rwkv4_attention}

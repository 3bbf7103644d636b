"""Mamba2 (transformers ``Mamba2ForCausalLM``).

State per head: ``S [P, N]`` (head_dim x state_size, V-first). The layer's own read is
``y_t = S_t C_t`` (then the D skip, the gated RMSNorm and out_proj).

- query: ``C_t`` (repeated over the heads of its group);
- key summary: mean of ``B_t`` over the segment;
- read of a cached state: ``S_i C_t`` (scale 1), added before the D skip and the gated
  norm, exactly where the family's own read-out happens.

Wrapped ops: ``mamba2_chunk_scan`` (prefill: run per segment, chaining
``initial_states``) and ``mamba2_selective_state_update`` (one-token decoding).
"""
from __future__ import annotations

import torch

from mc_retrofit.adapters.base import StateInfo, expand_heads, passthrough
from mc_retrofit.adapters.transformers.modeling import ModuleMixerAdapter
from mc_retrofit.kernels.capture import linear_boundary_states
from mc_retrofit.segments import LinearRecurrence, Stepped, run_segments

MODULE = "transformers.models.mamba2.modeling_mamba2"


def mamba2_boundary_states(hidden_states, dt, A, B, segment_size: int, *, dt_bias=None, dt_softplus=False,
                           dt_limit=(0.0, float("inf")), initial_states=None):
    """Mamba2 boundary states in one pass: its SSM ``S_t = exp(dt_t A) S_{t-1} + (dt_t x_t) B_t^T``
    is a gated linear recurrence (V-first ``[H,P,N]``). Arguments as transformers' ``mamba2_chunk_scan``:
    hidden_states ``[B,T,H,P]``, dt ``[B,T,H]``, A ``[H]``, B ``[B,T,G,N]``, initial_states
    ``[B,H,P,N]``. Returns ``(boundaries [B, T//C, H, P, N], final [B,H,P,N])`` (fp32)."""
    H = hidden_states.shape[2]
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    if dt_softplus:
        dt = torch.nn.functional.softplus(dt)
    dt = torch.clamp(dt.float(), min=dt_limit[0], max=dt_limit[1])
    Bk = B.float().repeat_interleave(H // B.shape[2], dim=2)
    x = hidden_states.float() * dt[..., None]
    h0 = None if initial_states is None else initial_states.float().transpose(-1, -2)  # [B,H,N,P]
    bounds, final = linear_boundary_states(Bk, x, g=dt * A.float()[None, None, :], initial_state=h0,
                                           segment_size=segment_size)
    return bounds.transpose(-1, -2), final.transpose(-1, -2)


class _ChunkScan(LinearRecurrence):
    """One ``mamba2_chunk_scan`` call (without its D skip): query ``C``, keys ``B``, V-first states."""

    layout = "vk"

    def __init__(self, orig, hidden_states, dt, A, B, C, chunk_size, kw, state):
        heads = hidden_states.shape[2]
        super().__init__(expand_heads(C, heads), expand_heads(B, heads), state)
        self.orig, self.x, self.dt, self.A, self.B, self.C, self.chunk_size, self.kw = (
            orig, hidden_states, dt, A, B, C, chunk_size, kw)

    def run(self, a, b, state):
        return self.orig(self.x[:, a:b], self.dt[:, a:b], self.A, self.B[:, a:b], self.C[:, a:b], self.chunk_size,
                         D=None, initial_states=state, return_final_states=True, **self.kw)

    def capture(self, state, segment_size):
        y, final = self.run(0, self.x.shape[1], state)
        kw = self.kw
        bounds, _ = mamba2_boundary_states(
            self.x, self.dt, self.A, self.B, segment_size, dt_bias=kw.get("dt_bias"),
            dt_softplus=kw.get("dt_softplus", False), dt_limit=kw.get("dt_limit", (0.0, float("inf"))),
            initial_states=state)
        return y, final, bounds


@passthrough
def _chunk_scan(orig, run, hidden_states, dt, A, B, C, chunk_size, D=None, **kw):
    init = kw.pop("initial_states", None)
    want_final = kw.pop("return_final_states", False)
    kw.pop("z", None)
    y, final = run_segments(run, _ChunkScan(orig, hidden_states, dt, A, B, C, chunk_size, kw, init))
    if D is not None:  # the D skip, as the original op adds it
        y = y + D[..., None] * hidden_states.float()
    return (y, final) if want_final else y


@passthrough
def _state_update(orig, run, state, hidden_states, dt, A, B, C, D=None, **kw):
    # Falcon-H1 without its gated norm hands the ``silu(z)`` gate to the op: the cached
    # reads go in before it, as before the gated norm elsewhere.
    z = kw.pop("z", None)
    heads = hidden_states.shape[1]
    o = orig(state, hidden_states, dt, A, B, C, None, z=None, **kw)  # updates `state` in place
    q = expand_heads(C, heads, dim=1)[:, None]
    k = expand_heads(B, heads, dim=1)[:, None]
    y, _ = run_segments(run, Stepped(q, k, state, o[:, None], layout="vk"))
    y = y[:, 0]
    if D is not None:
        y = (y + hidden_states * D).to(y.dtype)
    if z is not None:
        y = y * torch.nn.functional.silu(z)
    return y.to(hidden_states.dtype)


class Mamba2ScanAdapter(ModuleMixerAdapter):
    """A family whose recurrent layers are Mamba2 mixers calling their modeling module's own
    copy of ``mamba2_chunk_scan`` / ``mamba2_selective_state_update`` (Mamba2 itself and the
    hybrids that keep a copy: Bamba, Falcon-H1, Nemotron-H, Granite 4, Zamba2). A family sets
    ``op_module``, ``model_class_name``, ``mixer_class_name`` and ``state_fields`` (its config's
    names for heads, head width and state size)."""

    supports_padding = True
    description = "query C_t; key summary mean B_t; read S_i C_t before the D skip and gated norm"
    op_wrappers = {"mamba2_chunk_scan": _chunk_scan, "mamba2_selective_state_update": _state_update}
    state_fields = ("num_heads", "head_dim", "state_size")

    def gate_dims(self, mixer, config):
        return mixer.num_heads, mixer.ssm_state_size

    def state_info(self, config):
        heads, head_dim, state = (getattr(config, name) for name in self.state_fields)
        return StateInfo(shapes=[(heads, head_dim, state)], bytes_per_element=4, key_dim=state, heads=heads)


class Mamba2Adapter(Mamba2ScanAdapter):
    family = "mamba2"
    model_types = ("mamba2",)
    op_module = MODULE
    model_class_name = "Mamba2ForCausalLM"
    mixer_class_name = "Mamba2Mixer"


# -- mamba_ssm's own format (state-spaces/mamba2-130m ..., the repos without -hf) ------------
from mc_retrofit.adapters.transformers import mamba_ssm  # noqa: E402 - the format's block, kept apart


def _from_mamba_ssm(data: dict) -> dict:
    """A mamba_ssm Mamba2 config as Mamba2Config fields (transformers' converter, made exact:
    every mixer argument from ssm_cfg, with mamba_ssm's ``Mamba2`` defaults, e.g. 1 group)."""
    from mc_retrofit.errors import MCError

    fields, ssm = mamba_ssm.config_fields(
        data, ssm_defaults=dict(d_state=128, d_conv=4, expand=2, headdim=64, ngroups=1, chunk_size=256, bias=False,
                                conv_bias=True, d_ssm=None, D_has_hdim=False, rmsnorm=True, norm_before_gate=False),
        ssm_fields=dict(d_state="state_size", d_conv="conv_kernel", expand="expand", headdim="head_dim",
                        ngroups="n_groups", chunk_size="chunk_size", bias="use_bias", conv_bias="use_conv_bias",
                        dt_limit="time_step_limit"),
        handled={"d_ssm", "D_has_hdim", "rmsnorm", "norm_before_gate", "A_init_range", "dt_min", "dt_max",
                 "dt_init_floor", "conv_init", "use_mem_eff_path"})
    inner = ssm["expand"] * fields["hidden_size"]
    # What transformers' Mamba2Mixer fixes: SSM over all channels, a D per head, the gated
    # RMSNorm applied after the gate.
    if ssm["d_ssm"] not in (None, inner):
        raise MCError(f"its SSM covers {ssm['d_ssm']} of {inner} channels (d_ssm); transformers' Mamba2 covers all")
    for key, want in (("D_has_hdim", False), ("rmsnorm", True), ("norm_before_gate", False)):
        if bool(ssm[key]) != want:
            raise MCError(f"its ssm_cfg sets {key} {ssm[key]!r}; transformers' Mamba2 has {key} {want}")
    if inner % ssm["headdim"]:
        raise MCError(f"its {inner} channels do not split into heads of {ssm['headdim']} (headdim)")
    fields["num_heads"] = inner // ssm["headdim"]
    return fields


Mamba2Adapter.foreign_formats = (mamba_ssm.declare("Mamba2", _from_mamba_ssm),)

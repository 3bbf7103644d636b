"""Mamba (transformers ``MambaForCausalLM``).

State: ``h [D, N]`` per layer (intermediate channels x state size). The layer's own read
is ``y_t[d] = sum_n h_t[d, n] C_t[n]`` (then the D skip and ``* silu(z)``). Seen as one
head with K = N and V = D, ``h`` is a V-first linear memory read by ``C_t``:

- query: ``C_t`` (one head, width N);
- key summary: mean of ``B_t`` over the segment;
- read of a cached state: ``h_i C_t``, added before the D skip and the ``silu(z)`` gate.

transformers' selective scan cannot start from a state, and the mixer silently ignores
a cached SSM state for multi-token input. The wrapper adds the carry-in term instead:
from state ``h0`` the scan continues as ``h_t = exp(A * sum_{j<=t} dt_j) h0 + scan_0(t)``,
so segment-wise runs (and split prefill with a cache) equal one run over the whole input.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mc_retrofit.adapters.base import StateInfo, passthrough
from mc_retrofit.adapters.transformers.modeling import ModuleMixerAdapter
from mc_retrofit.segments import LinearRecurrence, Stepped, run_segments

MODULE = "transformers.models.mamba.modeling_mamba"


def _carry_in(y0, h0_final, state, dt, A, C):
    """Add the effect of a start state to a scan that started from zero.

    dt ``[B,D,t]`` (after bias and softplus), A ``[D,N]``, C ``[B,N,t]``, state ``[B,D,N]``."""
    decay = torch.exp(A.float()[None, :, :, None] * dt.float().cumsum(-1)[:, :, None, :])  # [B,D,N,t]
    carried = decay * state.float()[..., None]
    y = y0 + torch.einsum("bdnt,bnt->bdt", carried, C.float()).to(y0.dtype)
    return y, h0_final + carried[..., -1].to(h0_final.dtype)


def _snapshot(state):
    return state.float()[:, None].clone()  # [B, D, N] as one head: [B, 1, D, N]


class _Scan(LinearRecurrence):
    """One ``mamba_selective_scan`` call (without D skip and gate): one head, query ``C_t``,
    keys ``B_t``, V-first state ``h [D, N]``; each piece continues from its start state."""

    layout = "vk"
    snapshot = staticmethod(_snapshot)

    def __init__(self, orig, hidden_states, dt, dt_eff, A, B, C, state, kw):
        super().__init__(C.transpose(1, 2)[:, :, None], B.transpose(1, 2)[:, :, None], state)  # [B, T, 1, N]
        self.orig, self.x, self.dt, self.dt_eff, self.A, self.B, self.C, self.kw = (
            orig, hidden_states, dt, dt_eff, A, B, C, kw)

    def run(self, a, b, state):
        C = self.C[..., a:b]
        y0, h = self.orig(self.x[..., a:b], self.dt[..., a:b], self.A, self.B[..., a:b], C, D=None, z=None,
                          return_last_state=True, **self.kw)
        if state is not None:
            y0, h = _carry_in(y0, h, state, self.dt_eff[..., a:b], self.A, C)
        return y0.transpose(1, 2)[:, :, None], h  # online output as [B, t, 1, D]


class _Step(Stepped):
    snapshot = staticmethod(_snapshot)


@passthrough
def _selective_scan(orig, run, hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None,
                    delta_softplus=False, return_last_state=False, **kw):
    # A previous call with the same cache left the state the scan must continue from.
    init = None
    if run.cache is not None and run.memory.pos > 0:
        init = run.cache.get_recurrent_state(run.gate.layer_idx, state_idx=0)
    dt_eff = dt if delta_bias is None else dt + delta_bias.to(dt.dtype)[..., None]
    if delta_softplus:
        dt_eff = F.softplus(dt_eff)

    scan = _Scan(orig, hidden_states, dt, dt_eff, A, B, C, init,
                 dict(delta_bias=delta_bias, delta_softplus=delta_softplus, **kw))
    y, final = run_segments(run, scan)
    y = y[:, :, 0].transpose(1, 2)  # back to [B, D, T]
    if D is not None:
        y = y + hidden_states * D[None, :, None]
    if z is not None:
        y = y * F.silu(z)
    return (y, final) if return_last_state else y


@passthrough
def _state_update(orig, run, state, hidden_states, dt, A, B, C, D=None, z=None, **kw):
    o = orig(state, hidden_states, dt, A, B, C, None, z=None, **kw)  # [B, D]; updates `state`
    y, _ = run_segments(run, _Step(C[:, None, None], B[:, None, None], state, o[:, None, None], layout="vk"))
    y = y[:, 0, 0]
    if D is not None:
        y = y + hidden_states * D
    if z is not None:
        y = y * F.silu(z)
    return y.to(hidden_states.dtype)


class MambaScanAdapter(ModuleMixerAdapter):
    """A family whose recurrent layers are Mamba mixers calling their modeling module's own
    copy of ``mamba_selective_scan`` / ``mamba_selective_state_update`` (Mamba itself, Jamba,
    Falcon-Mamba). A family sets ``op_module``, ``model_class_name``, ``mixer_class_name`` and
    :meth:`ssm_dims` where its config names differ."""

    writes_cache_in_place = True  # conv_states/ssm_states updated in place
    supports_padding = True
    description = "query C_t; key summary mean B_t; read h_i C_t before the D skip and silu(z)"
    op_wrappers = {"mamba_selective_scan": _selective_scan, "mamba_selective_state_update": _state_update}

    def ssm_dims(self, config) -> tuple[int, int]:
        """(intermediate channels D, state size N) of one layer's ``h [D, N]``."""
        return config.intermediate_size, config.state_size

    def gate_dims(self, mixer, config):
        return 1, mixer.ssm_state_size

    def state_info(self, config):
        channels, state = self.ssm_dims(config)
        return StateInfo(shapes=[(channels, state)], bytes_per_element=4, key_dim=state, heads=1)


class MambaAdapter(MambaScanAdapter):
    family = "mamba"
    model_types = ("mamba",)
    op_module = MODULE
    model_class_name = "MambaForCausalLM"
    mixer_class_name = "MambaMixer"


# -- mamba_ssm's own format (state-spaces/mamba-130m ..., the repos without -hf) -------------
from mc_retrofit.adapters.transformers import mamba_ssm  # noqa: E402 - the format's block, kept apart


def _from_mamba_ssm(data: dict) -> dict:
    """A mamba_ssm Mamba-1 config as MambaConfig fields (transformers' converter, made exact:
    every mixer argument from ssm_cfg, with mamba_ssm's ``Mamba`` defaults)."""
    fields, ssm = mamba_ssm.config_fields(
        data, ssm_defaults=dict(d_state=16, d_conv=4, expand=2, dt_rank="auto", bias=False, conv_bias=True),
        ssm_fields=dict(d_state="state_size", d_conv="conv_kernel", expand="expand", bias="use_bias",
                        conv_bias="use_conv_bias"),
        handled={"dt_rank", "dt_min", "dt_max", "dt_init", "dt_scale", "dt_init_floor", "use_fast_path"})
    d_model = fields["hidden_size"]
    rank = ssm["dt_rank"]
    fields.update(intermediate_size=ssm["expand"] * d_model,
                  time_step_rank=-(-d_model // 16) if rank == "auto" else rank)  # mamba_ssm's "auto": ceil(d/16)
    return fields


MambaAdapter.foreign_formats = (mamba_ssm.declare("Mamba1", _from_mamba_ssm),)

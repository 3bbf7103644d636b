"""RWKV-4 (transformers ``RwkvForCausalLM``).

RWKV-4's memory is not read by a query: its WKV output is a ratio of decayed sums,
``wkv_t = num_t / den_t`` with ``num = sum_j e^{w(t-j) + k_j} v_j`` (plus the bonus
``e^{u + k_t} v_t``) and ``den`` the same without ``v``, kept as ``(num, den, max)`` with
a shared exponent ``max`` for stability. Each channel is its own memory.

- query: none; the parameter-free gate input is the token's key ``k_t`` (one head,
  width = attention_hidden_size) compared with each segment's mean key;
- key summary: mean of ``k_t`` over the segment;
- read of a cached state: the cached ``(num_i, den_i)`` pair. Aggregation merges
  numerators and denominators at a common exponent, weighted by the gates, then
  divides: ``wkv = (g_0 num_t + sum_i g_i num_i) / (g_0 den_t + sum_i g_i den_i)``,
  before the receptance gate and the output projection.
"""
from __future__ import annotations

import torch

from mc_retrofit import compat
from mc_retrofit.adapters.base import Adapter, StateInfo, passthrough
from mc_retrofit.core import gate_weights
from mc_retrofit.segments import Recurrence, run_segments

MODULE = "transformers.models.rwkv.modeling_rwkv"


def wkv_parts(time_decay, time_first, key, value, state):
    """transformers' CPU WKV loop, step for step, also returning each output's numerator,
    denominator and exponent. Returns (out, num, den, max) each ``[B,T,C]`` and the state."""
    B, T, Cc = key.shape
    output = torch.zeros_like(key)
    nums, dens, maxs = (torch.empty(B, T, Cc, dtype=torch.float32, device=key.device) for _ in range(3))
    if state is None:
        num_state = torch.zeros_like(key[:, 0], dtype=torch.float32)
        den_state = torch.zeros_like(key[:, 0], dtype=torch.float32)
        max_state = torch.zeros_like(key[:, 0], dtype=torch.float32) - 1e38
    else:
        num_state, den_state, max_state = state
    time_decay = -torch.exp(time_decay)
    for t in range(T):
        current_key = key[:, t].float()
        current_value = value[:, t]
        max_for_output = torch.maximum(max_state, current_key + time_first)
        e1 = torch.exp(max_state - max_for_output)
        e2 = torch.exp(current_key + time_first - max_for_output)
        numerator = e1 * num_state + e2 * current_value
        denominator = e1 * den_state + e2
        output[:, t] = (numerator / denominator).to(output.dtype)
        nums[:, t], dens[:, t], maxs[:, t] = numerator, denominator, max_for_output
        max_for_state = torch.maximum(max_state + time_decay, current_key)
        e1 = torch.exp(max_state + time_decay - max_for_state)
        e2 = torch.exp(current_key - max_for_state)
        num_state = e1 * num_state + e2 * current_value
        den_state = e1 * den_state + e2
        max_state = max_for_state
    return (output, nums, dens, maxs), [num_state, den_state, max_state]


class _Wkv(Recurrence):
    """One ``rwkv_linear_attention`` call: gate input and keys ``k_t`` (one head), state
    ``(num, den, max)`` cached as ``[B, 3, C]``; the read merges ratios, not ``q^T S``."""

    def __init__(self, time_decay, time_first, key, value, state):
        u = key[:, :, None]  # [B, T, 1, C]
        super().__init__(u, u, state)
        self.time_decay, self.time_first, self.key, self.value = time_decay, time_first, key, value

    def run(self, a, b, state):
        return wkv_parts(self.time_decay, self.time_first, self.key[:, a:b], self.value[:, a:b], state)

    def snapshot(self, state):
        return torch.stack([t.float() for t in state], 1).clone()

    def read(self, run, span):
        """Merge the online (num, den) with the cached ones at a common exponent."""
        out, num, den, mx = span.online
        mem, gate, cfg = run.memory, run.gate, run.gate.config
        if mem.n == 0:
            return out
        w = gate_weights(span.u, mem.pooled, span.online_pool, span.n_visible, cfg.aggregation, cfg.top_k,
                         gate.gate_scale(), gate.online_bias)[:, :, 0]  # [B, t, 1 + n]
        cn, cd, cm = mem.states[:, :, 0], mem.states[:, :, 1], mem.states[:, :, 2]  # [B, n, C]
        # Common exponent over the online part and every cached part with non-zero weight.
        cm_b = cm[:, None].expand(-1, out.shape[1], -1, -1)  # [B, t, n, C]
        cm_live = cm_b.masked_fill(w[..., 1:, None] == 0, float("-inf"))
        M = torch.maximum(mx, cm_live.amax(2))
        e_on = torch.exp(mx - M) * w[..., :1]
        e_c = torch.exp(cm_b - M[:, :, None]) * w[..., 1:, None]
        n_all = e_on * num + (e_c * cn[:, None]).sum(2)
        d_all = e_on * den + (e_c * cd[:, None]).sum(2)
        agg = n_all / d_all
        mix = gate.cache_weight[0]
        return (out.float() + mix * (agg - out.float())).to(out.dtype)


@passthrough
def _linear_attention(orig, run, time_decay, time_first, key, value, state=None, return_state=False):
    y, final = run_segments(run, _Wkv(time_decay, time_first, key, value, state))
    if return_state or state is not None:
        return y, final
    return y, None


def _state_holder(args, kwargs):
    """RWKV-4's cache is a list of five tensors (possibly positional); the memory hangs on the third."""
    state = kwargs.get("state", args[1] if len(args) > 1 else None)
    return None if state is None else state[2]


class _Shifted(torch.nn.Module):
    """Stands in for a block's ``time_shift`` for one call: returns the previous token's hidden."""

    def __init__(self, previous):
        super().__init__()
        self.previous = previous

    def forward(self, hidden):
        return self.previous


def _one_token_shift(slot: int):
    """transformers' RWKV-4 one-token step takes the previous hidden from the state as
    ``[B, C]`` and mixes it with the ``[B, 1, C]`` token: ``[B, B, C]``, wrong for any batch
    above 1 (batch 1 is right by luck). Its multi-token branch is right: with ``state=None``
    it mixes with ``time_shift(hidden)``. So for one token with a state this runs that branch,
    with ``time_shift`` answering the state's previous hidden as ``[B, 1, C]``, then writes the
    state slot as the original does. ``slot``: the state tensor holding this module's previous
    hidden (1 for attention's ``extract_key_value``, 0 for the feed-forward's ``forward``);
    both return the state last."""

    def make(original):
        def step(self, hidden, state=None, **kwargs):
            if hidden.size(1) != 1 or state is None:
                return original(self, hidden, state=state, **kwargs)
            shift = self._modules["time_shift"]
            self._modules["time_shift"] = _Shifted(state[slot][:, :, self.layer_id][:, None].to(hidden.dtype))
            try:
                out = original(self, hidden, state=None, **kwargs)
            finally:
                self._modules["time_shift"] = shift
            state[slot][:, :, self.layer_id] = hidden[:, -1]
            return (*out[:-1], state)

        return step

    return make


SHIFT_PATCHES = [
    compat.Patch(f"{MODULE}:RwkvSelfAttention", "extract_key_value", _one_token_shift(1), layer="compat",
                 group="rwkv4", why="RWKV-4's one-token step broadcasts [B, C] against [B, 1, C] (B x B outputs "
                                    "for batch > 1): batched decoding takes the previous hidden as [B, 1, C]"),
    compat.Patch(f"{MODULE}:RwkvFeedForward", "forward", _one_token_shift(0), layer="compat", group="rwkv4",
                 why="the same one-token shift bug in RWKV-4's feed-forward"),
]


class Rwkv4Adapter(Adapter):
    family = "rwkv4"
    model_types = ("rwkv",)
    writes_cache_in_place = True  # its state list is updated in place
    description = "gate input k_t; key summary mean k_t; merge cached (num, den) at a common exponent"
    op_module = MODULE
    op_wrappers = {"rwkv_linear_attention": _linear_attention}

    def model_class(self):
        from transformers import RwkvForCausalLM

        compat.install(self.support_patches())
        return RwkvForCausalLM

    def support_patches(self):
        return SHIFT_PATCHES

    def mixers(self, model):
        return [(i, block.attention) for i, block in enumerate(model.rwkv.blocks)]

    def gate_dims(self, mixer, config):
        return 1, mixer.attention_hidden_size

    cache_names = ("state",)  # RWKV-4 keeps its own name in 5.24
    mixer_cache_names = ("state",)

    def cache_reader(self, mixer):
        return _state_holder


    def state_info(self, config):
        c = config.attention_hidden_size or config.hidden_size
        return StateInfo(shapes=[(3, c)], bytes_per_element=4, key_dim=c, heads=1)

    def prepare_save(self, model):
        # transformers divides some weights in place when RWKV runs in eval mode
        # (`rescale_every`); saving then would write the divided weights. Undo it.
        rwkv = model.rwkv
        if getattr(rwkv, "layers_are_rescaled", False):
            was_training = rwkv.training
            rwkv.train()
            rwkv._rescale_layers()
            rwkv.train(was_training)

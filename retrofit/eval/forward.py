"""One forward over a whole window, then the output head only where it is needed.

The backbone runs once over the full input (so Memory Caching sees every segment of
the window and caches them as it goes: no prefix is ever re-run); the vocabulary
projection then runs in slices of positions, so a long window of a large-vocabulary
model never holds ``[T, V]`` logits at once.
"""
from __future__ import annotations

import torch

from mc_retrofit import tasks

# Positions per slice of the output head: bounds the [B, slice, V] logits.
HEAD_SLICE = 2048


def backbone_hidden(model, ids: torch.Tensor) -> torch.Tensor:
    """Final hidden states ``[B, T, D]`` (after the final norm) of a causal LM."""
    out = model.base_model(input_ids=ids, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _head(model):
    head = model.get_output_embeddings()
    if head is None:
        raise RuntimeError(f"{type(model).__name__} has no output embeddings")
    return head


def logits_at(model, hidden: torch.Tensor, device=None) -> torch.Tensor:
    """fp32 logits of ``hidden``, on ``device`` if given (under a device map the head may sit
    on another device than the input ids they are compared with)."""
    head = _head(model)
    logits = head(hidden.to(head.weight.dtype)).float()
    return logits if device is None else logits.to(device)


@torch.no_grad()
def token_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """``nll[b, j]`` = -log p(ids[b, j+1] | ids[b, :j+1]) in nats, ``[B, T-1]`` fp32."""
    hidden = backbone_hidden(model, ids)
    T = ids.shape[1]
    out = torch.empty(ids.shape[0], T - 1, dtype=torch.float32, device=ids.device)
    for a in range(0, T - 1, HEAD_SLICE):
        b = min(T - 1, a + HEAD_SLICE)
        logp = torch.log_softmax(logits_at(model, hidden[:, a:b], ids.device), dim=-1)
        out[:, a:b] = -logp.gather(-1, ids[:, a + 1:b + 1, None])[..., 0]
    return out


@torch.no_grad()
def answer_scores(model, ids: torch.Tensor, prompt_len: int, answer_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced greedy scoring of an answer that fills the last ``answer_len``
    tokens of ``ids [B, prompt_len + answer_len]``.

    Returns (correct ``[B]`` bool: the argmax is the answer token at every answer
    position, which is exactly when greedy decoding would produce the answer; nll
    ``[B]``: the answer's total negative log-likelihood in nats)."""
    hidden = backbone_hidden(model, ids)
    pos = slice(prompt_len - 1, prompt_len + answer_len - 1)
    logits = logits_at(model, hidden[:, pos], ids.device)
    want = ids[:, prompt_len:prompt_len + answer_len]
    return tasks.answer_hits(logits, want).all(-1), tasks.answer_nll(logits, want)

"""Gate-only fine-tuning: train the Memory Caching gate parameters of a converted model.

Only the tensors under ``.mc_gate.`` (``cache_weight``, ``log_temperature``, ``online_bias``
and the optional connector ``W_u``) are trained; every original weight is frozen and stays
bit-identical. Data are the model's token ids (bytes of local ``.txt`` files for a byte-level
model; the ids of its tokenizer for any source of :mod:`mc_retrofit.data`, tokenized once and
cached), sampled as random windows of ``seq_len + 1`` ids from a seeded generator. The last
``heldout_share`` of the stream is held out for the periodic evaluation loss.

Long windows that do not fit (``finetune.step``): ``tbptt=L`` runs each window in chunks of
``L`` tokens through the family's cache (recurrent state + MC memory) with a backward per
chunk and the carried state detached in between (truncated backpropagation; the forward
and the loss are the full window's); ``grad_checkpointing`` recomputes each layer in the
backward instead (transformers' activation checkpointing; not with a cache, see below).

State passing (Buitrago Ruiz & Gu 2025): with ``state_passing=P`` each step continues the
previous step's streams with probability ``P`` (``finetune.data.WindowSampler``), starting
from their final cache (detached), so the gates see memories older than one window.

Data parallel (``mc_retrofit.distributed``): under ``torchrun`` (``WORLD_SIZE > 1``) every process
draws the same global batch of ``batch`` windows and trains on its slice; DDP averages the
gate gradients; rank 0 alone shows progress and writes checkpoints and the output. With
``shard="fsdp"`` the frozen base is sharded over the processes (FSDP2) and the replicated
gates' gradients are averaged by ``World.average_gradients``; the output's base weights are
gathered whole to rank 0 once, at the end, and written as an unsharded run writes them.

Checkpoints (``<out>.checkpoint/``, written atomically) hold the gate tensors, the
optimizer, the scheduler, the sampler (generator state and the current streams' starts),
the step and, with state passing, every rank's carried cache (``carry.pt``), so a resumed
run ends with exactly the same gates as an uninterrupted one. Both files hold plain data
only and are read with ``torch.load(weights_only=True)`` (the carried cache through
``finetune_carry``): nothing in a checkpoint folder is ever unpickled. A checkpoint
resumes only the run that wrote it (:func:`run_id`: settings, model, MC config, data),
and ``carry.pt`` only with the ``state.pt`` that recorded its hash.

A step whose loss or gates are not finite stops the run with one line naming the step;
nothing of it is checkpointed or written.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .. import distributed
from ..errors import MCError
from ..files import check_target
from ..model import gate_parameters, is_connector  # noqa: F401 (gate_parameters: part of this face)
from .carry import to_plain
from .checkpoint import (STATE_NAME, FinetuneArgs, _load_checkpoint, _save_checkpoint,  # noqa: F401
                         checkpoint_dir, run_id)
from .data import (RowSampler, TokenStream, WindowSampler, inputs_and_targets, labelled_rows,  # noqa: F401
                   model_codec, read_texts, sample_windows, split_heldout, split_rows, token_stream)
from .step import window_loss_and_backward

HELDOUT_WINDOWS = 8  # fixed held-out windows per evaluation: cheap and comparable across steps


# -- model --------------------------------------------------------------------------------
def lm_loss(model, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats) of ``windows [B, L+1]``, or of labelled sequences
    ``[B, 2, L+1]`` (see ``finetune.step``) (no cache: Mamba and RWKV-4 write theirs in place,
    which autograd cannot differentiate through)."""
    inputs, targets = inputs_and_targets(windows)
    logits = model(inputs, use_cache=False).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


def _schedule(warmup: int, steps: int):
    """Linear warm-up to the peak rate, then cosine decay to zero at ``steps``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _checkpointing(model, on: bool) -> None:
    """transformers' activation checkpointing (non-reentrant: the MC hooks run again in the
    recomputation and find a fresh per-call memory, so the recomputed forward is the same)."""
    if not on:
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise MCError(f"{type(model).__name__} does not support gradient checkpointing; use --tbptt instead")
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _checkpointing_off(model) -> None:
    off = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    off()


# -- training loop --------------------------------------------------------------------------
def _check_finite(step: int, what: str, value: float, lr: float) -> None:
    """A non-finite loss stops the run (nothing of this step is checkpointed or written)."""
    if not math.isfinite(value):
        raise MCError(f"step {step}: the {what} is {value} (not finite); nothing of this step was saved: "
                      f"use a smaller --lr than {lr:g}, or check the data")


def _check_args(steps, seq_len, batch, warmup, lr, tbptt, state_passing, grad_checkpointing,
                weight_decay: float = 0.0, heldout_share: float = 0.05, connector_lr: float | None = None) -> None:
    for name, value in (("steps", steps), ("seq_len", seq_len), ("batch", batch)):
        if int(value) < 1:
            raise MCError(f"{name} must be a positive integer, not {value!r}")
    # nan passes every comparison below (nan <= 0 is False) and inf trains NaN gates
    for name, value in (("lr", lr), ("state_passing", state_passing), ("weight_decay", weight_decay),
                        ("heldout_share", heldout_share)):
        if not math.isfinite(float(value)):
            raise MCError(f"{name} must be a finite number, not {value!r}")
    if warmup < 0 or lr <= 0:
        raise MCError("warmup must be >= 0 and lr > 0")
    if connector_lr is not None and not (math.isfinite(float(connector_lr)) and float(connector_lr) > 0):
        raise MCError(f"connector_lr must be a finite number > 0, not {connector_lr!r}")
    if weight_decay < 0 or not 0 <= heldout_share < 1:
        raise MCError(f"weight_decay must be >= 0 and heldout_share in [0, 1), not {weight_decay!r} and {heldout_share!r}")
    # 1-token chunks would run the families' one-token decoding step, which updates the
    # cache in place and cannot be differentiated through (see finetune.step.chunk_bounds)
    if tbptt is not None and not 2 <= int(tbptt) <= seq_len:
        raise MCError(f"--tbptt must be between 2 and --seq-len ({seq_len}), not {tbptt}")
    if not 0.0 <= float(state_passing) <= 1.0:
        raise MCError(f"--state-passing is a probability in [0, 1], not {state_passing}")
    if state_passing > 0 and seq_len < 2:
        raise MCError("--state-passing needs --seq-len of at least 2")
    if grad_checkpointing and ((tbptt is not None and tbptt < seq_len) or state_passing > 0):
        # transformers turns the cache off under checkpointing in training, and a recomputed
        # chunk would append its segments to the carried MC memory a second time.
        raise MCError("--grad-checkpointing cannot be combined with --tbptt shorter than --seq-len "
                      "or with --state-passing (both run through the model's cache)")


def check_reads_cache(config, seq_len: int, tbptt: int | None, state_passing: float) -> None:
    """Refuse a run in which no token ever reads a cached segment: every gate gradient
    would be exactly 0 and the run would report success having trained nothing."""
    if state_passing > 0:
        return  # a continued stream reads the segments of the windows before it
    if config.segmentation == "constant":
        # boundaries are absolute, so TBPTT chunks change nothing: the first segment closes
        # at segment_size, and only a token after it can read it
        if seq_len > config.segment_size:
            return
        raise MCError(f"--seq-len {seq_len} is not longer than the segment size ({config.segment_size}): no token of "
                      "a window reads a cached segment, so every gate gradient would be 0 and nothing would be "
                      f"trained; use --seq-len > {config.segment_size}, a smaller --segment-size, or --state-passing")
    # log: a call closes every piece of its binary expansion but the last, and a later
    # TBPTT chunk first closes the open segment the chunk before it left
    if (tbptt is not None and tbptt < seq_len) or seq_len & (seq_len - 1):
        return
    raise MCError(f"--seq-len {seq_len} is a power of two: under log segmentation a window of it is one open segment, "
                  "no token reads a cached segment, so every gate gradient would be 0; use a --seq-len that is not a "
                  "power of two, --tbptt, or --state-passing")


def _param_groups(params: list, connector_lr: float | None) -> list[dict]:
    """One optimizer group (every gate at the optimizer's lr), or, with ``connector_lr``, the
    per-head scalars and the connector's weights apart (a checkpoint's optimizer state has the
    groups of the run that wrote it: ``connector_lr`` is part of the run's settings)."""
    if connector_lr is None:
        return [{"params": [p for _, p in params]}]
    scalars = [p for n, p in params if not is_connector(n)]
    connector = [p for n, p in params if is_connector(n)]
    if not connector:
        raise MCError("connector_lr has no effect: these gates have no connector (gate source query); drop it")
    return [{"params": scalars}, {"params": connector, "lr": float(connector_lr)}]


def finetune(model, texts_or_dataset, *, steps: int = 200, seq_len: int = 2048, lr: float = 1e-2, batch: int = 4,
             warmup: int = 20, seed: int = 0, out: str | Path | None = None, eval_every: int = 50,
             resume: bool = False, force: bool = False, checkpoint_every: int | None = None,
             stop_at: int | None = None, weight_decay: float = 0.0, heldout_share: float = 0.05,
             tbptt: int | None = None, state_passing: float = 0.0, grad_checkpointing: bool = False,
             shard: str | None = None, tokenizer=None, text_field: str = "text", split: str | None = None,
             max_tokens: int | None = None, curriculum: float = 0.0, connector_lr: float | None = None,
             log: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Train only the MC gate parameters of the converted ``model`` (in place) on
    ``texts_or_dataset``: text (random windows of the model's ids: ``.txt`` bytes for a
    byte-level model, see :func:`read_texts`; the ids of its tokenizer, or of ``tokenizer``,
    for any :mod:`mc_retrofit.data` source: ``.txt``, ``.jsonl`` (``text_field``), a saved
    or streamed ``hf:`` dataset (``split``; ``max_tokens`` caps a stream), or a
    :class:`~mc_retrofit.finetune.data.TokenStream` built before); or token
    sequences (synthetic tasks; whole rows are sampled, the last ``heldout_share`` of them is
    held out): a tensor ``[N, seq_len + 1]`` (next-token loss everywhere), or a pair
    ``(input_ids [N, seq_len], labels [N, seq_len])`` whose labels give the target of each
    position, ``-100`` where nothing is scored (e.g. ``mc_retrofit.tasks.mqar``'s inputs and
    targets).

    Returns ``{"step", "train_loss", "heldout_loss", "history"}``; ``history`` lists
    ``(step, heldout_loss)``. With ``out``, checkpoints go to ``<out>.checkpoint`` every
    ``checkpoint_every`` steps (default ``eval_every``) and the finished model is written to
    ``out`` as a converted directory (the checkpoint is then removed). ``stop_at`` ends the
    run early at that step after checkpointing (to train in stages); ``resume`` continues
    from the checkpoint. ``weight_decay`` is 0 by default: decaying ``cache_weight`` would
    pull the model towards the base model for no reason.

    ``tbptt``: truncated backpropagation in chunks of that many tokens (2..seq_len; None or
    seq_len: whole windows, the plain run). ``state_passing``: probability in [0, 1] that a
    step continues the previous step's streams from their final state (along a continued
    stream the MC memory keeps growing; ``max_cached_segments`` caps it).
    ``grad_checkpointing``: recompute each layer in the backward (whole windows only).
    ``curriculum``: for token sequences stored easiest first (``MixBuilder(...,
    curriculum=True)``), the share of the steps over which the rows drawn from grow from the
    easiest to all of them (:class:`~mc_retrofit.finetune.data.RowSampler`); 0: no curriculum.
    The held-out rows are the last ones, so with a curriculum they are the hardest.
    ``connector_lr``: the lr of a ``lowrank`` or ``learned`` connector (None: ``lr``); the
    per-head scalars (cache weight, temperature, online bias) keep ``lr``. Adam moves every
    parameter by about its lr per step, which for a connector means every entry of the gate
    input: on a model with l2-normalised queries (DeltaNet, Gated DeltaNet) ``lr`` 0.005-0.05
    swamps the query within tens of steps (``recipes/studies/results/oracle-mqar/``).
    Under ``torchrun`` (``WORLD_SIZE > 1``) ``batch`` is the global batch, split evenly over
    the processes; rank 0 logs and writes. ``shard="fsdp"`` (several processes only): the
    base weights are sharded over them with FSDP2 (``mc_retrofit.distributed``), for a model
    larger than one device; ``model`` stays sharded after the call."""
    from tqdm.auto import tqdm

    from ..model import require_converted, save_converted

    state = require_converted(model)
    _check_args(steps, seq_len, batch, warmup, lr, tbptt, state_passing, grad_checkpointing, weight_decay,
                heldout_share, connector_lr)
    if resume and out is None:
        raise MCError("resume needs out (the checkpoint lives next to it)")
    if out is not None:
        # --force replaces only an earlier converted model, never the one this model came from.
        check_target(Path(out).absolute(), force, kind="converted", sources=[state.source_dir])
        ckpt_path = checkpoint_dir(out)
        if not resume and ckpt_path.exists():  # a fresh run would overwrite it at its first checkpoint
            if not force:
                raise MCError(f"a checkpoint exists at {ckpt_path}: pass --resume to continue it or --force to start over")
            check_target(ckpt_path, True, kind="checkpoint")  # starting over replaces only an mc-retrofit checkpoint
    tbptt = None if tbptt is None or int(tbptt) >= seq_len else int(tbptt)  # seq_len: the plain run
    if not (math.isfinite(float(curriculum)) and 0.0 <= float(curriculum) <= 1.0):
        raise MCError(f"--curriculum is a share of the steps in [0, 1], not {curriculum}")
    args = FinetuneArgs(steps, seq_len, float(lr), batch, warmup, seed, float(weight_decay), float(heldout_share),
                        tbptt, float(state_passing), bool(grad_checkpointing), float(curriculum),
                        None if connector_lr is None else float(connector_lr))
    if isinstance(texts_or_dataset, (tuple, list)) and len(texts_or_dataset) == 2 \
            and all(isinstance(t, torch.Tensor) for t in texts_or_dataset):
        texts_or_dataset = labelled_rows(*texts_or_dataset)
    rows = isinstance(texts_or_dataset, torch.Tensor)  # pre-tokenised sequences
    if rows:
        if state_passing:
            raise MCError("state passing needs text streams; token sequences are independent rows")
        train, held = split_rows(texts_or_dataset, seq_len, heldout_share)
    elif curriculum:
        raise MCError("--curriculum orders retrieval rows (--mix); plain text windows have no order to follow")
    else:
        # the model's own codec: a model with a tokenizer never gets bytes as token ids
        codec = texts_or_dataset.codec if isinstance(texts_or_dataset, TokenStream) else model_codec(model, tokenizer)
        stream = token_stream(texts_or_dataset, codec, text_field=text_field, split=split, max_tokens=max_tokens)
        train, held = split_heldout(stream.ids, seq_len, heldout_share, stream.unit)
    unit = "token" if rows or not stream.codec.byte_level else "byte"
    vocab = model.config.vocab_size
    tokens = (train[:, 0], held[:, 0]) if rows and train.dim() == 3 else (train, held)
    if int(max(t.max() for t in tokens)) >= vocab or int(min(t.min() for t in tokens)) < 0:
        raise MCError(f"the data has tokens outside the model's vocabulary (0..{vocab - 1})"
                      + ("" if rows else f" (read with {stream.codec.name}): not this model's tokenizer"))
    check_reads_cache(state.config, seq_len, tbptt, state_passing)  # the data's own errors first

    params = gate_parameters(model)
    if not params:
        raise MCError("the model has no MC gate parameters to train")
    groups = _param_groups(params, connector_lr)  # before any output: a connector_lr with no connector is refused
    # the run id reads the base weights whole: before setup may shard them
    run = run_id(model, args, train, held) if out is not None else None
    dist = distributed.setup(model, batch, shard)
    if not dist.main:
        log, progress = (lambda s: None), False
    device = next(model.parameters()).device
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    gate_names = {n for n, _ in params}
    for n, p in model.named_parameters():
        p.requires_grad_(n in gate_names)
    n_train = sum(p.numel() for _, p in params)
    n_total = sum(p.numel() for p in model.parameters())
    log(f"trainable: {n_train} gate parameters of {n_total} ({100 * n_train / n_total:.4f}% of the model)"
        + (f"; {dist.size} processes, {batch // dist.size} windows each" if dist.size > 1 else ""))

    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(warmup, steps))
    gen = torch.Generator().manual_seed(seed)
    sampler = (RowSampler(train, batch, gen, grow=round(curriculum * steps)) if rows
               else WindowSampler(train, batch, seq_len, gen, state_passing))
    held_gen = torch.Generator().manual_seed(seed + 1)  # separate: evaluation never moves the training sampler
    n_held = min(HELDOUT_WINDOWS, batch * 2)
    held_windows = (held[:n_held] if rows else sample_windows(held, n_held, seq_len, held_gen)).to(device)
    ckpt = checkpoint_dir(out) if out is not None else None
    every = checkpoint_every or eval_every

    step, carry = 0, None
    if resume:
        if not (ckpt / STATE_NAME).is_file():
            raise MCError(f"no checkpoint to resume at {ckpt}")
        step, carry = _load_checkpoint(ckpt, model, opt, sched, sampler, args, dist.rank, dist.size, run, batch)
        log(f"resumed from {ckpt} at step {step}")

    def heldout() -> float:
        mode = model.training
        model.eval()  # no dropout, no activation checkpointing in the evaluation
        try:
            with torch.no_grad():
                value = float(lm_loss(model, held_windows))
        except MCError as e:  # e.g. a non-finite forward (mc_retrofit.segments.check_finite_output)
            raise MCError(f"step {step}: held-out evaluation: {e}") from None
        finally:
            model.train(mode)
        _check_finite(step, "held-out loss", value, lr)
        return value

    history: list[tuple[int, float]] = []
    train_loss = float("nan")
    end = steps if stop_at is None else min(steps, stop_at)
    trainee = None
    try:
        _checkpointing(model, grad_checkpointing)
        model.train(grad_checkpointing or was_training)  # transformers checkpoints only in training mode
        trainee = distributed.wrap(model, dist)
        no_sync = getattr(trainee, "no_sync", None) if tbptt is not None else None
        bar = tqdm(total=steps, initial=step, desc="finetune gates", disable=not progress, dynamic_ncols=True)
        while step < end:
            windows, continued = sampler.next()
            windows = dist.rows(windows).to(device)
            opt.zero_grad(set_to_none=True)
            try:
                loss, carry = window_loss_and_backward(
                    trainee, windows, [p for _, p in params], tbptt=tbptt, cache=carry if continued else None,
                    keep_cache=state_passing > 0, no_sync=no_sync)
            except MCError as e:
                raise MCError(f"step {step + 1}: {e}") from None
            dist.average_gradients([p for _, p in params])  # under --shard fsdp (DDP has done it)
            used_lr = sched.get_last_lr()[0]  # the rate this step ran with (step() moves to the next)
            train_loss = float(dist.mean(loss))
            _check_finite(step + 1, "training loss", train_loss, lr)  # before the step moves the gates
            opt.step()
            sched.step()
            step += 1
            # never checkpoint or write non-finite gates (every rank holds the same gates)
            if not bool(torch.stack([torch.isfinite(p).all() for _, p in params]).all()):  # one sync
                bad = next(n for n, p in params if not bool(torch.isfinite(p).all()))
                raise MCError(f"step {step}: the optimizer step made the gate {bad} non-finite (NaN/inf); "
                              f"nothing of this step was saved: use a smaller --lr than {lr:g}")
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{used_lr:.2e}")
            if eval_every and (step % eval_every == 0 or step == steps):
                history.append((step, heldout()))
                (bar.write if progress else log)(f"step {step}: held-out loss {history[-1][1]:.4f} nats/{unit}")
            if ckpt is not None and ((every and step % every == 0) or step == end) and step < steps:
                carries = dist.gather(None if carry is None else to_plain(carry)) if state_passing > 0 else None
                if dist.main:
                    _save_checkpoint(ckpt, model, opt, sched, sampler, step, args, carries, run)
                dist.barrier()  # nobody runs ahead of a checkpoint that is still being written
        bar.close()
    finally:
        del trainee
        if grad_checkpointing:
            _checkpointing_off(model)
        model.train(was_training)
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
    held_loss = history[-1][1] if history and history[-1][0] == step else heldout()
    base = distributed.base_state_dict(model, dist) if out is not None and step >= steps else None  # all ranks
    if out is not None and step >= steps and dist.main:
        # a tokenizer given for the run (--tokenizer) goes with the model it was tuned with
        tok = None if rows or stream.codec.byte_level else stream.codec.tokenizer
        save_converted(model, out, force=force, tokenizer=tok, **({} if base is None else {"state_dict": base}))
        if ckpt.exists():
            import shutil

            shutil.rmtree(ckpt, ignore_errors=True)
        log(f"wrote {out}")
    dist.close()  # every rank waits for rank 0's save
    return {"step": step, "train_loss": train_loss, "heldout_loss": held_loss, "history": history, "unit": unit}


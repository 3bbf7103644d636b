"""``mc-retrofit finetune``: train only the MC gate parameters for length extrapolation."""
from __future__ import annotations

import math
from pathlib import Path

import click

from . import FiniteFloat, build_config, friendly, mc_options
from .options import load_options
from ..errors import MCError

# Fine-tuning starts from exactly the base model (cache_weight 0) with light gates: the query
# plus a rank-2 connector (under 1% of the reference checkpoints; --gate-source learned is the
# full connector, 22% of the 0.5M-parameter builtin).
FINETUNE_DEFAULTS = {"cache_weight": 0.0, "gate_source": "lowrank"}


@click.command(name="finetune")
@click.argument("model_path", metavar="MODEL")
@click.option("--data", required=True,
              help="Training text: a .txt file or folder (evaluation-only books skipped), a .jsonl file, a datasets "
                   "dataset saved with save_to_disk, or hf:NAME[:CONFIG] (a Hub dataset, streamed).")
@click.option("--tokenizer", default=None, metavar="PATH|HUB_ID",
              help="Tokenizer of the text (default: the checkpoint's own tokenizer files, else bytes for a "
                   "256-entry vocabulary); 'bytes' for token = UTF-8 byte.")
@click.option("--text-field", default="text", show_default=True, help="Text column of a .jsonl file or dataset.")
@click.option("--split", default=None, help="Split of a saved DatasetDict or streamed dataset (default: train).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None,
              help="Read --data only until this many tokens (a streamed dataset: default what the run samples, "
                   "steps x batch x (seq-len + 1), plus the held-out share).")
@click.option("--out", required=True, type=click.Path(), help="Directory to write the fine-tuned converted model to.")
@click.option("--steps", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--seq-len", type=click.IntRange(min=1), default=2048, show_default=True,
              help="Tokens per window (bytes for a byte-level model).")
@click.option("--lr", type=FiniteFloat(min=0, min_open=True), default=1e-2, show_default=True)
@click.option("--connector-lr", type=FiniteFloat(min=0, min_open=True), default=None, metavar="LR",
              help="lr of the lowrank/learned connector (default: --lr); the per-head scalars keep --lr. "
                   "Lower it where the model's queries are l2-normalised (DeltaNet, Gated DeltaNet).")
@click.option("--batch", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=20, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--eval-every", type=click.IntRange(min=0), default=50, show_default=True,
              help="Held-out loss (and checkpoint) every N steps; 0 = only at the end.")
@click.option("--tbptt", type=int, default=None, metavar="L",
              help="Truncated backpropagation: run each window in chunks of L tokens through the model's cache "
                   "(recurrent state + MC memory), backward per chunk, state detached between chunks. Same loss, "
                   "activations of one chunk at a time. 2 <= L <= --seq-len.")
@click.option("--state-passing", type=FiniteFloat(), default=0.0, show_default=True, metavar="P",
              help="Probability in [0, 1] that a step continues the previous step's text streams from their final "
                   "state (cache + MC memory), so the gates see memories older than one window.")
@click.option("--grad-checkpointing", is_flag=True,
              help="Recompute each layer in the backward (transformers' activation checkpointing) to fit long "
                   "windows; not combinable with --tbptt < --seq-len or --state-passing.")
@click.option("--mix", default=None, metavar="ITEM=SHARE,...",
              help="Retrieval-aware rows instead of plain text windows: shares of text, passkey, multikey and kv "
                   "(e.g. text=0.6,passkey=0.2,multikey=0.1,kv=0.1) placed in --data's text; retrieval rows score "
                   "their answer tokens only. Tuning phrasings never match the evaluation's.")
@click.option("--mix-rows", type=click.IntRange(min=2), default=None,
              help="Rows built for --mix (default: steps x batch, at least 64).")
@click.option("--curriculum", type=FiniteFloat(min=0, max=1), default=0.0, show_default=True, metavar="SHARE",
              help="With --mix: order the rows by needle-to-question distance and draw, over the first SHARE "
                   "of the steps, from a growing prefix of them (short distances first); 0 = no curriculum.")
@click.option("--resume", is_flag=True, help="Continue from <out>.checkpoint.")
@click.option("--shard", type=click.Choice(["none", "fsdp"]), default="none", show_default=True,
              help="fsdp: under torchrun, shard the frozen base weights over the processes (FSDP2, per decoder "
                   "layer) for a model larger than one device; the gates stay whole on every process.")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@mc_options
@load_options()
@friendly
def command(model_path, data, tokenizer, text_field, split, max_tokens, out, steps, seq_len, lr, connector_lr, batch,
            warmup, seed, eval_every, tbptt, state_passing, grad_checkpointing, mix, mix_rows, curriculum, resume,
            shard, force, load, **mc):
    """Train only the Memory Caching gates of MODEL (original checkpoint or converted dir) on --data.

    \b
    Data parallel: torchrun --nproc-per-node N -m mc_retrofit finetune MODEL ...
    (--batch is the global batch, split over the N processes; rank 0 writes --out).
    Add --shard fsdp to shard the frozen base over the N processes (a model larger than one device).
    Resume (--resume) needs the same options, and with --state-passing the same N."""
    import torch

    from .. import model as m
    from ..distributed import check_shard, is_main_process
    from ..files import check_target
    from ..data import check_source, codec_for, is_streamed
    from ..finetune.loop import _check_args, check_reads_cache, finetune, token_stream

    _check_args(steps, seq_len, batch, warmup, lr, tbptt, state_passing, grad_checkpointing)  # before any loading
    shard = None if shard == "none" else shard
    check_shard(shard)  # fsdp needs a torchrun launch: refused before any loading
    load.check()
    check_source(data)
    if not force:
        check_target(Path(out).absolute(), force)
    if mix is not None:
        from ..finetune.mix import parse_mix

        parse_mix(mix)  # an unknown item or shares that do not sum to 1: before any loading
        if state_passing:
            raise MCError("--mix builds independent rows; it cannot be combined with --state-passing")
    elif mix_rows is not None or curriculum:
        raise MCError(f"{'--mix-rows' if mix_rows is not None else '--curriculum'} has no effect without --mix; drop it")
    ckpt = load.open(model_path)  # configs only
    # the model's own ids: its tokenizer (or --tokenizer), bytes only for a byte-level model
    codec = codec_for(ckpt.source_dir, ckpt.hf_config.vocab_size, tokenizer, cache_dir=load.cache_dir,
                      hint=getattr(ckpt, "tokenizer_hint", None))
    if max_tokens is None and is_streamed(data):  # what the run samples, plus the held-out tail
        max_tokens = math.ceil(steps * batch * (seq_len + 1) / 0.95) + 2 * (seq_len + 1)
    stream = token_stream(data, codec, text_field=text_field, split=split, max_tokens=max_tokens)
    if not len(stream.ids):  # bad or empty data fails before any weight is loaded
        raise MCError("the training data is empty")
    if ckpt.converted:
        if any(v is not None for v in mc.values()):
            raise MCError(f"{model_path} is already converted; MC options apply only to an original checkpoint")
        check_reads_cache(ckpt.mc_config, seq_len, tbptt, state_passing)  # before any weight loads
        model = m.load(ckpt, **load.placement)
    else:
        # the command's own defaults are not flags the user gave (never refused as ignored);
        # a --config file's values replace them
        config = build_config(defaults=FINETUNE_DEFAULTS, **mc)
        check_reads_cache(config, seq_len, tbptt, state_passing)  # before any weight loads
        model = m.convert(m.load_base(ckpt, **load.placement), config)
    if mix is not None:
        from ..finetune.mix import MixBuilder

        n_rows = mix_rows or max(64, steps * batch)
        rows = MixBuilder(stream.text, seq_len, mix, vocab_size=model.config.vocab_size, where=str(data),
                          encode=None if codec.byte_level else codec.encode).tensors(n_rows, seed=seed,
                                                                                     curriculum=curriculum > 0)
        click.echo(f"--mix: {n_rows} rows of {seq_len} tokens ({mix})")
    torch.manual_seed(seed)
    result = finetune(model, rows if mix is not None else stream, steps=steps, seq_len=seq_len, lr=lr, batch=batch,
                      warmup=warmup, seed=seed, out=out, eval_every=eval_every, resume=resume, force=force, tbptt=tbptt,
                      state_passing=state_passing, grad_checkpointing=grad_checkpointing, shard=shard,
                      curriculum=curriculum, connector_lr=connector_lr, log=click.echo)
    if not is_main_process():  # another process of a torchrun run: rank 0 reports
        return
    click.echo(f"finetuned {model_path} for {result['step']} steps: train loss {result['train_loss']:.4f}, "
               f"held-out loss {result['heldout_loss']:.4f} nats/{codec.unit} -> {out}")

"""``mc-retrofit calibrate``: training-free MC settings under a no-harm constraint."""
from __future__ import annotations

import json
from pathlib import Path

import click

from . import FiniteFloat, friendly
from .options import load_options
from ..errors import MCError


@click.command(name="calibrate")
@click.argument("model_path", metavar="MODEL")
@click.option("--data", required=True, help="Training text: a .txt file or a folder (evaluation-only books refused).")
@click.option("--out", required=True, type=click.Path(), help="Converted directory to write.")
@click.option("--seq-len", type=click.IntRange(min=64), default=2048, show_default=True,
              help="Tokens per calibration window and retrieval row (a few times the model's context).")
@click.option("--windows", type=click.IntRange(min=1), default=8, show_default=True, help="Text windows scored.")
@click.option("--rows", type=click.IntRange(min=1), default=16, show_default=True, help="Retrieval rows scored.")
@click.option("--segment-sizes", default="256", show_default=True, help="Comma-separated segment sizes to try.")
@click.option("--margin", type=FiniteFloat(min=0), default=0.01, show_default=True,
              help="Allowed rise of bits per token over the base model on the calibration text.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Replace an earlier mc-retrofit output at --out.")
@load_options()
@friendly
def command(model_path, data, out, seq_len, windows, rows, segment_sizes, margin, seed, force, load):
    """Pick segment size, aggregation, cache weights (per layer), online bias and temperature
    by forward passes only, keeping bits per token within --margin of the base; writes a
    converted directory (the base itself when nothing helps) and calibration.json."""
    import torch

    from .. import model as m
    from ..calibrate import calibrate, calibrated_model
    from ..files import check_target
    from ..finetune.data import read_texts
    from ..finetune.mix import MixBuilder

    load.check()
    source = load.open(model_path)  # configs only: bad paths fail before any work
    if source.converted:
        raise MCError(f"{model_path} is already converted; calibrate an original checkpoint")
    check_target(Path(out).absolute(), force, kind="converted", sources=(source.path, data))
    try:
        sizes = tuple(int(s) for s in segment_sizes.split(",") if s.strip())
    except ValueError:
        raise MCError(f"--segment-sizes takes comma-separated integers like 128,256, not {segment_sizes!r}") from None
    if not sizes or min(sizes) < 1:
        raise MCError(f"--segment-sizes needs positive integers, not {segment_sizes!r}")
    text = read_texts(data)
    if not text:
        raise MCError("the calibration data is empty")
    from ..data.codec import codec_for

    # before any weight loads; codec_for refuses bytes for a vocabulary that is not 256
    if not codec_for(source.source_dir, source.hf_config.vocab_size).byte_level:
        raise MCError("calibrate reads text as bytes: it supports byte-level models (vocabulary 256, no tokenizer) "
                      "for now")
    base = m.load_base(source, **load.placement)
    half = len(text) // 2  # windows from one half, retrieval filler from the other: no overlap
    stream = torch.tensor(list(text[:half]), dtype=torch.long)
    if len(stream) < seq_len + 1:
        raise MCError(f"the calibration data has {len(text)} bytes; at least {2 * (seq_len + 1)} are needed")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - seq_len, (windows,), generator=gen)
    text_windows = torch.stack([stream[s:s + seq_len + 1] for s in starts.tolist()])
    retrieval = MixBuilder(text[half:], seq_len, "passkey=0.5,multikey=0.25,kv=0.25",
                           vocab_size=base.config.vocab_size).tensors(rows, seed=seed)
    result = calibrate(base, text_windows, retrieval, segment_sizes=sizes, margin=margin, log=click.echo)
    model = calibrated_model(base, result)
    report = {"base_bits_per_token": result.base_bits, "bits_per_token": result.bits,
              "base_retrieval": result.base_accuracy, "retrieval": result.accuracy,
              "base_answer_nll": result.base_answer_nll, "answer_nll": result.answer_nll, "is_base": result.is_base,
              "config": result.config.to_dict(), "layer_weights": result.layer_weights, "margin": margin,
              "windows": windows, "rows": rows, "seq_len": seq_len, "seed": seed, "candidates": result.table}
    m.save_converted(model, out, force=force, extra_files={"calibration.json": json.dumps(report, indent=1) + "\n"})
    click.echo(f"calibrated {model_path}: {result.bits:.4f} bits/token (base {result.base_bits:.4f}), retrieval "
               f"{result.accuracy:.3f} (base {result.base_accuracy:.3f}), answer NLL {result.answer_nll:.3f} "
               f"(base {result.base_answer_nll:.3f}) -> {out}")


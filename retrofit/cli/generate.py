"""``mc-retrofit generate``: prompt a converted model and stream its continuation."""
from __future__ import annotations

from pathlib import Path

import click

from . import FiniteFloat, friendly
from .options import load_options
from ..errors import MCError


@click.command(name="generate")
@click.argument("model_path", metavar="MODEL")
@click.option("--prompt-file", type=click.Path(dir_okay=False),
              help="File that is the prompt (a byte-level model gets its bytes exactly; a tokenizer, its UTF-8 text).")
@click.option("--prompt", help="Prompt text (instead of --prompt-file).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--temperature", type=FiniteFloat(min=0), default=0.0, show_default=True,
              help="0 = greedy decoding.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--tokenizer", default=None, metavar="PATH|HUB_ID",
              help="Tokenizer of the prompt and output (default: the checkpoint's own tokenizer files, else bytes "
                   "for a 256-entry vocabulary); 'bytes' for token = UTF-8 byte.")
@click.option("--stats", is_flag=True, help="Print the MC cache's segments and bytes at the end.")
@load_options(device_map=True)
@friendly
def command(model_path, prompt_file, prompt, max_new_tokens, temperature, seed, tokenizer, stats, load):
    """Stream a continuation of a prompt from MODEL (converted dir, exported file, or original checkpoint)."""
    import torch

    from .. import model as m
    from ..data import codec_for
    from ..generation import ByteStreamer, cache_stats

    if (prompt_file is None) == (prompt is None):
        raise MCError("give exactly one of --prompt-file or --prompt")
    if prompt_file is not None:
        if not Path(prompt_file).is_file():
            raise MCError(f"{prompt_file} does not exist")
        raw = Path(prompt_file).read_bytes()
    else:
        raw = prompt.encode("utf-8", "surrogateescape")  # the argument's bytes, as the shell passed them
    if not raw:
        raise MCError("the prompt is empty")
    load.check()
    ckpt = load.open(model_path)
    # before any weight loads: a model with a tokenizer never gets the prompt's bytes as ids
    codec = codec_for(ckpt.source_dir, ckpt.hf_config.vocab_size, tokenizer, cache_dir=load.cache_dir,
                      hint=getattr(ckpt, "tokenizer_hint", None))
    placement = dict(load.placement)
    if placement["device"] is None and placement["device_map"] is None and torch.cuda.is_available():
        placement["device"] = "cuda"  # --device's default: the local GPU, else cpu
    model = (m.load if ckpt.converted else m.load_base)(ckpt, **placement)
    tokenizer = codec.tokenizer
    if tokenizer is not None:
        from transformers import TextStreamer

        try:  # a tokenizer takes text: bytes that are not UTF-8 are refused, never replaced by U+FFFD
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise MCError(f"the prompt is not UTF-8 text (byte {e.start}); this model's tokenizer takes text: "
                          "save the prompt as UTF-8") from None
        ids = tokenizer(text, return_tensors="pt").input_ids
        streamer = TextStreamer(tokenizer, skip_prompt=True)
    else:
        ids = torch.tensor([list(raw)])  # a byte-level model (codec_for: 256 entries): token = byte, the file exactly
        streamer = ByteStreamer()
    # The prompt goes where the model takes its input: under a device map, the embeddings'
    # device (model.device is the first parameter's, which need not be it).
    from ..devices import input_device

    ids = ids.to(input_device(model))
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None, streamer=streamer, use_cache=True,
            return_dict_in_generate=True, pad_token_id=getattr(model.config, "pad_token_id", None) or 0,
        )
    if stats:
        from ..compat import returned_cache

        cache = returned_cache(out, required=False)  # whatever this transformers version calls it
        if cache is not None:
            s = cache_stats(cache)
            click.echo(f"MC cache: {s['segments']} segments, {s['bytes']} bytes", err=True)


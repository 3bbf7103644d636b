"""The lm-eval model ``mc-retrofit``: an ``HFLM`` whose model is a checkpoint loaded by
mc-retrofit, with Memory Caching (default) or without (``mc=off``).

``--model_args pretrained=PATH_OR_HUB_ID[,KEY=VALUE...]``, keys:

- MC: ``mc=on|off``, ``mc_config=FILE`` (an mc_config.json or converted directory) and the
  MCConfig fields (``segment_size``, ``aggregation``, ``top_k``, ``gate_source``, ``gate_rank``,
  ``temperature``, ``online_bias``, ``cache_weight``, ``segmentation``,
  ``max_cached_segments``, ``cache_policy``, ``layers=0;2``); a converted directory or an
  exported file brings its own configuration and takes none of them;
- loading: ``revision``, ``cache_dir``, ``dtype``, ``device_map``, ``tokenizer`` (a folder or Hub
  id; default: the checkpoint's own tokenizer);
- lm-eval's own: ``batch_size``, ``max_batch_size``, ``max_length``, ``add_bos_token``,
  ``prefix_token_id``, ``logits_cache``, ``truncation``, ``softmax_dtype``.

Every request goes through the loaded model: ``loglikelihood`` and
``loglikelihood_rolling`` through its forward (one forward per window: MC builds its
segment caches within it), ``generate_until`` through ``generate`` and its streaming cache.
"""
from __future__ import annotations

import logging

import torch

from mc_retrofit.errors import MCError

from . import require_lm_eval

require_lm_eval()

from lm_eval.api.registry import register_model  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

log = logging.getLogger("mc_retrofit.harness")

MC_FIELDS = ("segment_size", "aggregation", "top_k", "gate_source", "gate_rank", "temperature", "online_bias",
             "cache_weight", "segmentation", "max_cached_segments", "cache_policy", "layers")
MC_KEYS = ("mc", "mc_config", *MC_FIELDS)
LOAD_KEYS = ("revision", "cache_dir", "dtype", "device", "device_map", "tokenizer")
HFLM_KEYS = ("batch_size", "max_batch_size", "max_length", "add_bos_token", "prefix_token_id", "logits_cache",
             "truncation", "softmax_dtype")
# A recurrent model has no positional limit: lm-eval's 2048 default would cut long prompts.
# Windows of this many tokens (rolling log-likelihood) are as long as a document gets here.
UNBOUNDED = 1 << 20


def check_keys(kwargs: dict) -> None:
    unknown = sorted(set(kwargs) - set(MC_KEYS) - set(LOAD_KEYS) - set(HFLM_KEYS))
    if unknown:
        raise MCError(f"model_args key {unknown[0]!r} is not one mc-retrofit takes (MC: {', '.join(MC_KEYS)}; "
                      f"loading: {', '.join(LOAD_KEYS)}; lm-eval: {', '.join(HFLM_KEYS)})")


def mc_setting(value) -> str:
    """``mc=on|off`` (lm-eval parses true/false itself) -> "on", "off"; ``mc=base``: the base
    model, the MC keys checked but not applied (the base run of ``--compare``)."""
    text = str(value).lower()
    if text in ("on", "true", "1", "yes"):
        return "on"
    if text in ("off", "false", "0", "no"):
        return "off"
    if text == "base":
        return "base"
    raise MCError(f"mc takes on or off, not {value!r}")


def build_model(pretrained: str, args: dict):
    """(model, checkpoint, description) for the model_args ``args`` (already checked)."""
    from mc_retrofit.eval.variants import OWN, ModelSource, Variant
    from mc_retrofit.devices import check_placement, torch_dtype

    setting = mc_setting(args.get("mc", "on"))
    given = {k: args[k] for k in MC_FIELDS if args.get(k) is not None}
    if setting == "off" and (given or args.get("mc_config")):
        raise MCError(f"mc=off evaluates the base model: drop {', '.join([*given, 'mc_config'][:1])}")
    device = args.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.get("device_map"):
        device = None
    check_placement(device, args.get("dtype"), args.get("device_map"))
    source = ModelSource(pretrained, device=device or "cpu", dtype=torch_dtype(args.get("dtype")),
                         device_map=args.get("device_map"), revision=args.get("revision"),
                         cache_dir=args.get("cache_dir"))
    if setting == "base":  # what --compare's base run gets: the same keys, checked
        if not source.converted:
            _mc_config(args, given)
        return source.base(), source, "base"
    if setting == "off":
        return source.base(), source, "base"
    if source.converted:
        if given or args.get("mc_config"):
            raise MCError(f"{pretrained} is converted: its own MC configuration is evaluated; drop the MC keys "
                          "(or give the original checkpoint with them)")
        return source.build(Variant(OWN, source.own_config(), source=OWN)), source, "own"
    return source.build(Variant("mc", _mc_config(args, given), source="model_args")), source, "mc"


def _mc_config(args: dict, given: dict):
    from mc_retrofit.cli import build_config

    layers = args.get("layers")
    if layers is not None:  # commas separate model_args: layers are written 0;2;3
        layers = str(layers).replace(";", ",")
    values = {k: v for k, v in given.items() if k != "layers"}
    return build_config(config_file=args.get("mc_config"), layers=layers, **values)


def load_tokenizer(source, spec: str | None, vocab_size: int, cache_dir: str | None = None):
    """The tokenizer lm-eval encodes with, found as every command finds one
    (:func:`mc_retrofit.data.codec.codec_for`: ``spec``, else the checkpoint's own files, else
    the one its format names); lm-eval's tasks are text, so bytes are no answer here."""
    from mc_retrofit.data.codec import codec_for, has_tokenizer_files

    folder = source.checkpoint.source_dir
    hint = getattr(source.checkpoint, "tokenizer_hint", None)
    if spec is None and hint is None and not has_tokenizer_files(folder):
        raise MCError(f"{source.spec} ships no tokenizer, and lm-eval's tasks are text: give tokenizer=PATH "
                      f"(a byte-level model needs a tokenizer that maps text to its {vocab_size} ids)")
    tok = codec_for(folder, vocab_size, spec, hint=hint, cache_dir=cache_dir).tokenizer
    if tok.pad_token_id is None:  # lm-eval pads batches; the pad id is never scored
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.convert_ids_to_tokens(0)
    return tok


def real_max_length(config) -> int:
    """The model's own limit: a hybrid's attention window where its config has one, else none."""
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0 and getattr(config, "layer_types", None):
            return value
    return UNBOUNDED


@register_model("mc-retrofit", "mc_retrofit")
class MCLM(HFLM):
    """lm-eval's HF model over an mc-retrofit model (see the module docstring for model_args)."""

    def __init__(self, pretrained: str, **kwargs):
        check_keys(kwargs)
        if not isinstance(pretrained, str):
            raise MCError("pretrained takes a path, builtin:NAME or Hub id")
        model, source, self.mc_kind = build_model(pretrained, kwargs)
        tokenizer = load_tokenizer(source, kwargs.get("tokenizer"), model.config.vocab_size, kwargs.get("cache_dir"))
        from mc_retrofit.adapters import adapter_for

        self.supports_padding = adapter_for(model.config).supports_padding or self.mc_kind == "base"
        hflm = {k: kwargs[k] for k in HFLM_KEYS if kwargs.get(k) is not None}
        hflm.setdefault("max_length", real_max_length(model.config))
        if str(hflm.get("batch_size", 1)).startswith("auto"):
            raise MCError("batch_size=auto probes with max_length tokens, unbounded for a recurrent model: "
                          "give a number")
        super().__init__(pretrained=model.eval(), tokenizer=tokenizer, backend="causal", **hflm)
        self.source = source

    def generate_until(self, requests, disable_tqdm: bool = False):
        """Batches are left-padded for generation: a family whose MC cannot take padding runs one
        prompt at a time (said once), never a padded batch it would get wrong."""
        if self.supports_padding or self.batch_size_per_gpu == 1:
            return super().generate_until(requests, disable_tqdm)
        log.warning("mc-retrofit: %s takes no padded batches under Memory Caching: generate_until runs with "
                    "batch size 1", type(self.model).__name__)
        size = self.batch_size_per_gpu
        self.batch_size_per_gpu = 1
        try:
            return super().generate_until(requests, disable_tqdm)
        finally:
            self.batch_size_per_gpu = size

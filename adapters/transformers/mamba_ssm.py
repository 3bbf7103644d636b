"""mamba_ssm's own checkpoint format, as ``state-spaces/mamba-130m`` ... and
``state-spaces/mamba2-130m`` ... are published (not the ``-hf`` repos).

``config.json`` holds mamba_ssm's ``MambaConfig`` (``d_model``, ``n_layer``, ``vocab_size``,
``ssm_cfg`` with ``"layer": "Mamba2"`` for Mamba2, none for Mamba-1, ``rms_norm``,
``residual_in_fp32``, ``fused_add_norm``, ``pad_vocab_size_multiple``, ``tie_embeddings``);
the weights are ``pytorch_model.bin`` under the names transformers uses, except the
embedding (``backbone.embedding`` for transformers' ``backbone.embeddings``); no tokenizer
(these models use GPT-NeoX-20B's). The mapping follows transformers' own converters
(``convert_mamba_ssm_checkpoint_to_pytorch.py``, ``convert_mamba2_ssm_checkpoint_to_pytorch.py``).

Shared by the Mamba and Mamba2 adapters; each declares its own ``ssm_cfg`` fields.
"""
from __future__ import annotations

from mc_retrofit.errors import MCError
from mc_retrofit.formats import ForeignFormat

NAME = "mamba_ssm"
TOKENIZER = "EleutherAI/gpt-neox-20b"
# mamba_ssm's MambaConfig defaults (mamba_ssm/models/config_mamba.py): a field a published
# config.json leaves out has this value there.
DEFAULTS = dict(d_intermediate=0, vocab_size=50277, ssm_cfg={}, attn_layer_idx=[], attn_cfg={}, rms_norm=True,
                residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=8, tie_embeddings=True)


def layer_of(data: dict) -> str | None:
    """The mixer a mamba_ssm config asks for ("Mamba1" without ssm_cfg), or None when
    ``data`` is not a mamba_ssm config."""
    if not (isinstance(data, dict) and "d_model" in data and "n_layer" in data):
        return None
    ssm = data.get("ssm_cfg") or {}
    return ssm.get("layer", "Mamba1") if isinstance(ssm, dict) else None


def _positive(cfg: dict, key: str) -> int:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{key} is {value!r}, not a positive integer")
    return value


def rename(name: str) -> str:
    """mamba_ssm's weight name -> transformers' (only the embedding differs)."""
    prefix = "backbone.embedding."
    return "backbone.embeddings." + name[len(prefix):] if name.startswith(prefix) else name


def config_fields(data: dict, ssm_defaults: dict, ssm_fields: dict, handled: set) -> tuple[dict, dict]:
    """``(transformers fields common to both families, the mixer's ssm_cfg with defaults)``.

    ``ssm_fields``: mamba_ssm mixer argument -> transformers config field, copied as they
    are; ``handled``: arguments not copied: the family reads them from the returned ssm_cfg
    (derived fields, refusals), or they only initialise weights or pick a kernel (the loaded
    weights and the math do not depend on them). Any other argument is refused: a model
    that silently differs from its checkpoint is worse than none."""
    cfg = {**DEFAULTS, **data}
    if not cfg["rms_norm"]:
        raise MCError("it uses LayerNorm (rms_norm false); transformers' Mamba models have RMSNorm only")
    if cfg["d_intermediate"]:
        raise MCError(f"it has an MLP in every block (d_intermediate {cfg['d_intermediate']}); transformers' "
                      "Mamba models have none")
    if cfg["attn_layer_idx"]:
        raise MCError(f"it has attention layers ({cfg['attn_layer_idx']}); transformers' Mamba models have none")
    ssm = {k: v for k, v in dict(cfg["ssm_cfg"]).items() if k != "layer"}
    unknown = sorted(set(ssm) - set(ssm_fields) - handled)
    if unknown:
        raise MCError(f"its ssm_cfg sets {', '.join(unknown)}, which mc-retrofit does not map to transformers")
    ssm = {**ssm_defaults, **ssm}
    vocab, multiple = _positive(cfg, "vocab_size"), _positive(cfg, "pad_vocab_size_multiple")
    vocab += -vocab % multiple  # mamba_ssm pads the embedding to a multiple; the weights have the padded size
    fields = dict(
        hidden_size=_positive(cfg, "d_model"), num_hidden_layers=_positive(cfg, "n_layer"), vocab_size=vocab,
        residual_in_fp32=bool(cfg["residual_in_fp32"]), tie_word_embeddings=bool(cfg["tie_embeddings"]),
        # GPT-NeoX-20B's <|endoftext|> is id 0: transformers' converters set all three to it
        pad_token_id=0, bos_token_id=0, eos_token_id=0,
        **{ssm_fields[k]: v for k, v in ssm.items() if k in ssm_fields},
    )
    return fields, ssm


def declare(layer: str, config) -> ForeignFormat:
    """The mamba_ssm format of one mixer (``layer`` as ssm_cfg names it)."""
    return ForeignFormat(NAME, recognise=lambda data: layer_of(data) == layer, config=config, rename=rename,
                         tokenizer=TOKENIZER)

"""``evaluate``: the base model and every MC variant on the same inputs, in one process
(or sharded over several), returning one results dictionary (see :mod:`.report`)."""
from __future__ import annotations

import dataclasses
import gc
import platform
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from mc_retrofit.errors import MCError

from .. import distributed
from ..devices import input_device
from . import perplexity, retrieval
from .recipes import TASKS, resolve
from .text import codec_for, default_texts, load_texts, tokenize_documents
from .variants import ModelSource, Variant, assemble

SCHEMA = "mc-retrofit-eval/1"


@dataclass
class EvalOptions:
    model: str
    recipe: dict
    variants: list[Variant] = field(default_factory=list)
    use_recipe_variants: bool | None = None
    seed: int | None = None  # None: the recipe's "seed", else 0
    data: str | None = None
    text_field: str = "text"
    split: str | None = None
    tokenizer: str | None = None
    device: str | None = None
    dtype: str | None = None
    device_map: str | None = None  # "auto": accelerate places the model (excludes device)
    revision: str | None = None  # of a Hub id
    cache_dir: str | None = None  # Hugging Face cache for a Hub id
    batch_size: int | None = None
    train_context: int | None = None
    sections: list[str] | None = None  # None: every section the recipe has
    progress: bool = True


def _dtype(name: str | None):
    from ..devices import torch_dtype

    return torch_dtype(name)


def environment(device: str, world: distributed.World) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for pkg in ("mc-retrofit", "torch", "transformers", "flash-linear-attention", "triton", "datasets"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = platform.processor() or platform.machine()
    return {
        "versions": versions, "device": device, "device_name": name, "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(), "world_size": world.size,
    }


def evaluate(opts: EvalOptions) -> dict:
    t_start = time.time()
    if opts.seed is None:  # a recipe's seed is honoured; an explicit one wins
        opts = dataclasses.replace(opts, seed=opts.recipe.get("seed", 0))
    world, device = distributed.setup_device(opts.device)
    try:
        return _evaluate(opts, world, device, t_start)
    finally:
        world.close()


def _evaluate(opts: EvalOptions, world: distributed.World, device: str, t_start: float) -> dict:
    torch.manual_seed(opts.seed)
    source = ModelSource(opts.model, device=device, dtype=_dtype(opts.dtype), device_map=opts.device_map,
                         revision=opts.revision, cache_dir=opts.cache_dir)
    ctx = opts.train_context or source.training_context()
    recipe = resolve(opts.recipe, ctx)
    sections = [s for s in ("perplexity",) + TASKS if s in recipe and (opts.sections is None or s in opts.sections)]
    if not sections:
        raise MCError("nothing to run: the recipe has none of the selected sections")
    variants = assemble(source, recipe.get("variants", []), opts.variants, opts.use_recipe_variants)
    batch_size = opts.batch_size or recipe.get("batch_size", 4)

    cfg = source.config()
    codec, texts = None, []
    if any(s != "mqar" for s in sections):  # text sections: a tokenizer and documents
        codec = codec_for(source.path if source.path.is_dir() else None, cfg.vocab_size, opts.tokenizer,
                          hint=getattr(source.checkpoint, "tokenizer_hint", None), cache_dir=opts.cache_dir)
        texts = load_texts(opts.data, opts.text_field, opts.split) if opts.data else default_texts()
        docs = tokenize_documents(texts, codec)

    work: dict[str, list] = {}
    if "perplexity" in sections:
        body = recipe["perplexity"]
        work["perplexity"] = perplexity.make_windows(docs, body["lengths"], body.get("windows", 4), opts.seed)
    if codec is not None:
        haystack = "\n\n".join(t for _, t in texts).encode("utf-8")
        n_tokens = sum(len(ids) for _, ids in docs)
        bytes_per_token = 1.0 if codec.byte_level else sum(len(t.encode()) for _, t in texts) / max(1, n_tokens)
    for task in TASKS:
        if task == "mqar" and task in sections:
            work[task] = retrieval.make_mqar_items(recipe[task], cfg.vocab_size, opts.seed)
        elif task in sections:
            work[task] = retrieval.make_items(task, recipe[task], haystack, codec, opts.seed, bytes_per_token)
    mine = {k: distributed.shard(v, world) for k, v in work.items()}

    records: list[dict] = []
    seconds: dict[str, float] = {}
    for vi, variant in enumerate(variants):
        t0 = time.time()
        model = source.build(variant)
        # Inputs go where the model takes them: the device, or under a device map the
        # embeddings' device (the model spreads over several).
        where = device if opts.device_map is None else input_device(model)
        for sec, items in mine.items():
            desc = f"[{vi + 1}/{len(variants)}] {variant.name}: {sec}"
            with tqdm(total=len(items), desc=desc, disable=not (opts.progress and world.main), leave=False,
                      unit="window" if sec == "perplexity" else "sample") as bar:
                if sec == "perplexity":
                    bucket = recipe["perplexity"].get("position_bucket") or max(1, (ctx or 512) // 4)
                    records += perplexity.score_windows(model, items, bucket, where, batch_size, variant.name, bar)
                else:
                    score = retrieval.score_mqar if sec == "mqar" else retrieval.score_items
                    records += score(model, items, where, batch_size, variant.name, bar)
        seconds[variant.name] = time.time() - t0
        if model is not source.base():
            del model
            gc.collect()

    records = world.all_gather(records)
    timing = world.all_gather([seconds])
    order = {v.name: i for i, v in enumerate(variants)}
    records.sort(key=lambda r: (order[r["variant"]], r["kind"], r["length"], -1 if r.get("depth") is None else r["depth"],
                                r.get("window", r.get("sample", 0))))
    names = [v.name for v in variants]
    results = {
        "schema": SCHEMA,
        "model": opts.model,
        "family": getattr(cfg, "model_type", None),
        "parameters": sum(p.numel() for p in source.base().parameters()),
        "train_context": ctx,
        "tokenizer": codec.name if codec is not None else "the model's own vocabulary (synthetic tasks only)",
        "data": opts.data or ("gutenberg eval-only books (" + ", ".join(n for n, _ in texts) + ")" if texts
                              else "synthetic (mc_retrofit.tasks.mqar)"),
        "seed": opts.seed,
        # what the base weights were evaluated in (--dtype, else the checkpoint's own); MC
        # gates and cached states are fp32 whatever this says
        "dtype": str(next(source.base().parameters()).dtype).removeprefix("torch."),
        "batch_size": batch_size,
        "recipe": recipe,
        "sections": sections,
        "variants": [v.describe(cfg) for v in variants],
        "environment": {**environment(device, world), "device_map": opts.device_map},
        "seconds": {"total": time.time() - t_start,
                    "per_variant": {n: max(t.get(n, 0.0) for t in timing) for n in names}},
    }
    if "perplexity" in sections:
        results["perplexity"] = perplexity.summarise(records, names)
    for task in TASKS:
        if task in sections:
            results[task] = retrieval.summarise(records, task, names)
    results["records"] = records
    return results

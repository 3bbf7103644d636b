"""``mc-retrofit eval``: the base model and MC configurations side by side (perplexity by
position and length, pass-key, multi-key and variable-tracking recall)."""
from __future__ import annotations

import re
from pathlib import Path

import click

from . import friendly
from .options import load_options

SECTIONS = ("perplexity", "passkey", "multikey", "variable_tracking")


@click.command(name="eval")
@click.argument("model")
@click.option("--recipe", default="default", show_default=True,
              help="Evaluation suite: a built-in suite (smoke, default, long, sweep, mqar) or a .json path.")
@click.option("--config", "configs", multiple=True, type=click.Path(),
              help="An mc_config.json (or converted directory) to compare; repeatable.")
@click.option("--variant", "variant_specs", multiple=True,
              help="An MC variant as key=value pairs, e.g. 'name=ssc4,aggregation=ssc,top_k=4,segment_size=128'; repeatable.")
@click.option("--recipe-variants/--no-recipe-variants", default=None,
              help="Also run the recipe's variants (default: only when no --config/--variant is given and MODEL is not converted). "
                   "--no-recipe-variants with nothing else evaluates the model alone (a reference run).")
@click.option("--only", help=f"Comma-separated sections to run ({', '.join(SECTIONS)}); default: all in the recipe.")
@click.option("--out", type=click.Path(file_okay=False), help="Output folder (default eval-results/MODEL-RECIPE).")
@click.option("--seed", type=click.IntRange(min=0), help="Seed for windows and samples (default: the recipe's seed, else 0).")
@click.option("--data", type=click.Path(), help="Long documents: .txt file or folder, .jsonl, or a saved datasets dataset (default: the eval-only Gutenberg books).")
@click.option("--text-field", default="text", show_default=True, help="Text column of a .jsonl file or dataset.")
@click.option("--split", help="Split of a saved DatasetDict (default test, validation or train).")
@click.option("--tokenizer", help="'bytes', or a tokenizer path (default: the checkpoint's own, else bytes for vocab 256).")
@click.option("--train-context", type=click.IntRange(min=1), help="Training context in tokens, for lengths written as '4x' (default: from training.json or the config).")
@click.option("--batch-size", type=click.IntRange(min=1), help="Windows/samples per forward (default: the recipe's).")
@click.option("--plots/--no-plots", default=True, show_default=True, help="Write PNG plots.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--force", is_flag=True, help="Replace the results of an earlier eval run in --out (no other folder).")
@load_options(device_map=True)
@friendly
def command(model, recipe, configs, variant_specs, recipe_variants, only, out, seed, data, text_field, split,
            tokenizer, train_context, batch_size, plots, quiet, force, load):
    """Evaluate MODEL (checkpoint dir, builtin:NAME, converted dir or exported file): the base
    model and MC variants on the same long documents and recall prompts."""
    from mc_retrofit.errors import MCError

    from ..eval import EvalOptions, evaluate, load_recipe, markdown, parse_variant, variant_from_file, write_json
    from ..distributed import is_main_process
    from ..eval import plots as make_plots
    from ..files import atomic_dir, check_target

    sections = None
    if only:
        sections = [s.strip() for s in only.split(",") if s.strip()]
        bad = [s for s in sections if s not in SECTIONS]
        if bad:
            raise MCError(f"--only takes {', '.join(SECTIONS)}; not {', '.join(bad)}")
    # Every option that can be checked without the model is checked here, before it loads.
    load.check()
    _check_tokenizer(tokenizer, cache_dir=load.cache_dir)
    rec = load_recipe(recipe)
    extra = [variant_from_file(c) for c in configs] + [parse_variant(s) for s in variant_specs]
    opts = EvalOptions(model=model, recipe=rec, variants=extra, use_recipe_variants=recipe_variants, seed=seed,
                       data=data, text_field=text_field, split=split, tokenizer=tokenizer, device=load.device, dtype=load.dtype,
                       device_map=load.device_map, revision=load.revision, cache_dir=load.cache_dir,
                       batch_size=batch_size, train_context=train_context, sections=sections, progress=not quiet)
    # The recipe's name is slugged like the model's: a name like "../../x" must not pick a
    # folder outside eval-results/.
    out_dir = Path(out) if out else Path("eval-results") / f"{_slug(model)}-{_name_slug(rec['name'])}"
    sources = [model, data, tokenizer, *configs]  # never written over (paths that do not exist are skipped)
    # Checked before the (long) evaluation: --force replaces only an earlier run's results (any
    # other existing folder is refused, even one without results.json), and --out can be written.
    check_target(out_dir, force, kind="eval", sources=sources, make_parents=True)
    results = evaluate(opts)
    if not is_main_process():  # another process of a torchrun run: rank 0 writes
        return
    out_dir.absolute().parent.mkdir(parents=True, exist_ok=True)
    table = markdown(results)
    # Every file in one folder that appears in one rename: a run that finished meanwhile in the
    # same --out is never overwritten (nor mixed with this one's plots).
    with atomic_dir(out_dir, force=force, kind="eval", sources=sources) as tmp:
        (tmp / "results.md").write_text(table + "\n")
        write_json(results, tmp / "results.json")
        written = [out_dir / p.name for p in make_plots(results, tmp)] if plots else []
    click.echo(table)
    click.echo(f"wrote {out_dir / 'results.json'}, {out_dir / 'results.md'}"
               + "".join(f", {p}" for p in written) + f" ({results['seconds']['total']:.0f} s)")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(text.replace("builtin:", "builtin-")).name).strip("-") or "model"


def _name_slug(name: str) -> str:
    """A recipe name as one harmless path component (no separators, no leading dots)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(name)).strip("-.") or "recipe"


def _check_tokenizer(tokenizer: str | None, cache_dir: str | None = None) -> None:
    """``--tokenizer`` is 'bytes', a tokenizer folder on disk or a Hugging Face Hub id
    ``org/name[@rev]`` (``--revision`` is MODEL's, not the tokenizer's). A Hub id is
    fetched here, before the model loads, so a missing or unreachable one fails first;
    the evaluation then finds it in the cache."""
    from ..hub import resolve_tokenizer

    if tokenizer is None or tokenizer == "bytes":
        return
    resolve_tokenizer(tokenizer, cache_dir=cache_dir)

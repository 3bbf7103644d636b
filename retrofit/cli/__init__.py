"""The ``mc-retrofit`` command line.

Every user-facing failure prints one line (``error: ...``) and exits non-zero; no
traceback unless ``MC_RETROFIT_DEBUG=1``.
"""
from __future__ import annotations

import functools
import importlib
import json
import math
import os
import sys

import click
from pathlib import Path

from ..config import MCConfig
from ..errors import MCError
from .options import load_options


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class FiniteFloat(click.FloatRange):
    """A float option that refuses ``inf`` and ``nan`` (click's FLOAT and FloatRange accept
    both: ``--lr inf`` trained a model of NaN gates and exited 0), optionally within
    FloatRange's bounds. Every float option of the CLI uses it."""

    name = "float"

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):  # nan compares false to every bound: check it first
            self.fail(f"{value} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)

    def _describe_range(self) -> str:
        # no bounds: nothing to add to the help (FloatRange would print "x<=None")
        return "" if self.min is None and self.max is None else super()._describe_range()


def friendly(fn):
    """Turn MCError (and anything unexpected) into one line and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MCError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except (click.ClickException, click.Abort, SystemExit, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001 - a one-line report, traceback on request
            if os.environ.get("MC_RETROFIT_DEBUG"):
                raise
            first = (str(e).strip().splitlines() or [""])[0]
            click.echo(f"error: {type(e).__name__}: {first} (set MC_RETROFIT_DEBUG=1 for a traceback)", err=True)
            sys.exit(1)

    return wrapper


def mc_options(fn):
    """Options that build an MCConfig, shared by the commands that convert."""
    opts = [
        click.option("--config", "config_file", type=click.Path(dir_okay=False), help="mc_config.json to start from."),
        click.option("--segmentation", type=click.Choice(["constant", "log"]), help="Segment boundaries (default constant)."),
        click.option("--segment-size", type=click.IntRange(min=1), help="Tokens per segment (default 256)."),
        click.option("--aggregation", type=click.Choice(["residual", "gated", "soup", "ssc"]), help="How cached reads combine (default gated)."),
        click.option("--top-k", type=click.IntRange(min=1), help="Cached segments kept per token under ssc (default 2)."),
        click.option("--gate-source", type=click.Choice(["query", "lowrank", "learned"]),
                     help="Gate input: the layer's query, the query plus a low-rank learned correction, or a full learned connector."),
        click.option("--gate-rank", type=click.IntRange(min=1), help="Rank of the lowrank gate connector (default 2)."),
        click.option("--temperature", type=FiniteFloat(min=0, min_open=True), help="Gate softmax temperature (default 1)."),
        click.option("--online-bias", type=FiniteFloat(), help="Added to the online memory's gate logit (default: the family's, 0; RWKV-7 4)."),
        click.option("--cache-weight", type=FiniteFloat(), help="Initial mix of the cached reads: 1 = MC, 0 = exactly the base model."),
        click.option("--layers", help="Comma-separated mixer layer indices to wrap (default: all)."),
        click.option("--max-cached-segments", type=click.IntRange(min=1), help="Keep at most this many cached segments per layer."),
        click.option("--cache-policy", type=click.Choice(["recent", "log"]),
                     help="Which segments a full cache keeps: the newest, or newest half + log-spaced older (default recent)."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def build_config(config_file=None, layers=None, *, defaults: dict | None = None, **values) -> MCConfig:
    """The MCConfig of the MC options given on the command line (None: not given), over
    ``--config``'s file, over ``defaults`` (a command's own defaults: not counted as given,
    so they are never refused as ignored flags)."""
    base = dict(defaults or {})
    if config_file:
        if not os.path.isfile(config_file):
            raise MCError(f"{config_file} does not exist")
        with open(config_file) as f:
            base = MCConfig.from_json(f.read()).to_dict()
    given = {k for k, v in values.items() if v is not None}
    if layers is not None:
        try:
            base["layers"] = [int(x) for x in layers.split(",") if x.strip()]
        except ValueError:
            raise MCError(f"--layers takes comma-separated integers like 0,2,3, not {layers!r}") from None
        if not base["layers"]:  # ",,," would convert nothing and still report success
            raise MCError(f"--layers needs at least one layer index like 0,2,3, not {layers!r} (omit it to wrap all)")
    base.update({k: v for k, v in values.items() if v is not None})
    config = MCConfig.from_dict(base)
    ignored = config.ignored(given)
    if ignored:  # a flag that changes nothing is a misunderstanding; say which and why
        name, why = ignored[0]
        raise MCError(f"--{name.replace('_', '-')} {why}; drop it")
    return config


def mc_given(mc: dict) -> bool:
    """Whether any MC option was given on the command line."""
    return any(v is not None for v in mc.values())


# Commands that live in their own modules (one module per command, so work on them does
# not collide): each defines a click command named ``command``. Loaded lazily, so that
# importing them cannot cycle back into this module while it is still initialising.
LAZY_COMMANDS = {"eval": "cli.eval", "finetune": "cli.finetune", "generate": "cli.generate", "calibrate": "cli.calibrate",
                 "lm-eval": "cli.harness"}


class LazyGroup(click.Group):
    def _lazy(self, name):
        module = LAZY_COMMANDS.get(name)
        if module is None:
            return None
        try:
            return importlib.import_module(f"mc_retrofit.{module}").command
        except ModuleNotFoundError as e:
            if e.name != f"mc_retrofit.{module}":
                raise
            return None  # that command is not part of this installation

    def list_commands(self, ctx):
        lazy = [n for n in LAZY_COMMANDS if self._lazy(n) is not None]
        return sorted(set(super().list_commands(ctx)) | set(lazy))

    def get_command(self, ctx, name):
        return super().get_command(ctx, name) or self._lazy(name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mc-retrofit")
def main():
    """Give already-trained recurrent LMs a growing memory (Memory Caching)."""
    from ..distributed import cpu_numerics

    cpu_numerics()


@main.command()
@click.argument("src")
@click.option("--out", required=True, type=click.Path(), help="Directory to write the converted model to.")
@click.option("--force", is_flag=True, help="Replace --out if it is an earlier mc-retrofit output of the same kind.")
@mc_options
@load_options(runs_model=False)
@friendly
def convert(src, out, force, load, **mc):
    """Wrap the checkpoint SRC (a Hugging Face-format directory or builtin:NAME) with Memory Caching."""
    from .. import model as m
    from ..files import check_target

    config = build_config(**mc)
    source = load.open(src)  # configs only
    # Before any weight loads: --force replaces only an earlier converted model, never SRC or the cwd.
    check_target(out, force, kind="converted", sources=[source.path])
    hf = source.hf_config
    bad = [i for i in (config.layers or []) if i >= hf.num_hidden_layers]
    if bad:  # checked before loading any weight
        raise MCError(f"layers {bad} do not exist: the model has {hf.num_hidden_layers} recurrent layers")
    base = m.load_base(source, **load.placement)
    model = m.convert(base, config)
    m.save_converted(model, out, force=force)
    n = sum(p.numel() for p in m.gate_state_dict(model).values())
    c = model.mc.config
    segments = f"segment {c.segment_size}" if c.segmentation == "constant" else "log segments"
    click.echo(
        f"converted {src} ({c.family}, {len(m.gate_modules(model))} MC layers, "
        f"{c.aggregation}, {segments}, {n} gate parameters) -> {out}"
    )


@main.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@mc_options
@load_options(runs_model=False)
@friendly
def inspect(path, as_json, load, **mc):
    """Family, layers, state shape and bytes, and cache bytes per 1K tokens of PATH."""
    from rich.console import Console
    from rich.table import Table

    from ..describe import describe

    # No MC options: None, so describe can tell "nothing given" from "the defaults given"
    # (and refuse options for a converted model, whose own mc_config.json rules).
    ckpt = load.open(path, config_only=True)  # a Hub id: its configs only, no weights
    if mc_given(mc) and ckpt.converted:
        flags = ", ".join("--config" if k == "config_file" else f"--{k.replace('_', '-')}"
                          for k, v in mc.items() if v is not None)
        raise MCError(f"{path} is converted: its mc_config.json sets the MC options, so {flags} would be ignored; "
                      "drop them, or inspect the original checkpoint with them")
    d = describe(ckpt, build_config(**mc) if mc_given(mc) else None)
    if as_json:
        click.echo(json.dumps(d.to_dict(), indent=2))
        return
    c = d.mc_config
    seg = f"constant {c['segment_size']}" if c["segmentation"] == "constant" else "log"
    table = Table(title=f"{d.path}", show_header=False)
    for k, v in [
        ("family", d.family),
        ("converted", "yes" if d.converted else "no (costs shown for the given options)"),
        ("recurrent layers", str(d.num_layers)),
        ("MC layers", ",".join(map(str, d.mc_layers)) or "none"),
        ("state shape per layer", " + ".join(str(tuple(s)) for s in d.state_shapes)),
        ("state bytes per layer (fp32)", f"{d.state_bytes} ({_human(d.state_bytes)})"),
        ("key summary bytes per layer", f"{d.summary_bytes}"),
        ("bytes per cached segment (all MC layers)", f"{d.segment_bytes} ({_human(d.segment_bytes)})"),
        ("segmentation", seg),
        ("aggregation", c["aggregation"] + (f" (top-{c['top_k']})" if c["aggregation"] == "ssc" else "")),
        ("cached segments per 1K tokens", f"{d.segments_per_1k:g}"),
        ("cache bytes per 1K tokens (per sequence)", f"{d.cache_bytes_per_1k:.0f} ({_human(d.cache_bytes_per_1k)})"),
        ("cache cap (per sequence)", "none" if d.cache_cap_bytes is None else
         f"{c['max_cached_segments']} segments, {c['cache_policy']} policy: at most {_human(d.cache_cap_bytes)}"),
    ]:
        table.add_row(k, v)
    Console().print(table)


@main.command()
@click.argument("src")
@click.option("--out", required=True, type=click.Path(), help="OUT.safetensors (one file) or a directory.")
@click.option("--force", is_flag=True, help="Replace --out if it is an earlier mc-retrofit output of the same kind.")
@load_options(runs_model=False)
@friendly
def export(src, out, force, load):
    """Write the converted model SRC as one .safetensors file (or a directory)."""
    from .. import model as m
    from ..files import check_target

    to_file = m.exports_to_file(out)
    source = load.open(src)  # configs only
    check_target(out, force, kind="exported" if to_file else "converted", sources=[source.path],
                 want_dir=not to_file)  # before loading: what --force may replace, and that --out is writable
    model = m.load(source, **load.placement)
    m.export(model, out, force=force)
    click.echo(f"exported {src} -> {out}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@friendly
def patches(as_json):
    """Every foreign symbol mc-retrofit may replace: where, why, the versions it was written
    against, and whether it is installed in this process."""
    from .. import compat

    rows = [{"where": p.where, "layer": p.layer, "group": p.group, "window": f"{p.dist}{p.window}",
             "installed": p.installed, "why": p.why} for p in compat.patches()]
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(rows)} foreign symbols mc-retrofit may patch")
    for col in ("where", "layer", "window", "why"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["where"], r["layer"], r["window"], r["why"])
    Console(width=200).print(table)


if __name__ == "__main__":
    main()

"""``mc-retrofit lm-eval ...``: lm-evaluation-harness with the ``mc-retrofit`` model (see
:mod:`mc_retrofit.harness`). Every argument goes to lm-eval's own command line."""
from __future__ import annotations

import click

from . import friendly


@click.command(name="lm-eval", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                                  "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@friendly
def command(args):
    """lm-eval's command line with --model mc-retrofit (e.g. --model mc-retrofit --model_args
    pretrained=MODEL,segment_size=256 --tasks ruler); --compare also runs mc=off and writes a
    side-by-side table (needs --output_path). pip install 'mc-retrofit[harness]'."""
    from ..harness.run import main

    main(list(args))

"""Where a command's model comes from and how it is placed: one set of options, one object.

``@load_options(...)`` adds ``--revision`` and ``--cache-dir`` (for a Hub id) to a command,
and, on a command that runs a model, ``--dtype`` and ``--device`` (and ``--device-map`` where
big-model placement makes sense). The command receives them as one :class:`LoadOptions`
argument named ``load``, which opens checkpoints and loads models the same way everywhere.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import click

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class LoadOptions:
    revision: str | None = None
    cache_dir: str | None = None
    dtype: str | None = None  # one of DTYPES; None: the checkpoint's own
    device: str | None = None  # None: the command's default
    device_map: str | None = None  # e.g. "auto" (accelerate); excludes device

    @property
    def hub(self) -> dict:
        """Keyword arguments of :func:`open_checkpoint` / ``load`` / ``load_base`` for a Hub id."""
        return {"revision": self.revision, "cache_dir": self.cache_dir}

    def open(self, spec, config_only: bool = False):
        """The :class:`~mc_retrofit.checkpoints.Checkpoint` of ``spec`` (configs only)."""
        from ..checkpoints import open_checkpoint

        return open_checkpoint(spec, config_only=config_only, **self.hub)

    @property
    def torch_dtype(self):
        from ..devices import torch_dtype

        return torch_dtype(self.dtype)

    @property
    def placement(self) -> dict:
        """Keyword arguments of ``load`` / ``load_base``: dtype, device and device map."""
        return {"dtype": self.torch_dtype, "device": self.device, "device_map": self.device_map}

    def check(self) -> None:
        """Every option that can be checked before anything loads (device, dtype on it)."""
        from ..devices import check_placement

        check_placement(self.device, self.dtype, self.device_map)


def load_options(*, runs_model: bool = True, device_map: bool = False, default_device: str | None = None):
    """Decorator: the options above, gathered into a ``load`` keyword argument."""

    def decorate(fn):
        opts = [
            click.option("--revision", help="Hub revision (branch, tag or commit) of a Hub id MODEL; "
                                            "org/name@REV does the same."),
            click.option("--cache-dir", type=click.Path(file_okay=False),
                         help="Hugging Face cache folder for Hub ids (default: HF_HOME's hub cache)."),
        ]
        if runs_model:
            opts += [
                click.option("--dtype", type=click.Choice(DTYPES),
                             help="Load the model's weights in this dtype (MC state and gates stay float32)."),
                click.option("--device", default=default_device,
                             help="cpu, cuda, cuda:1 ... (default: " + (default_device or "the local GPU, else cpu") + ")."),
            ]
        if device_map:
            opts.append(click.option("--device-map", help="'auto': spread a model too big for one device over the "
                                                          "GPUs and CPU (accelerate); excludes --device."))

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            load = LoadOptions(revision=kwargs.pop("revision"), cache_dir=kwargs.pop("cache_dir"),
                               dtype=kwargs.pop("dtype", None), device=kwargs.pop("device", None),
                               device_map=kwargs.pop("device_map", None))
            return fn(*args, load=load, **kwargs)

        for opt in reversed(opts):
            wrapper = opt(wrapper)
        return wrapper

    return decorate

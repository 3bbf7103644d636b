"""This process's place in a launch, for fine-tuning and evaluation alike, and its CPU numerics.

``torchrun --nproc-per-node N`` (or ``accelerate launch``) starts N processes with
``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` and a rendezvous address in the environment;
:func:`from_env` is the one place they are read. One process without them is world size 1,
and then nothing here touches torch.distributed. Backend: nccl on CUDA, gloo on CPU.

- Fine-tuning (:func:`setup`, :func:`wrap`): each process builds the same model and the
  same deterministic global batch, trains on its contiguous rows of it (:meth:`World.rows`),
  and ``DistributedDataParallel`` averages the gate gradients (only they require grad, so
  only they are all-reduced).
- Evaluation (:func:`setup_device`, :func:`shard`, :meth:`World.all_gather`): each process
  scores an interleaved share of the samples; the records are merged on every process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .errors import MCError


def cpu_numerics() -> None:
    """Flush denormal floats to zero on CPU: tiny and random models hit them, and every
    operation on a denormal is about 50x slower. Called by every entry point that computes."""
    torch.set_flush_denormal(True)


@dataclass
class World:
    """This process's place in the launch (size 1: a plain single process)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device | None = None
    owns_group: bool = False  # we initialised the process group, so we tear it down

    @property
    def main(self) -> bool:
        return self.rank == 0

    def rows(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows of the global batch (contiguous, equal slices)."""
        if self.size == 1:
            return batch
        n = batch.shape[0] // self.size
        return batch[self.rank * n: (self.rank + 1) * n]

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The average over ranks of a scalar (the logged training loss)."""
        if self.size == 1:
            return value
        import torch.distributed as dist

        out = value.detach().clone()
        dist.all_reduce(out)
        return out / self.size

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, obj):
        """Every rank's ``obj`` as a list on rank 0 (None elsewhere)."""
        if self.size == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.size if self.main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def all_gather(self, records: list) -> list:
        """Every process's records, concatenated in rank order (on every process)."""
        if self.size == 1:
            return records
        import torch.distributed as dist

        parts: list = [None] * self.size
        dist.all_gather_object(parts, records)
        return [r for part in parts for r in part]

    def close(self) -> None:
        """Wait for every rank, then leave the process group if this process made it (a
        group the caller set up stays up for the caller)."""
        if self.size == 1:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            if self.owns_group:
                dist.destroy_process_group()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise MCError(f"{name}={value!r} is not an integer; it is set by torchrun or accelerate launch: "
                      "unset it to run one process") from None


def from_env() -> World:
    """Rank, size and local rank as the launcher set them (none: one process)."""
    return World(rank=_env_int("RANK", 0), size=max(1, _env_int("WORLD_SIZE", 1)),
                 local_rank=_env_int("LOCAL_RANK", 0))


def is_main_process() -> bool:
    """Rank 0, or no launcher: the process that reports and writes."""
    return from_env().main


def _join(world: World, device: torch.device) -> World:
    """Join (or create) the process group of a launch of ``world.size`` processes."""
    import torch.distributed as dist

    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if dist.get_world_size() != world.size:
        raise MCError(f"WORLD_SIZE={world.size} but the process group has {dist.get_world_size()} processes")
    return World(rank=dist.get_rank(), size=world.size, local_rank=world.local_rank, device=device,
                 owns_group=owns)


def setup(model, batch: int) -> World:
    """Fine-tuning: join the torchrun process group when ``WORLD_SIZE > 1`` (moving the model
    to this rank's GPU when CUDA is available); otherwise a single-process :class:`World`."""
    world = from_env()
    if world.size <= 1:
        return World()
    if batch % world.size:
        raise MCError(f"--batch {batch} is the global batch; it must be divisible by the {world.size} processes")
    device = next(model.parameters()).device
    if torch.cuda.is_available():
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
        model.to(device)
    return _join(world, device)


def setup_device(device: str | None) -> tuple[World, str]:
    """Evaluation: the process's place in the launch, and the device it should use
    (``device``, else this rank's GPU, else cpu)."""
    world = from_env()
    if device is None:
        device = f"cuda:{world.local_rank}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    if world.size > 1:
        world = _join(world, torch.device(device))
    return world, device


def shard(items: list, world: World) -> list:
    """Every ``size``-th item from ``rank``: shards of near-equal size, interleaved so
    each process gets a mix of short and long samples."""
    return items[world.rank::world.size]


def wrap(model, world: World):
    """The model to train with: DDP over the parameters that require grad (the gates).

    Every gate parameter receives a gradient in every backward (see
    ``finetune.step._anchor``), so ``find_unused_parameters`` stays off; the buffers of a
    frozen model are identical on every rank, so they are not broadcast each step."""
    if world.size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    import inspect

    ids = [world.device.index] if world.device.type == "cuda" else None
    # newer torch renamed broadcast_buffers (same meaning for a per-step broadcast)
    name = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters \
        else "broadcast_buffers"
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False, **{name: False})

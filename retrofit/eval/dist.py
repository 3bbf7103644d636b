"""Several processes (``torchrun`` or ``accelerate launch``): shard the samples, merge
the records. Both launchers set ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; one process
without them is world size 1 and nothing here touches torch.distributed."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device: str | None) -> tuple[World, str]:
    """The process's place in the launch, and the device it should use."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    world = World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))
    cuda = torch.cuda.is_available()
    if device is None:
        device = f"cuda:{world.local_rank}" if cuda else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    if size > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return world, device


def shard(items: list, world: World) -> list:
    """Every ``size``-th item from ``rank``: shards of near-equal size, interleaved so
    each process gets a mix of short and long samples."""
    return items[world.rank::world.size]


def gather(records: list, world: World) -> list:
    """Every process's records, concatenated (on every process)."""
    if world.size == 1:
        return records
    import torch.distributed as dist

    parts: list = [None] * world.size
    dist.all_gather_object(parts, records)
    return [r for part in parts for r in part]


def finish(world: World) -> None:
    if world.size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

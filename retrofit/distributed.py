"""Data-parallel fine-tuning through torch.distributed (launched by ``torchrun``).

``torchrun --nproc-per-node N -m mc_retrofit finetune ...`` starts N processes with
``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` and a rendezvous address in the environment. Each
process builds the same model and the same deterministic global batch, trains on its
slice of it, and ``DistributedDataParallel`` averages the gate gradients (only they
require grad, so only they are all-reduced). Backend: nccl on CUDA, gloo on CPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .errors import MCError


@dataclass
class Dist:
    """This process's place in the run (world 1: a plain single process)."""

    world: int = 1
    rank: int = 0
    device: torch.device | None = None
    owns_group: bool = False  # we initialised the process group, so we tear it down

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows of the global batch (contiguous, equal slices)."""
        if self.world == 1:
            return batch
        n = batch.shape[0] // self.world
        return batch[self.rank * n: (self.rank + 1) * n]

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The average over ranks of a scalar (the logged training loss)."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        out = value.detach().clone()
        dist.all_reduce(out)
        return out / self.world

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, obj):
        """Every rank's ``obj`` as a list on rank 0 (None elsewhere)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world if self.main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def setup(model, batch: int) -> Dist:
    """Join the torchrun process group when ``WORLD_SIZE > 1`` (moving the model to this
    rank's GPU when CUDA is available); otherwise a single-process :class:`Dist`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if batch % world:
        raise MCError(f"--batch {batch} is the global batch; it must be divisible by the {world} processes")
    device = next(model.parameters()).device
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        model.to(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if dist.get_world_size() != world:
        raise MCError(f"WORLD_SIZE={world} but the process group has {dist.get_world_size()} processes")
    return Dist(world=world, rank=dist.get_rank(), device=device, owns_group=owns)


def wrap(model, dist_info: Dist):
    """The model to train with: DDP over the parameters that require grad (the gates).

    Every gate parameter receives a gradient in every backward (see
    ``finetune.step._anchor``), so ``find_unused_parameters`` stays off; the buffers of a
    frozen model are identical on every rank, so they are not broadcast each step."""
    if dist_info.world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    import inspect

    ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
    # newer torch renamed broadcast_buffers (same meaning for a per-step broadcast)
    name = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters \
        else "broadcast_buffers"
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False, **{name: False})

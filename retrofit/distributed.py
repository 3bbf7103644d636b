"""This process's place in a launch, for fine-tuning and evaluation alike, and its CPU numerics.

``torchrun --nproc-per-node N`` (or ``accelerate launch``) starts N processes with
``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` and a rendezvous address in the environment;
:func:`from_env` is the one place they are read. One process without them is world size 1,
and then nothing here touches torch.distributed. Backend: nccl on CUDA, gloo on CPU.

- Fine-tuning (:func:`setup`, :func:`wrap`): each process builds the same model and the
  same deterministic global batch, trains on its contiguous rows of it (:meth:`World.rows`),
  and ``DistributedDataParallel`` averages the gate gradients (only they require grad, so
  only they are all-reduced).
- Sharded fine-tuning (``shard="fsdp"``, ``finetune --shard fsdp``): for a model larger than
  one device, :func:`setup` shards the frozen base weights with FSDP2 (``fully_shard`` per
  decoder layer, then the root; each rank keeps 1/N of every weight and all-gathers a layer
  only while it runs). The gates are FSDP's ``ignored_params``: plain tensors, replicated on
  every rank, so the optimizer, the checkpoints and the finiteness checks see them as in a
  single process; :meth:`World.average_gradients` all-reduces their gradients once per step
  (what DDP does for them). The base never gets a gradient, so FSDP reduces nothing.
- Evaluation (:func:`setup_device`, :func:`shard`, :meth:`World.all_gather`): each process
  scores an interleaved share of the samples; the records are merged on every process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

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
    shard: str | None = None  # "fsdp": the base weights are sharded over the ranks (see setup)

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

    def average_gradients(self, params) -> None:
        """Under ``shard="fsdp"``: the mean over ranks of the gates' gradients, in place (one
        all-reduce of them all: they are small). DDP does this itself; FSDP ignores the gates."""
        if self.size == 1 or self.shard != "fsdp":
            return
        import torch.distributed as dist

        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.size
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))

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


SHARDS = ("fsdp",)


def check_shard(shard: str | None, world: World | None = None) -> None:
    """``shard`` is None or ``"fsdp"``, and ``"fsdp"`` only in a launch of several processes
    (refused, not ignored, with one: a model that does not fit one device would otherwise
    fail later, out of memory, as if sharding had been tried)."""
    if shard is None:
        return
    if shard not in SHARDS:
        raise MCError(f"--shard {shard!r} is not known; use --shard fsdp, or leave it out")
    if (world or from_env()).size <= 1:
        raise MCError("--shard fsdp shards the base weights over the processes of a launch; with one process "
                      "drop it, or launch with torchrun --nproc-per-node N -m mc_retrofit finetune ...")


def setup(model, batch: int, shard: str | None = None) -> World:
    """Fine-tuning: join the torchrun process group when ``WORLD_SIZE > 1`` (moving the model
    to this rank's GPU when CUDA is available); otherwise a single-process :class:`World`.
    ``shard="fsdp"``: shard the model's base weights over the ranks instead of moving it
    whole (:func:`_fully_shard`); the model is sharded in place and stays so."""
    world = from_env()
    check_shard(shard, world)
    if world.size <= 1:
        return World()
    if batch % world.size:
        raise MCError(f"--batch {batch} is the global batch; it must be divisible by the {world.size} processes")
    device = next(model.parameters()).device
    if torch.cuda.is_available():
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
        if shard is None:
            model.to(device)
    joined = replace(_join(world, device), shard=shard)
    if shard == "fsdp":
        _fully_shard(model, joined)
    return joined


def _fully_shard(model, world: World) -> None:
    """FSDP2 over the frozen base: each decoder layer (the classes the model lists in
    transformers' ``_no_split_modules``) is one all-gather group, the root (embeddings, final
    norm, head) another. ``fully_shard`` moves each group to the device as it shards it, so
    a rank never holds more than one full layer there. The gates are ``ignored_params``: not
    sharded, not reduced, and not moved, so they are moved here."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from .model import gate_modules, gate_parameters

    names = set(getattr(model, "_no_split_modules", None) or ())
    layers, inner = [], set()
    for module in model.modules():  # parents before children: the outermost of nested ones
        # (Mamba lists its block and the block's mixer; a layer is one group, the block)
        if type(module).__name__ in names and module not in inner:
            layers.append(module)
            inner.update(module.modules())
    if not layers:
        raise MCError(f"{type(model).__name__} names no decoder layer class (_no_split_modules) to shard "
                      "by; fine-tune it without --shard fsdp")
    for gate in gate_modules(model).values():
        gate.to(world.device)
    gates = {p for _, p in gate_parameters(model)}
    mesh = init_device_mesh(world.device.type, (world.size,))
    for layer in layers:
        fully_shard(layer, mesh=mesh, ignored_params=gates)
    fully_shard(model, mesh=mesh, ignored_params=gates)


def base_state_dict(model, world: World) -> dict | None:
    """Under ``shard="fsdp"``: the base weights' full state dict (no gates) on rank 0's CPU,
    gathered one tensor at a time (``{}`` on the other ranks), for ``save_converted`` to
    write exactly what an unsharded run writes; every rank must call it. None otherwise
    (the model's own tensors are whole)."""
    if world.shard != "fsdp" or world.size == 1:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from .model import adapter_of

    # every rank brings its own shards into their saved form (RWKV-4's eval-mode rescaling,
    # done in place on the shards) before they are gathered; rank 0's save then finds none
    adapter_of(model).prepare_save(model)
    whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # a tied weight (embeddings = head) is gathered once per name, as two tensors; transformers
    # finds ties by storage, so the names of one parameter share one tensor again (else the
    # head would be written as a weight of its own)
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    for same in names.values():
        held = [n for n in same if n in whole]
        for n in held[1:]:
            whole[n] = whole[held[0]]
    return {k: v for k, v in whole.items() if ".mc_gate." not in f".{k}"}


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
    frozen model are identical on every rank, so they are not broadcast each step.
    Under ``shard="fsdp"`` the model itself (sharded by :func:`setup`; the gates' gradients
    are averaged by :meth:`World.average_gradients`)."""
    if world.size == 1 or world.shard == "fsdp":
        return model
    from torch.nn.parallel import DistributedDataParallel

    import inspect

    ids = [world.device.index] if world.device.type == "cuda" else None
    # newer torch renamed broadcast_buffers (same meaning for a per-step broadcast)
    name = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters \
        else "broadcast_buffers"
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False, **{name: False})

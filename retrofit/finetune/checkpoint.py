"""Fine-tuning checkpoints: ``<out>.checkpoint/`` holds ``state.pt`` (gates, optimizer,
scheduler, sampler, step, the settings and a run id) and, with state passing, ``carry.pt``
(every rank's carried cache as plain tensors, see :mod:`.carry`). Both are read with
``weights_only=True``; ``state.pt`` records ``carry.pt``'s sha256 and the run id, so a planted
or foreign file is refused before it is read, and a resumed run ends with exactly the gates of
an uninterrupted one."""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import MCError
from ..files import atomic_dir
from ..model import gate_parameters
from .carry import FORMAT as CARRY_FORMAT
from .carry import restore, template_cache

STATE_NAME = "state.pt"
CARRY_NAME = "carry.pt"


@dataclass
class FinetuneArgs:
    """The settings a checkpoint must agree with to be resumed."""

    steps: int
    seq_len: int
    lr: float
    batch: int
    warmup: int
    seed: int
    weight_decay: float
    heldout_share: float
    tbptt: int | None = None
    state_passing: float = 0.0
    grad_checkpointing: bool = False
    curriculum: float = 0.0
    connector_lr: float | None = None


def checkpoint_dir(out: str | Path) -> Path:
    out = Path(out).absolute()
    return out.parent / f"{out.name}.checkpoint"


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def run_id(model, args: FinetuneArgs, train: torch.Tensor, held: torch.Tensor) -> str:
    """What a checkpoint must have been made by to be resumed: the settings, the MC config,
    the model's config and a sample of its weights, the gates' names and shapes, and the
    exact training data. A checkpoint next to ``--out`` from another run is refused."""
    config = {k: v for k, v in model.config.to_dict().items()
              if not k.startswith("_") and k != "transformers_version"}  # not where it was loaded from
    weights = hashlib.sha256()
    for name, p in model.named_parameters():  # a few values of each: cheap even for a large model
        weights.update(f"{name}{tuple(p.shape)}".encode())
        if ".mc_gate." not in f".{name}":
            weights.update(p.detach().flatten()[:64].float().cpu().numpy().tobytes())
    data = hashlib.sha256()
    for t in (train, held):  # ids below 256 as one byte each (lossless; not 8x as int64), others whole
        t = t.to(torch.uint8) if t.dim() == 1 and int(t.max()) < 256 and int(t.min()) >= 0 else t
        data.update(t.contiguous().cpu().numpy().tobytes())
    settings = asdict(args)
    if settings["connector_lr"] is None:  # unset: the id a checkpoint from before the option has
        del settings["connector_lr"]
    described = {"args": settings, "mc_config": model.mc.config.to_dict(), "config": config,
                 "weights": weights.hexdigest(), "data": data.hexdigest()}
    return _digest(json.dumps(described, sort_keys=True, default=str).encode())


def _save_checkpoint(path: Path, model, opt, sched, sampler, step: int, args: FinetuneArgs, carries,
                     run: str) -> None:
    """``carries``: every rank's carried cache as plain data (:func:`to_plain`, rank order),
    or None without one. ``run``: :func:`run_id`."""
    state = {
        "step": step,
        "args": asdict(args),
        "run": run,
        "gates": {n: p.detach().clone().cpu() for n, p in gate_parameters(model)},
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "sampler": sampler.state_dict(),
        "carry": None,  # the sha256 of carry.pt: binds the carried state to this state file
    }
    with atomic_dir(path, force=True, kind="checkpoint") as tmp:
        if carries is not None and any(c is not None for c in carries):
            # plain data only (finetune_carry): resuming never unpickles an object
            torch.save({"format": CARRY_FORMAT, "run": run, "world": len(carries), "carries": carries},
                       tmp / CARRY_NAME)
            state["carry"] = _digest((tmp / CARRY_NAME).read_bytes())
        torch.save(state, tmp / STATE_NAME)


def _load_checkpoint(path: Path, model, opt, sched, sampler, args: FinetuneArgs, rank: int, world: int,
                     run: str, batch: int):
    """Restore everything; returns (step, this rank's carried cache or None). Every file is
    read with ``weights_only=True``: a checkpoint folder is never trusted to hold code."""
    from ..model import check_finite_gate, refused_missing_gates

    file = path / STATE_NAME
    try:
        state = torch.load(file, weights_only=True, map_location="cpu")
    except Exception:  # noqa: BLE001 - torch's message recommends weights_only=False: not ours to give
        raise MCError(f"could not read {file} as plain tensors (damaged, or not written by mc-retrofit); "
                      f"delete {path} or start over with --force") from None
    if not isinstance(state, dict) or not isinstance(state.get("args"), dict) or not isinstance(state.get("gates"), dict):
        raise MCError(f"{file} is not an mc-retrofit checkpoint; delete {path} or start over with --force")
    want = asdict(args)
    if state["args"] != want:
        diff = sorted(k for k in want if state["args"].get(k) != want[k])
        raise MCError(f"checkpoint {path} was made with different settings ({', '.join(diff)}); "
                      "use the same options to resume, or drop --resume")
    params = dict(gate_parameters(model))
    lacking = set(params) - set(state["gates"])
    if lacking and not refused_missing_gates(lacking) and set(state["gates"]) <= set(params):
        # gates from before online_bias was a gate tensor: the bias was never trained and the
        # optimizer state has no slot for it, so no resume can end where an uninterrupted run would
        raise MCError(f"checkpoint {path} was written before the gates had a trainable online_bias (an older "
                      "mc-retrofit) and cannot be resumed; start over with --force")
    if state.get("run") != run:
        raise MCError(f"checkpoint {path} belongs to another run (another model, MC config or training data, or an "
                      "older mc-retrofit); resume with the same ones, or start over with --force")
    if set(state["gates"]) != set(params):
        raise MCError(f"checkpoint {path} does not match this model's gates")
    with torch.no_grad():
        for n, v in state["gates"].items():
            check_finite_gate(n, v)
            params[n].copy_(v)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    sampler.load_state_dict(state["sampler"])
    carry = None
    if (path / CARRY_NAME).is_file():
        carry = _load_carry(path / CARRY_NAME, state.get("carry"), model, run, rank, world, batch)
    # (carry.pt absent, though written: the streams continue from a fresh state)
    return int(state["step"]), carry


def _load_carry(file: Path, expected: str | None, model, run: str, rank: int, world: int, batch: int):
    """This rank's carried cache from ``carry.pt``: only the very file this checkpoint's
    state recorded (its sha256), read as plain data and built into a fresh cache."""
    if expected is None:
        raise MCError(f"{file} was not written by this run (its checkpoint records no carried state); "
                      "delete it to resume")
    data = file.read_bytes()  # checked and loaded from the same bytes
    if _digest(data) != expected:
        raise MCError(f"{file} is not the carried state this checkpoint wrote (its contents differ); "
                      "delete it to resume without the carried state")
    try:
        saved = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception:  # noqa: BLE001
        raise MCError(f"could not read {file} as plain tensors; delete it to resume without the carried state") from None
    if not isinstance(saved, dict) or saved.get("format") != CARRY_FORMAT or saved.get("run") != run:
        raise MCError(f"{file} is not a carried state of this run; delete it to resume without it")
    if saved.get("world") != world or len(saved.get("carries") or ()) != world:
        raise MCError(f"checkpoint {file.parent} carries state for {saved.get('world')} processes, this run has "
                      f"{world}: resume state passing with the same number of processes")
    device = next(model.parameters()).device
    return restore(template_cache(model, batch // world, device), saved["carries"][rank], device, where=str(file))

"""Gate-only fine-tuning: train the Memory Caching gate parameters of a converted model.

Only the tensors under ``.mc_gate.`` (``cache_weight``, ``log_temperature`` and the
optional connector ``W_u``) are trained; every original weight is frozen and stays
bit-identical. Data are bytes (token = byte) from local ``.txt`` files, sampled as random
windows of ``seq_len + 1`` bytes from a seeded generator. The last ``heldout_share`` of the
bytes is held out for the periodic evaluation loss.

Checkpoints (``<out>.checkpoint/state.pt``, written atomically) hold the gate tensors, the
optimizer, the scheduler, the sampler's generator state and the step, so a resumed run
ends with exactly the same gates as an uninterrupted one.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .errors import MCError
from .files import atomic_dir, check_target
from .tasks import EVAL_ONLY

STATE_NAME = "state.pt"
HELDOUT_WINDOWS = 8  # fixed held-out windows per evaluation: cheap and comparable across steps


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


# -- data ---------------------------------------------------------------------------------
def read_texts(data) -> bytes:
    """Bytes from ``data``: a ``.txt`` file, a folder of ``*.txt`` files (sorted; the
    evaluation-only books are skipped), ``bytes`` (the text itself), or a list of those."""
    if isinstance(data, (bytes, bytearray)):
        out = bytes(data)
    elif isinstance(data, (list, tuple)):
        out = b"\n\n".join(read_texts(d) for d in data)
    else:
        path = Path(data)
        if not path.exists():
            raise MCError(f"data path {path} does not exist")
        if path.is_dir():
            files = sorted(p for p in path.glob("*.txt") if p.name not in EVAL_ONLY)
            if not files:
                raise MCError(f"no training .txt files in {path} (evaluation-only books are skipped)")
            out = b"\n\n".join(p.read_bytes() for p in files)
        else:
            if path.name in EVAL_ONLY:
                raise MCError(f"{path.name} is an evaluation-only book; do not train on it")
            out = path.read_bytes()
    return out


def split_heldout(data: bytes, seq_len: int, heldout_share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte tensors (train, held-out); each must hold at least one window of seq_len + 1."""
    need = seq_len + 1
    if len(data) == 0:
        raise MCError("the training data is empty")
    n_held = max(need, int(len(data) * heldout_share))
    if len(data) - n_held < need:
        raise MCError(f"the training data has {len(data)} bytes; need at least {2 * need} "
                      f"(a {need}-byte window to train on and one held out) at --seq-len {seq_len}")
    t = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    return t[: len(data) - n_held], t[len(data) - n_held:]


def sample_windows(data: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """``batch`` random windows of ``seq_len + 1`` bytes (deterministic given ``gen``)."""
    starts = torch.randint(0, len(data) - seq_len, (batch,), generator=gen)
    return torch.stack([data[s: s + seq_len + 1] for s in starts.tolist()])


# -- model --------------------------------------------------------------------------------
def gate_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if ".mc_gate." in f".{n}"]


def lm_loss(model, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats) of ``windows [B, L+1]``."""
    logits = model(windows[:, :-1]).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))


def _schedule(warmup: int, steps: int):
    """Linear warm-up to the peak rate, then cosine decay to zero at ``steps``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


# -- checkpoints ----------------------------------------------------------------------------
def checkpoint_dir(out: str | Path) -> Path:
    out = Path(out).absolute()
    return out.parent / f"{out.name}.checkpoint"


def _save_checkpoint(path: Path, model, opt, sched, gen, step: int, args: FinetuneArgs) -> None:
    state = {
        "step": step,
        "args": asdict(args),
        "gates": {n: p.detach().clone() for n, p in gate_parameters(model)},
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "generator": gen.get_state(),
    }
    with atomic_dir(path, force=True) as tmp:
        torch.save(state, tmp / STATE_NAME)


def _load_checkpoint(path: Path, model, opt, sched, gen, args: FinetuneArgs) -> int:
    file = path / STATE_NAME
    try:
        state = torch.load(file, weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise MCError(f"could not read the checkpoint {file}: {str(e).splitlines()[0] if str(e) else e}") from None
    if state["args"] != asdict(args):
        diff = sorted(k for k in asdict(args) if state["args"].get(k) != asdict(args)[k])
        raise MCError(f"checkpoint {path} was made with different settings ({', '.join(diff)}); "
                      "use the same options to resume, or drop --resume")
    params = dict(gate_parameters(model))
    if set(state["gates"]) != set(params):
        raise MCError(f"checkpoint {path} does not match this model's gates")
    with torch.no_grad():
        for n, v in state["gates"].items():
            params[n].copy_(v)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    gen.set_state(state["generator"])
    return int(state["step"])


# -- training loop --------------------------------------------------------------------------
def finetune(model, texts_or_dataset, *, steps: int = 200, seq_len: int = 2048, lr: float = 1e-2, batch: int = 4,
             warmup: int = 20, seed: int = 0, out: str | Path | None = None, eval_every: int = 50,
             resume: bool = False, force: bool = False, checkpoint_every: int | None = None,
             stop_at: int | None = None, weight_decay: float = 0.0, heldout_share: float = 0.05,
             log: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Train only the MC gate parameters of the converted ``model`` (in place).

    Returns ``{"step", "train_loss", "heldout_loss", "history"}``; ``history`` lists
    ``(step, heldout_loss)``. With ``out``, checkpoints go to ``<out>.checkpoint`` every
    ``checkpoint_every`` steps (default ``eval_every``) and the finished model is written to
    ``out`` as a converted directory (the checkpoint is then removed). ``stop_at`` ends the
    run early at that step after checkpointing (to train in stages); ``resume`` continues
    from the checkpoint. ``weight_decay`` is 0 by default: decaying ``cache_weight`` would
    pull the model towards the base model for no reason."""
    from tqdm.auto import tqdm

    from .model import save_converted

    if getattr(model, "mc_config", None) is None:
        raise MCError("model is not converted; call mc_retrofit.convert(model, MCConfig(...)) first")
    for name, value in (("steps", steps), ("seq_len", seq_len), ("batch", batch)):
        if int(value) < 1:
            raise MCError(f"{name} must be a positive integer, not {value!r}")
    if warmup < 0 or lr <= 0:
        raise MCError("warmup must be >= 0 and lr > 0")
    if resume and out is None:
        raise MCError("resume needs out (the checkpoint lives next to it)")
    if out is not None and not force:
        check_target(Path(out).absolute(), force)
    args = FinetuneArgs(steps, seq_len, float(lr), batch, warmup, seed, float(weight_decay), float(heldout_share))
    train, held = split_heldout(read_texts(texts_or_dataset), seq_len, heldout_share)
    vocab = model.config.vocab_size
    if int(max(train.max(), held.max())) >= vocab:
        raise MCError(f"the data has bytes >= {vocab}, the model's vocabulary size: byte-level models only")

    params = gate_parameters(model)
    if not params:
        raise MCError("the model has no MC gate parameters to train")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    gate_names = {n for n, _ in params}
    for n, p in model.named_parameters():
        p.requires_grad_(n in gate_names)
    n_train = sum(p.numel() for _, p in params)
    n_total = sum(p.numel() for p in model.parameters())
    log(f"trainable: {n_train} gate parameters of {n_total} ({100 * n_train / n_total:.4f}% of the model)")

    opt = torch.optim.AdamW([p for _, p in params], lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(warmup, steps))
    gen = torch.Generator().manual_seed(seed)
    held_gen = torch.Generator().manual_seed(seed + 1)  # separate: evaluation never moves the training sampler
    held_windows = sample_windows(held, min(HELDOUT_WINDOWS, batch * 2), seq_len, held_gen)
    ckpt = checkpoint_dir(out) if out is not None else None
    every = checkpoint_every or eval_every

    step = 0
    if resume:
        if not (ckpt / STATE_NAME).is_file():
            raise MCError(f"no checkpoint to resume at {ckpt}")
        step = _load_checkpoint(ckpt, model, opt, sched, gen, args)
        log(f"resumed from {ckpt} at step {step}")

    def heldout() -> float:
        with torch.no_grad():
            return float(lm_loss(model, held_windows))

    history: list[tuple[int, float]] = []
    train_loss = float("nan")
    end = steps if stop_at is None else min(steps, stop_at)
    try:
        bar = tqdm(total=steps, initial=step, desc="finetune gates", disable=not progress, dynamic_ncols=True)
        while step < end:
            windows = sample_windows(train, batch, seq_len, gen)
            opt.zero_grad(set_to_none=True)
            loss = lm_loss(model, windows)
            loss.backward()
            used_lr = sched.get_last_lr()[0]  # the rate this step ran with (step() moves to the next)
            opt.step()
            sched.step()
            step += 1
            train_loss = float(loss.detach())
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{used_lr:.2e}")
            if eval_every and (step % eval_every == 0 or step == steps):
                history.append((step, heldout()))
                bar.write(f"step {step}: held-out loss {history[-1][1]:.4f} nats/byte")
            if ckpt is not None and ((every and step % every == 0) or step == end) and step < steps:
                _save_checkpoint(ckpt, model, opt, sched, gen, step, args)
        bar.close()
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
    held_loss = history[-1][1] if history and history[-1][0] == step else heldout()
    if out is not None and step >= steps:
        save_converted(model, out, force=force)
        if ckpt.exists():
            import shutil

            shutil.rmtree(ckpt, ignore_errors=True)
        log(f"wrote {out}")
    return {"step": step, "train_loss": train_loss, "heldout_loss": held_loss, "history": history}

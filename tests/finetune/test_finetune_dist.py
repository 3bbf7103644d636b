"""Data-parallel fine-tuning: 2 CPU processes (gloo) train the same gates as 1 process
with the same global batch; resume under DDP (with state passing) is exact."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import mc_retrofit as mr
from mc_retrofit.distributed import cpu_numerics
from mc_retrofit.finetune import finetune
from mc_retrofit.finetune.data import WindowSampler, split_heldout
from mc_retrofit.model import gate_state_dict

from conftest import tiny_model

TEXT = b"the pass key is 40317. remember it. " * 20 + b"some filler text between the facts. " * 20
# TBPTT (DDP's no_sync for all but the last chunk) and state passing (every rank carries its
# own streams; the checkpoint gathers them) both on.
KW = dict(steps=4, seq_len=32, batch=4, warmup=1, lr=5e-2, eval_every=0, seed=3, tbptt=16, state_passing=0.5,
          progress=False, log=lambda s: None)


def _converted():
    return mr.convert(tiny_model("mamba2", vocab_size=256), mr.MCConfig(segment_size=8, cache_weight=0.5,
                                                                         gate_source="learned"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_gloo(rank: int, world: int, port: int) -> None:
    """A spawned worker's torchrun-like environment and its gloo process group."""
    import torch.distributed as dist

    cpu_numerics()
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)


def in_gloo_group(rank: int, world: int, port: int, body, *args) -> None:
    """Run ``body(*args)`` in a spawned worker's gloo group, then leave the group. The body's
    models (FSDP's sharded ones among them) are collected first, while the interpreter is
    whole: gloo's worker threads can hold their tensors, and freeing those during interpreter
    teardown aborts the process now and then (pytorch/pytorch#179291)."""
    import gc

    import torch.distributed as dist

    join_gloo(rank, world, port)
    try:
        body(*args)
    finally:
        gc.collect()
        dist.destroy_process_group()


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    # one process group for the three runs (finetune joins it, leaves it up)
    in_gloo_group(rank, world, port, _train, rank, tmp)


def _train(rank: int, tmp: str) -> None:
    import mc_retrofit.finetune.loop as ft

    seen, step = [], ft.window_loss_and_backward

    def recording(model, windows, *args, **kw):
        seen.append(windows.clone())
        return step(model, windows, *args, **kw)

    ft.window_loss_and_backward = recording  # records this rank's windows in the first run
    straight = _converted()
    finetune(straight, TEXT, out=f"{tmp}/ddp", **KW)
    ft.window_loss_and_backward = step
    torch.save(seen, f"{tmp}/windows{rank}.pt")
    finetune(_converted(), TEXT, out=f"{tmp}/staged", stop_at=2, **KW)
    finetune(_converted(), TEXT, out=f"{tmp}/staged", resume=True, **KW)
    torch.save(straight.state_dict(), f"{tmp}/rank{rank}.pt")


def test_two_processes_train_the_same_gates_as_one(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    single = _converted()
    finetune(single, TEXT, **KW)
    want, init = gate_state_dict(single), gate_state_dict(_converted())
    ddp = gate_state_dict(mr.load(tmp_path / "ddp"))  # written by rank 0
    for k in want:  # the all-reduce sums in another order than one process: rounding only
        torch.testing.assert_close(ddp[k], want[k], rtol=0, atol=5e-6)
    assert any((want[k] - init[k]).abs().max() > 1e-2 for k in want)  # it did train
    resumed = gate_state_dict(mr.load(tmp_path / "staged"))
    assert all(torch.equal(resumed[k], ddp[k]) for k in ddp)  # resume under DDP is exact
    # each rank trained on its own half of the global batch, which is the 1-process batch
    sampler = WindowSampler(split_heldout(TEXT, 32, 0.05)[0], 4, 32, torch.Generator().manual_seed(3), 0.5)
    halves = [torch.load(tmp_path / f"windows{rank}.pt") for rank in range(2)]
    continued = []
    for step in range(KW["steps"]):
        windows, cont = sampler.next()
        continued.append(cont)
        assert torch.equal(torch.cat([halves[0][step], halves[1][step]]), windows)
    assert continued[2]  # step 3 continues from the state the step-2 checkpoint carried
    base = _converted().state_dict()
    for rank in range(2):
        state = torch.load(tmp_path / f"rank{rank}.pt")
        for k, v in state.items():
            if k in want:
                assert torch.equal(v, ddp[k]), (rank, k)  # every rank holds the same gates
            else:
                assert torch.equal(v, base[k]), (rank, k)  # non-gate weights untouched


def test_global_batch_must_split_evenly(monkeypatch):
    from mc_retrofit.distributed import setup

    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(mr.MCError, match="global batch; it must be divisible by the 3 processes"):
        setup(_converted(), 4)


def torchrun_and_one_process(tmp_path, two_process_flags=()):
    """The documented entry point, ``torchrun --nproc-per-node 2 -m mc_retrofit finetune ...``
    (with ``two_process_flags``), and the same run in one process: their gate state dicts."""
    import subprocess
    import sys

    tiny_model("mamba2", vocab_size=256).save_pretrained(tmp_path / "base")
    (tmp_path / "train.txt").write_bytes(TEXT)
    common = [str(tmp_path / "base"), "--data", str(tmp_path / "train.txt"), "--steps", "3", "--seq-len", "32",
              "--batch", "4", "--warmup", "1", "--eval-every", "0", "--segment-size", "8", "--tbptt", "16",
              "--lr", "0.05"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
              "--master-port", str(_free_port())]
    for cmd, out, extra in ((launch, "two", list(two_process_flags)), ([sys.executable], "one", [])):
        r = subprocess.run([*cmd, "-m", "mc_retrofit", "finetune", *common, *extra, "--out", str(tmp_path / out)],
                           capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.count("finetuned") == 1  # rank 0 alone reports
    return tuple(gate_state_dict(mr.load(tmp_path / n)) for n in ("two", "one"))


@pytest.mark.slow
def test_torchrun_cli_matches_one_process(tmp_path):
    two, one = torchrun_and_one_process(tmp_path)
    assert any(bool((v != 0).any()) for k, v in one.items() if k.endswith("cache_weight"))
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=5e-6)

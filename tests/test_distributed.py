"""``mc_retrofit.distributed``, the one process setup of evaluation and fine-tuning: the
launcher's variables read in one place, the CPU numerics in one place, and a 2-process
evaluation that merges to exactly the records of one process (fine-tuning's 2-process
run: tests/finetune/test_finetune_dist.py)."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from mc_retrofit import distributed
from mc_retrofit.errors import MCError

from conftest import tiny_model

RECIPE = {"name": "tiny-mqar", "batch_size": 3, "mqar": {"lengths": [24, 40], "pairs": [3], "samples": 5},
          "variants": [{"name": "ssc1", "mc": {"segment_size": 8, "aggregation": "ssc", "top_k": 1}}]}


def test_the_launchers_variables(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.from_env() == distributed.World(0, 1, 0) and distributed.is_main_process()
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.from_env() == distributed.World(3, 4, 1) and not distributed.is_main_process()
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(MCError, match=r"RANK='one' is not an integer.*torchrun") as e:
        distributed.from_env()
    assert "\n" not in str(e.value)


def test_one_process_touches_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    world, device = distributed.setup_device("cpu")
    assert (world.size, device) == (1, "cpu") and distributed.setup(torch.nn.Linear(1, 1), 4) == distributed.World()
    rows = torch.arange(6)[:, None]
    assert world.rows(rows) is rows and world.all_gather([1]) == [1] and world.gather(2) == [2]
    world.close()
    assert not torch.distributed.is_initialized()


def test_rows_and_shards_partition_a_batch():
    batch, items = torch.arange(8)[:, None], list(range(7))
    worlds = [distributed.World(r, 4) for r in range(4)]
    assert torch.equal(torch.cat([w.rows(batch) for w in worlds]), batch)  # contiguous: DDP == one process
    shares = [distributed.shard(items, w) for w in worlds]
    assert shares[1] == [1, 5] and sorted(sum(shares, [])) == items  # interleaved: short and long mixed


def test_cpu_numerics_flushes_denormals():
    tiny = torch.tensor([1e-39])  # a float32 denormal
    try:
        distributed.cpu_numerics()
        assert float(tiny * 1.0) == 0.0
    finally:
        torch.set_flush_denormal(True)  # as conftest sets it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _eval_worker(rank: int, world: int, port: int, model_dir: str, out: str) -> None:
    import torch.distributed as dist

    from mc_retrofit.eval import EvalOptions, evaluate

    distributed.cpu_numerics()
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    res = evaluate(EvalOptions(model=model_dir, recipe=RECIPE, device="cpu", progress=False))
    assert not dist.is_initialized()  # evaluate made the group, so it tore it down
    torch.save(res["records"], f"{out}/records{rank}.pt")


def test_two_processes_merge_to_the_records_of_one(tmp_path, monkeypatch):
    from mc_retrofit.eval import EvalOptions, evaluate

    tiny_model("mamba2", vocab_size=64, chunk_size=8).save_pretrained(tmp_path / "m")
    mp.spawn(_eval_worker, args=(2, _free_port(), str(tmp_path / "m"), str(tmp_path)), nprocs=2)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    one = evaluate(EvalOptions(model=str(tmp_path / "m"), recipe=RECIPE, device="cpu", progress=False))["records"]
    # every sample is scored, also where a batch of 3 straddles two lengths (it once skipped some)
    assert sorted((r["variant"], r["length"], r["sample"]) for r in one) == \
        sorted((v, L, i) for v in ("base", "ssc1") for L in (24, 40) for i in range(5))
    for rank in range(2):  # every process holds every record, in the single process's order
        two = torch.load(tmp_path / f"records{rank}.pt")
        assert [(r["variant"], r["length"], r["sample"]) for r in two] == \
            [(r["variant"], r["length"], r["sample"]) for r in one]
        for a, b in zip(two, one):
            assert a["correct"] == pytest.approx(b["correct"], abs=1e-6)
            assert a["answer_nll"] == pytest.approx(b["answer_nll"], rel=1e-5)

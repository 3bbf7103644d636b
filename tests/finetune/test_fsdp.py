"""Gate-only fine-tuning with the frozen base sharded (``--shard fsdp``, FSDP2 over gloo on
CPU): 2 processes train the same gates as 1 process with the same global batch, each rank
holds only its shard of every base weight, resume is exact, and the written directory
loads with base weights bit-identical to the source checkpoint."""
from __future__ import annotations


import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

import mc_retrofit as mr
from mc_retrofit.distributed import check_shard
from mc_retrofit.finetune import finetune
from mc_retrofit.model import gate_state_dict

from conftest import tiny_model
from finetune.test_finetune_dist import TEXT, _free_port, in_gloo_group, torchrun_and_one_process

# TBPTT (chunks accumulate the gate gradients; one all-reduce per step) and state passing
# (the checkpoint gathers every rank's carried cache; resuming builds it with a forward of
# the sharded model) both on.
KW = dict(steps=2, seq_len=32, batch=4, warmup=1, lr=5e-2, eval_every=0, seed=3, tbptt=16, state_passing=0.5,
          progress=False, log=lambda s: None)
MC = mr.MCConfig(segment_size=8, cache_weight=0.5, gate_source="learned")


def _converted(source):
    return mr.convert(mr.load_base(source), MC)


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    in_gloo_group(rank, world, port, _train, rank, tmp)


def _train(rank: int, tmp: str) -> None:
    from torch.distributed.tensor import DTensor

    model = _converted(f"{tmp}/base")
    full = {n: p.numel() for n, p in model.named_parameters()}
    finetune(model, TEXT, out=f"{tmp}/fsdp", shard="fsdp", **KW)
    local = {}
    for n, p in model.named_parameters():
        if ".mc_gate." in f".{n}":
            assert not isinstance(p, DTensor), n  # the gates are replicated, plain tensors
        else:
            assert isinstance(p, DTensor), n
            local[n] = p.to_local().numel()
    torch.save({"local": local, "full": full, "gates": gate_state_dict(model)}, f"{tmp}/rank{rank}.pt")
    finetune(_converted(f"{tmp}/base"), TEXT, out=f"{tmp}/staged", shard="fsdp", stop_at=1, **KW)
    finetune(_converted(f"{tmp}/base"), TEXT, out=f"{tmp}/staged", shard="fsdp", resume=True, **KW)


def test_sharded_base_trains_the_gates_of_one_process(tmp_path):
    # Mamba: its head is tied to the embeddings, and it names both its block and the block's
    # mixer as layers (one group per block)
    base = tiny_model("mamba", vocab_size=256)
    assert base.lm_head.weight is base.backbone.embeddings.weight
    base.save_pretrained(tmp_path / "base")
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    single = _converted(tmp_path / "base")
    finetune(single, TEXT, **KW)
    want, init = gate_state_dict(single), gate_state_dict(_converted(tmp_path / "base"))
    assert any((want[k] - init[k]).abs().max() > 1e-2 for k in want)  # it did train
    fsdp = gate_state_dict(mr.load(tmp_path / "fsdp"))  # written by rank 0
    for k in want:  # the all-reduce sums in another order than one process: rounding only
        torch.testing.assert_close(fsdp[k], want[k], rtol=0, atol=1e-6)
    resumed = gate_state_dict(mr.load(tmp_path / "staged"))
    assert all(torch.equal(resumed[k], fsdp[k]) for k in fsdp)  # resume under FSDP is exact
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    full = ranks[0]["full"]
    for held in ranks:
        assert all(torch.equal(held["gates"][k], fsdp[k]) for k in fsdp)  # every rank holds the same gates
        assert set(held["local"]) | set(held["gates"]) == set(full)  # every base weight is sharded
        assert all(numel < full[n] for n, numel in held["local"].items())  # a rank holds a part of each
    for n in ranks[0]["local"]:  # and the ranks' parts partition it
        assert sum(held["local"][n] for held in ranks) == full[n], n
    source = load_file(tmp_path / "base" / "model.safetensors")
    written = load_file(tmp_path / "fsdp" / "model.safetensors")
    assert set(written) == set(source)  # the tied head is not written as a weight of its own
    assert all(torch.equal(written[k], source[k]) and written[k].dtype == source[k].dtype for k in source)


def test_one_process_refuses_fsdp(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(mr.MCError, match="with one process drop it, or launch with torchrun") as e:
        check_shard("fsdp")
    assert "\n" not in str(e.value)
    with pytest.raises(mr.MCError, match="--shard 'zero3' is not known"):
        check_shard("zero3")
    tiny_model("mamba2", vocab_size=256).save_pretrained(tmp_path / "base")
    model = _converted(tmp_path / "base")
    before = gate_state_dict(model)
    with pytest.raises(mr.MCError, match="with one process"):
        finetune(model, TEXT, out=tmp_path / "out", shard="fsdp", **KW)
    assert not (tmp_path / "out").exists() and all(torch.equal(v, before[k]) for k, v in gate_state_dict(model).items())


def test_cli_refuses_fsdp_in_one_process_before_loading(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from mc_retrofit.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    (tmp_path / "train.txt").write_bytes(TEXT)
    r = CliRunner().invoke(main, ["finetune", str(tmp_path / "no-such-model"), "--data", str(tmp_path / "train.txt"),
                                  "--out", str(tmp_path / "o"), "--shard", "fsdp"])
    assert r.exit_code != 0 and "with one process drop it" in r.output, r.output
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_torchrun_cli_shards_and_matches_one_process(tmp_path):
    """The documented entry point: ``torchrun --nproc-per-node 2 -m mc_retrofit finetune ... --shard fsdp``."""
    two, one = torchrun_and_one_process(tmp_path, ["--shard", "fsdp"])
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-6)
    source, written = (load_file(tmp_path / d / "model.safetensors") for d in ("base", "two"))
    assert set(written) == set(source) and all(torch.equal(written[k], source[k]) for k in source)

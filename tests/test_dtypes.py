"""Low-precision models: the weights in bfloat16/float16, Memory Caching's state and gate math in float32.

Oracles: the low-precision base model itself (MC off must be it exactly), the same model
in float32 (MC on must match it to low-precision tolerance), and the fp32 read-out cast
down once (the read-out of low-precision inputs must equal it bit for bit: all its
math is fp32, only the final add is cast).
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner

import mc_retrofit
from conftest import tiny_model
from fla_oracles import tiny_fla_model
from mc_retrofit import MCConfig
from mc_retrofit.core import ReadInputs, gate_weights, readout_reference
from mc_retrofit.errors import MCError
from mc_retrofit.generation import _holder
from mc_retrofit.model import gate_modules

LOW = [torch.bfloat16, torch.float16]  # float16 runs on CPU in torch 2.13 for every family tested here


def _model(family):
    return tiny_fla_model(family) if family in ("gla", "delta_net") else tiny_model(family)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("family", ["mamba2", "rwkv4", "gla"])
def test_mc_off_is_the_low_precision_base_exactly(family, dtype):
    base = _model(family).to(dtype)
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(0))
    want = _logits(base, ids)
    off = mc_retrofit.convert(copy.deepcopy(base), MCConfig(segment_size=8, cache_weight=0.0))
    assert torch.equal(_logits(off, ids), want)
    # cache weight on, but the call is shorter than one segment: nothing cached is read
    short = mc_retrofit.convert(copy.deepcopy(base), MCConfig(segment_size=64, cache_weight=0.7))
    assert torch.equal(_logits(short, ids), want)
    assert {g.cache_weight.dtype for g in gate_modules(short).values()} == {torch.float32}


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("family", ["rwkv4", "gla", "delta_net"])
def test_mc_on_matches_float32_within_low_precision_tolerance(family, dtype):
    """Tolerance: twice the base model's own low-precision error on the same input (the
    largest |logit| difference between the model in ``dtype`` and in float32, about 0.02-0.05
    in bf16 and 0.003-0.007 in fp16 for these O(1) logits). MC must add no more error than
    the backbone's rounding does by itself; the MC effect is far larger than the tolerance,
    so a read that went missing or wrong in low precision fails."""
    m32 = _model(family)
    ids = torch.randint(0, 64, (2, 64), generator=torch.Generator().manual_seed(1))
    cfg = MCConfig(segment_size=8, cache_weight=0.5)
    base_err = (_logits(copy.deepcopy(m32).to(dtype), ids) - _logits(m32, ids)).abs().max().item()
    tol = 2 * base_err
    y32 = _logits(mc_retrofit.convert(copy.deepcopy(m32), cfg), ids)
    low = mc_retrofit.convert(copy.deepcopy(m32).to(dtype), cfg)
    err = (_logits(low, ids) - y32).abs().max().item()
    effect = (y32 - _logits(m32, ids)).abs().max().item()
    assert err <= tol, (err, tol)
    assert effect > 4 * tol, (effect, tol)


@pytest.mark.parametrize("family", ["mamba2", "rwkv4", "gla"])
def test_cached_states_and_summaries_are_float32(family):
    model = mc_retrofit.convert(_model(family).to(torch.bfloat16), MCConfig(segment_size=8, cache_weight=0.5))
    ids = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(ids, use_cache=True)
    store = _holder(out)._mc_memory
    assert store and all(mem.n == 5 for mem in store.values())
    for mem in store.values():
        assert mem.states.dtype == mem.pooled.dtype == mem.key_sum.dtype == torch.float32


def test_gates_stay_float32_when_the_converted_model_is_cast():
    model = mc_retrofit.convert(tiny_model("mamba2"), MCConfig(gate_source="lowrank", gate_rank=4))
    model.to(torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert {p.dtype for n, p in model.named_parameters() if ".mc_gate." in n} == {torch.float32}
    model.half()
    assert {p.dtype for n, p in model.named_parameters() if ".mc_gate." in n} == {torch.float32}
    # the lowrank gate input (the query plus x A B) is fp32 although the query is not
    gate = next(iter(gate_modules(model).values()))
    q = torch.randn(1, 3, gate.num_heads, gate.key_dim).half()
    assert gate.gate_input(q, torch.randn(1, 3, 32).half()).dtype == torch.float32


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("aggregation", ["gated", "ssc", "residual"])
def test_readout_of_low_precision_inputs_is_the_fp32_readout_cast_once(dtype, aggregation):
    g = torch.Generator().manual_seed(3)
    B, T, N, H, K, V = 2, 6, 3, 2, 4, 5
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    q, online, u, op = r(B, T, H, K).to(dtype), r(B, T, H, V).to(dtype), r(B, T, H, K).to(dtype), r(B, T, H, K)
    states, pooled = r(B, N, H, K, V), r(B, N, H, K)  # as the memory holds them: fp32
    nv = torch.tensor([0, 1, 1, 2, 3, 3])
    args = dict(states=states, pooled=pooled, online_pool=op, n_visible=nv, aggregation=aggregation, top_k=2,
                scale=0.5, gate_scale=torch.full((H,), 0.7), mix=torch.tensor([0.3, 0.9]))
    got = readout_reference(ReadInputs(q=q, online=online, u=u, **args))
    want = readout_reference(ReadInputs(q=q.float(), online=online.float(), u=u.float(), **args)).to(dtype)
    assert got.dtype == dtype and torch.equal(got, want)
    w = gate_weights(u, pooled, op, nv, aggregation, 2, torch.full((H,), 0.7))
    assert w.dtype == torch.float32


def test_load_in_a_dtype_keeps_the_gates_float32(tmp_path):
    base = tiny_model("mamba2")
    base.save_pretrained(tmp_path / "ckpt")
    conv = mc_retrofit.convert(mc_retrofit.load_base(tmp_path / "ckpt"), MCConfig(segment_size=8, cache_weight=0.5))
    mc_retrofit.save(conv, tmp_path / "conv")
    mc_retrofit.export(conv, tmp_path / "m.safetensors")
    for path in (tmp_path / "conv", tmp_path / "m.safetensors"):
        model = mc_retrofit.load(path, dtype=torch.bfloat16)
        dtypes = {n: p.dtype for n, p in model.named_parameters()}
        assert {d for n, d in dtypes.items() if ".mc_gate." in n} == {torch.float32}
        assert {d for n, d in dtypes.items() if ".mc_gate." not in n} == {torch.bfloat16}
        assert all(float(g.cache_weight.detach()[0]) == 0.5 for g in gate_modules(model).values())


def test_dtype_checks_before_loading(monkeypatch):
    from mc_retrofit.devices import check_placement

    check_placement("cpu", "float16")  # runs on CPU (see LOW)
    check_placement(None, "bfloat16")
    with pytest.raises(MCError, match="dtype must be one of"):
        check_placement("cpu", "int8")
    # a GPU without native bfloat16 (compute capability < 8.0), faked
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (8, 6) if i == 0 else (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Tesla T4")
    check_placement("cuda:0", "bfloat16")
    check_placement("cuda:1", "float16")
    with pytest.raises(MCError, match=r"cuda:1 \(Tesla T4\) has no native bfloat16"):
        check_placement("cuda:1", "bfloat16")
    with pytest.raises(MCError, match="cuda:1"):  # a device map may use every GPU
        check_placement(None, "bfloat16", "auto")
    check_placement("cpu", "bfloat16")
    # the Python API without a device loads on the CPU: nothing to refuse there
    from mc_retrofit.model import _check_placement

    _check_placement(None, torch.bfloat16, None)
    with pytest.raises(MCError, match="no native bfloat16"):
        _check_placement(None, torch.bfloat16, "auto")


def _tiny_byte_checkpoint(path):
    tiny_model("mamba2", vocab_size=256, chunk_size=32).save_pretrained(path)
    return path


def test_cli_eval_smoke_in_bfloat16(tmp_path):
    dtype = "bfloat16"  # float16 takes the same path (the model-level tests above cover it)
    from conftest import shared_path

    shared_path("data", "gutenberg", "austen-emma.txt")
    from mc_retrofit.cli import main

    ckpt = _tiny_byte_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["eval", str(ckpt), "--recipe", "smoke", "--only", "perplexity", "--dtype", dtype,
                                    "--device", "cpu", "--quiet", "--no-plots", "--out", str(out)])
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    assert results["dtype"] == dtype
    bpt = results["perplexity"]["by_length"]
    assert set(bpt) == {"base", "mc-gated-128"}
    assert all(0 < v[str(L)]["bits_per_token"] < 9 for v in bpt.values() for L in (128, 512))

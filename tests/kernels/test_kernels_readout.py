"""Triton read-out kernels (forward, backward, decode) against core.readout_reference.

Without a GPU the kernels run under Triton's interpreter, which must be on before triton
is first imported: in a normal pytest run this module is one test that re-runs the file
in a subprocess with TRITON_INTERPRET=1 (see mc_retrofit.kernels.testing). With a CUDA
GPU the same tests run on the device (marked ``gpu``), with exact fp32 dots.
"""
from __future__ import annotations

import os

import pytest
import torch

from mc_retrofit.kernels.testing import interpreter_active, run_under_interpreter

INTERP = interpreter_active()
CUDA = torch.cuda.is_available()

if not INTERP and not CUDA:

    def test_kernels_readout_under_interpreter():
        run_under_interpreter(__file__)

else:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from mc_retrofit.core import ReadInputs, readout_reference
    from mc_retrofit.errors import MCError
    from mc_retrofit.kernels import readout
    from mc_retrofit.kernels import readout_op
    from mc_retrofit.kernels.readout_op import readout_triton

    DEVICE = "cpu" if INTERP else "cuda"
    if DEVICE == "cuda":
        pytestmark = pytest.mark.gpu
        os.environ.setdefault("MC_RETROFIT_DOT_PRECISION", "ieee")  # exact fp32 dots vs the fp32 reference

    AGGS = ["residual", "gated", "ssc"]
    LAYOUTS = ["kv", "vk"]
    NAMES = ["q", "states", "online", "u", "pooled", "online_pool", "gate_scale", "mix", "online_bias"]

    def make(B=2, T=20, H=2, K=8, V=12, U=8, N=3, seg=6, layout="kv", seed=0, dtype=torch.float32,
             state_dtype=torch.float32, Hq=None):
        """Random inputs; token t sees the segments completed before its own (segment
        size ``seg``), so the last segment is ragged when seg does not divide T."""
        g = torch.Generator().manual_seed(seed)
        r = lambda *s, dt=torch.float32: torch.randn(*s, generator=g).to(dt)  # noqa: E731
        Hq = Hq or H
        shape_s = (B, N, H, K, V) if layout == "kv" else (B, N, H, V, K)
        x = dict(
            q=r(B, T, Hq, K, dt=dtype), states=r(*shape_s, dt=state_dtype), online=r(B, T, H, V, dt=dtype),
            u=r(B, T, H, U, dt=dtype), pooled=r(B, N, H, U), online_pool=r(B, T, H, U),
            gate_scale=torch.rand(H, generator=g) + 0.3, mix=torch.rand(H, generator=g) * 0.5 + 0.6,
            online_bias=torch.randn(H, generator=g) * 0.5,  # per head, like the gate's parameter
        )
        x = {k: v.to(DEVICE) for k, v in x.items()}
        nv = torch.clamp(torch.arange(T) // seg, max=N).to(DEVICE)
        return x, nv

    def call(fn, x, nv, agg, layout, top_k=2, **extra):
        return fn(ReadInputs(x["q"], x["states"], x["online"], x["u"], x["pooled"], x["online_pool"], nv,
                             aggregation=agg, top_k=top_k, scale=0.37, gate_scale=x["gate_scale"], mix=x["mix"],
                             online_bias=x["online_bias"], layout=layout), **extra)

    def grads(fn, x, nv, agg, layout, top_k=2, **extra):
        xs = {k: v.detach().clone().requires_grad_() for k, v in x.items()}
        y = call(fn, xs, nv, agg, layout, top_k, **extra)
        w = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y.device)
        (y.float() * w).sum().backward()
        return y.detach(), {k: v.grad for k, v in xs.items()}

    def close(a, b, tol=2e-5):
        assert a.shape == b.shape, (a.shape, b.shape)
        torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)

    # ---- forward -------------------------------------------------------------------
    @pytest.mark.parametrize("layout", LAYOUTS)
    @pytest.mark.parametrize("agg", AGGS)
    def test_forward_matches_reference(agg, layout):
        x, nv = make(layout=layout)
        with torch.no_grad():
            close(call(readout_triton, x, nv, agg, layout), call(readout_reference, x, nv, agg, layout))

    @pytest.mark.parametrize("prefix", [False, True])
    def test_residual_direct_and_prefix_paths(prefix):
        x, nv = make(T=20, seg=4, N=4)  # several distinct n_visible per token block
        with torch.no_grad():
            y = call(readout_triton, x, nv, "residual", "kv", residual_prefix=prefix)
            close(y, call(readout_reference, x, nv, "residual", "kv"))

    @pytest.mark.parametrize("agg", AGGS)
    def test_one_cached_segment(agg):
        x, nv = make(N=1, T=10, seg=5, seed=3)
        with torch.no_grad():
            close(call(readout_triton, x, nv, agg, "kv", top_k=1), call(readout_reference, x, nv, agg, "kv", top_k=1))

    def test_no_cached_segment_returns_online_itself():
        x, nv = make(N=0)
        nv = torch.zeros_like(nv)
        assert call(readout_triton, x, nv, "gated", "kv") is x["online"]
        x["states"] = None
        assert call(readout, x, nv, "gated", "kv") is x["online"]

    @pytest.mark.parametrize("agg", AGGS)
    def test_nothing_visible_is_exactly_the_base_output(agg):
        x, nv = make()
        y = call(readout_triton, x, torch.zeros_like(nv), agg, "kv")
        assert torch.equal(y, x["online"])

    def test_mix_zero_is_exactly_the_base_output():
        x, nv = make()
        x["mix"] = torch.zeros_like(x["mix"])
        assert torch.equal(call(readout_triton, x, nv, "gated", "kv"), x["online"])

    @pytest.mark.parametrize("top_k", [1, 2, 3, 5])
    def test_ssc_top_k(top_k):
        x, nv = make(N=4, T=20, seg=4, seed=top_k)
        with torch.no_grad():
            close(call(readout_triton, x, nv, "ssc", "kv", top_k=top_k),
                  call(readout_reference, x, nv, "ssc", "kv", top_k=top_k))

    def test_ssc_differs_from_gated_when_k_is_smaller():
        # guards the test above against a selection that silently keeps everything
        x, nv = make(N=4, T=20, seg=4)
        with torch.no_grad():
            a = call(readout_triton, x, nv, "ssc", "kv", top_k=1)
            b = call(readout_triton, x, nv, "gated", "kv")
        assert (a - b).abs().max() > 1e-3

    @pytest.mark.parametrize("dtype,state_dtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                   (torch.float16, torch.float16)])
    def test_half_precision_inputs(dtype, state_dtype):
        x, nv = make(dtype=dtype, state_dtype=state_dtype, layout="vk")
        with torch.no_grad():
            y = call(readout_triton, x, nv, "gated", "vk")
            ref = call(readout_reference, x, nv, "gated", "vk")
        assert y.dtype == dtype
        close(y, ref, tol=2e-2)

    def test_head_groups_share_queries():
        x, nv = make(H=4, Hq=2)
        full = dict(x, q=x["q"].repeat_interleave(2, dim=2))
        y, g = grads(readout_triton, x, nv, "gated", "kv")
        ref, gr = grads(readout_reference, full, nv, "gated", "kv")
        close(y, ref)
        close(g["q"], gr["q"].view(*x["q"].shape[:2], 2, 2, -1).sum(3))
        close(g["states"], gr["states"])

    def test_bad_shapes_raise_one_line_errors():
        x, nv = make()
        with pytest.raises(MCError, match="layout"):
            call(readout_triton, x, nv, "gated", "vk")  # K != V: states do not fit the vk layout
        with pytest.raises(MCError, match="n_visible"):
            call(readout_triton, x, nv[:-1], "gated", "kv")

    @settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
    @given(B=st.integers(1, 2), T=st.integers(1, 20), H=st.integers(1, 2), K=st.sampled_from([4, 8, 16]),
           V=st.sampled_from([3, 8, 16]), N=st.integers(1, 3), seg=st.integers(1, 7),
           agg=st.sampled_from(AGGS), layout=st.sampled_from(LAYOUTS), top_k=st.integers(1, 3),
           seed=st.integers(0, 1000))
    def test_forward_property(B, T, H, K, V, N, seg, agg, layout, top_k, seed):
        x, nv = make(B=B, T=T, H=H, K=K, V=V, U=K, N=N, seg=seg, layout=layout, seed=seed)
        with torch.no_grad():
            close(call(readout_triton, x, nv, agg, layout, top_k, decode=False),
                  call(readout_reference, x, nv, agg, layout, top_k))

    # ---- backward ------------------------------------------------------------------
    @pytest.mark.parametrize("layout", LAYOUTS)
    @pytest.mark.parametrize("agg", AGGS)
    def test_backward_matches_reference(agg, layout):
        x, nv = make(layout=layout, seed=11)
        y, g = grads(readout_triton, x, nv, agg, layout)
        ref, gr = grads(readout_reference, x, nv, agg, layout)
        close(y, ref)
        for name in NAMES:
            if gr[name] is None:  # residual reads no gate input
                assert g[name] is None or not g[name].abs().any(), name
            else:
                close(g[name], gr[name], tol=5e-5)

    def test_backward_residual_prefix_path():
        x, nv = make(T=20, seg=4, N=4, seed=5)
        _, g = grads(readout_triton, x, nv, "residual", "kv", residual_prefix=True)
        _, gr = grads(readout_reference, x, nv, "residual", "kv")
        for name in ("q", "states", "online", "mix"):
            close(g[name], gr[name], tol=5e-5)

    def test_gate_only_finetuning_gradients_reach_the_gate_parameters():
        # what `finetune` trains: mix (cache_weight), log_temperature (inside gate_scale), online_bias, u's connector
        x, nv = make(seed=2)
        log_t = torch.zeros(2, device=DEVICE, requires_grad=True)
        W = torch.randn(8, 8, device=DEVICE, requires_grad=True)
        mix = torch.full((2,), 0.5, device=DEVICE, requires_grad=True)
        bias = torch.tensor([0.3, -0.2], device=DEVICE, requires_grad=True)
        outs = []
        for fn in (readout_triton, readout_reference):
            u = x["u"] @ W
            y = fn(ReadInputs(x["q"], x["states"], x["online"], u, x["pooled"], x["online_pool"], nv,
                              aggregation="gated", top_k=2, scale=0.37, gate_scale=1.0 / (8 ** 0.5 * log_t.exp()),
                              mix=mix, online_bias=bias, layout="kv"))
            outs.append(torch.autograd.grad(y.square().sum(), (log_t, W, mix, bias)))
        for a, b in zip(*outs):
            assert a.abs().sum() > 0
            close(a, b, tol=1e-4)

    # ---- the per-head online bias ----------------------------------------------------
    @pytest.mark.parametrize("decode", [False, True])
    @pytest.mark.parametrize("agg", ["gated", "ssc"])
    def test_float_online_bias_is_a_uniform_per_head_bias(agg, decode):
        # a float is expanded to [H]: bit for bit the result of a tensor holding it per head
        x, nv = make(T=1, N=4, seed=8) if decode else make(seed=8)
        nv = torch.tensor([4], device=DEVICE) if decode else nv
        with torch.no_grad():
            flt = readout_triton(ReadInputs(x["q"], x["states"], x["online"], x["u"], x["pooled"], x["online_pool"],
                                            nv, aggregation=agg, top_k=2, scale=0.37, gate_scale=x["gate_scale"],
                                            mix=x["mix"], online_bias=0.7), decode=decode)
            x["online_bias"] = torch.full((2,), 0.7, device=DEVICE)
            ten = call(readout_triton, x, nv, agg, "kv", decode=decode)
            ref = call(readout_reference, x, nv, agg, "kv")
        assert torch.equal(flt, ten)
        close(ten, ref)

    @pytest.mark.parametrize("decode", [False, True])
    def test_large_online_bias_reads_the_online_memory_only(decode):
        # head 0's bias 30 puts e^-30-ish weight on every cached read: y = o + a (o - o) = o there;
        # head 1 (bias 0) still mixes the cached reads in
        x, nv = make(T=1, N=4, seed=9) if decode else make(seed=9)
        nv = torch.tensor([4], device=DEVICE) if decode else nv
        x["online_bias"] = torch.tensor([30.0, 0.0], device=DEVICE)
        x["gate_scale"] = torch.full((2,), 0.1, device=DEVICE)  # keeps every logit |l| << 30
        with torch.no_grad():
            y = call(readout_triton, x, nv, "gated", "kv", decode=decode)
        close(y[:, :, 0], x["online"][:, :, 0], tol=1e-6)
        assert (y[:, :, 1] - x["online"][:, :, 1]).abs().max() > 1e-2

    def test_online_bias_must_have_one_value_per_head():
        x, nv = make()
        x["online_bias"] = torch.zeros(3, device=DEVICE)
        with pytest.raises(MCError, match="online_bias"):
            call(readout_triton, x, nv, "gated", "kv")

    # ---- decode --------------------------------------------------------------------
    @pytest.mark.parametrize("layout", LAYOUTS)
    @pytest.mark.parametrize("agg", AGGS)
    @pytest.mark.parametrize("visible", [0, 1, 9])
    def test_decode_step(agg, layout, visible):
        x, _ = make(T=1, N=9, K=40, layout=layout, seed=visible)  # K=40: the matrix-vector read loops over K
        nv = torch.tensor([visible], device=DEVICE)
        with torch.no_grad():
            y = call(readout_triton, x, nv, agg, layout, top_k=3, decode=True)
            close(y, call(readout_reference, x, nv, agg, layout, top_k=3))

    @pytest.mark.parametrize("split", [1, 2, 4])
    def test_decode_splits(split):
        from mc_retrofit.kernels.decode import readout_decode

        x, _ = make(T=1, N=9, seed=4)
        nv = torch.tensor([9], device=DEVICE)
        y = readout_decode(x["q"], x["states"], x["online"], x["u"], x["pooled"], x["online_pool"], nv, agg=2,
                           top_k=3, scale=0.37, gate_scale=x["gate_scale"], mix=x["mix"], online_bias=x["online_bias"],
                           split=split)
        close(y, call(readout_reference, x, nv, "ssc", "kv", top_k=3))

    # ---- dispatch ------------------------------------------------------------------
    def test_dispatch(monkeypatch):
        x, nv = make()
        seen = []
        real = readout_op.readout_triton
        monkeypatch.setattr(readout_op, "readout_triton", lambda *a, **k: seen.append(1) or real(*a, **k))
        monkeypatch.setenv("MC_RETROFIT_FORCE_TRITON", "1")
        monkeypatch.setenv("MC_RETROFIT_FORCE_REFERENCE", "1")
        call(readout, x, nv, "gated", "kv")
        assert not seen  # forcing the reference wins
        monkeypatch.delenv("MC_RETROFIT_FORCE_REFERENCE")
        y = call(readout, x, nv, "gated", "kv")
        assert seen
        close(y, call(readout_reference, x, nv, "gated", "kv"))
        if DEVICE == "cpu":
            monkeypatch.delenv("MC_RETROFIT_FORCE_TRITON")
            seen.clear()
            call(readout, x, nv, "gated", "kv")
            assert not seen  # CPU tensors take the reference by default

    def test_model_end_to_end_through_the_kernel(monkeypatch):
        """A tiny Mamba2 with MC (vk layout, head groups expanded by the adapter): the
        runner's dispatch through the Triton kernel gives the reference's logits."""
        from conftest import tiny_model
        from mc_retrofit.config import MCConfig
        from mc_retrofit.model import convert

        model = convert(tiny_model("mamba2"), MCConfig(segment_size=4, aggregation="gated")).to(DEVICE)
        ids = torch.randint(0, 64, (1, 14), generator=torch.Generator().manual_seed(0)).to(DEVICE)
        with torch.no_grad():
            monkeypatch.setenv("MC_RETROFIT_FORCE_REFERENCE", "1")
            ref = model(ids).logits
            monkeypatch.delenv("MC_RETROFIT_FORCE_REFERENCE")
            monkeypatch.setenv("MC_RETROFIT_FORCE_TRITON", "1")
            out = model(ids).logits
        close(out, ref, tol=1e-4)

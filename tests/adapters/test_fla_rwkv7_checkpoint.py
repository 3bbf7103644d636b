"""The real fla RWKV-7 checkpoint: convert / inspect / export through the CLI, load
the export, and reproduce rwkv.cpp's reference logits (no cache read: 3 tokens)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("fla")
pytestmark = pytest.mark.filterwarnings("ignore:According to Bo", "ignore:Triton is not supported")

from conftest import shared_path  # noqa: E402


def test_rwkv7_checkpoint_cli_round_trip_reproduces_rwkv_cpp(tmp_path):
    from click.testing import CliRunner

    import mc_retrofit as mc
    from mc_retrofit.cli import main

    ckpt = shared_path("checkpoints", "rwkv7-tiny-834K-fla")
    want = torch.from_numpy(np.fromfile(ckpt / "expected-logits-after-bytes-22-69-6e.f32", dtype=np.float32))
    assert want.shape == (256,)
    runner = CliRunner()
    r = runner.invoke(main, ["convert", str(ckpt), "--out", str(tmp_path / "conv"), "--segment-size", "2"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["inspect", str(tmp_path / "conv"), "--json"])
    assert r.exit_code == 0 and '"family": "rwkv7"' in r.output
    r = runner.invoke(main, ["export", str(tmp_path / "conv"), "--out", str(tmp_path / "m.safetensors")])
    assert r.exit_code == 0, r.output

    ids = torch.tensor([[0x22, 0x69, 0x6E]])
    for src in (tmp_path / "conv", tmp_path / "m.safetensors"):
        model = mc.load(src)
        model.mc.config.segment_size = 64  # one open segment: nothing cached is read
        with torch.no_grad():
            got = model(ids).logits[0, -1]
        assert (got - want).abs().max() <= 1e-5
    # with segment size 2 the third token reads one cached segment: the logits move
    model = mc.load(tmp_path / "conv")
    with torch.no_grad():
        assert (model(ids).logits[0, -1] - want).abs().max() > 1e-4

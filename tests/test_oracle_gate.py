"""The oracle-gate study's read-out (recipes/studies/oracle_gate.py) against hand-computed mixes."""
from __future__ import annotations

import sys

import torch

from conftest import ROOT, random_read_inputs

sys.path.insert(0, str(ROOT / "recipes" / "studies"))
import oracle_gate  # noqa: E402


def _inputs(segment: int, layout: str = "kv"):
    return random_read_inputs(1, 3, 4, 2, 5, 6, layout=layout, n_visible=segment)  # B, T, N, H, K, V


def test_oracle_mixes_the_needles_cache_into_the_tokens_in_scope():
    for layout in ("kv", "vk"):
        x = _inputs(segment=3, layout=layout)
        S = x.states[:, 1] if layout == "kv" else x.states[:, 1].transpose(-1, -2)
        read = torch.stack([torch.stack([0.5 * x.q[0, t, h] @ S[0, h] for h in range(2)]) for t in range(3)])  # q^T S_j
        oracle_gate.ORACLE.update(j=1, w=0.25, scope="after", last=5)
        got = oracle_gate.oracle_readout(x)[0]
        assert torch.allclose(got, 0.75 * x.online[0] + 0.25 * read, atol=1e-6)
        oracle_gate.ORACLE.update(scope="last")  # segment 3 is not the prompt's last (5): untouched
        assert torch.equal(oracle_gate.oracle_readout(x), x.online)
        oracle_gate.ORACLE.update(scope="after", j=3)  # the needle's own segment does not read its cache
        assert torch.equal(oracle_gate.oracle_readout(x), x.online)
        oracle_gate.ORACLE.update(j=1, w=0.0)
        assert torch.equal(oracle_gate.oracle_readout(x), x.online)

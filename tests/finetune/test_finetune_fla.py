"""TBPTT and state passing through fla's cache, for every fla family on CPU."""
from __future__ import annotations

import pytest

pytest.importorskip("fla")
pytestmark = pytest.mark.filterwarnings("ignore:According to Bo", "ignore:Triton is not supported")

import mc_retrofit as mr  # noqa: E402

from fla_oracles import FAMILIES, tiny_fla_model  # noqa: E402
from test_finetune import check_tbptt_family  # noqa: E402


@pytest.mark.parametrize("family", FAMILIES)
def test_tbptt_and_state_passing_in_every_fla_family(family):
    model = mr.convert(tiny_fla_model(family), mr.MCConfig(segment_size=5, cache_weight=0.5, gate_source="learned"))
    check_tbptt_family(model, model.config.vocab_size)

"""Confidence intervals: Wilson against hand-computed values, the paired bootstrap against
the normal approximation it converges to, and the invariants both must keep."""
from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mc_retrofit.eval.stats import paired_bootstrap, wilson


@pytest.mark.parametrize("k,n,low,high", [
    (0, 10, 0.0, 0.2775),      # by hand: z=1.95996, centre 0.1389/1.3841, half 0.1920
    (5, 10, 0.2366, 0.7634),
    (10, 10, 0.7225, 1.0),
    (57, 60, 0.8626, 0.9829),
])
def test_wilson_matches_hand_computed_intervals(k, n, low, high):
    ci = wilson(k, n)
    assert ci.estimate == pytest.approx(k / n)
    assert ci.low == pytest.approx(low, abs=5e-4) and ci.high == pytest.approx(high, abs=5e-4)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 500), st.integers(0, 1000), st.sampled_from([0.8, 0.9, 0.95, 0.99]))
def test_wilson_is_a_proper_interval(n, permille, level):
    k = round(permille * n / 1000)  # integers: the suite flushes denormals, which hypothesis' floats refuse
    ci = wilson(k, n, level)
    assert 0.0 <= ci.low <= ci.estimate <= ci.high <= 1.0
    assert wilson(k, n, min(0.999, level + 0.005)).high >= ci.high - 1e-12  # wider at a higher level
    assert wilson(4 * k, 4 * n, level).high - wilson(4 * k, 4 * n, level).low <= ci.high - ci.low + 1e-12


def test_wilson_refuses_impossible_counts():
    with pytest.raises(ValueError):
        wilson(11, 10)
    assert (wilson(0, 0).low, wilson(0, 0).high) == (0.0, 1.0)


def test_paired_bootstrap_of_a_constant_difference_is_that_difference():
    a = [0.2, 0.9, 0.5, 0.1]
    ci = paired_bootstrap(a, [x + 0.25 for x in a])
    assert ci.estimate == pytest.approx(0.25) and ci.low == pytest.approx(0.25) and ci.high == pytest.approx(0.25)


def test_paired_bootstrap_approaches_the_normal_interval():
    rng = random.Random(1)
    a = [rng.gauss(2.0, 1.0) for _ in range(400)]
    b = [x + rng.gauss(0.1, 0.3) for x in a]  # shared item difficulty cancels in the pairs
    d = [y - x for x, y in zip(a, b)]
    mean = sum(d) / len(d)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1))
    half = 1.959964 * sd / math.sqrt(len(d))
    ci = paired_bootstrap(a, b, resamples=4000, seed=3)
    assert ci.estimate == pytest.approx(mean)
    assert ci.low == pytest.approx(mean - half, abs=0.25 * half)
    assert ci.high == pytest.approx(mean + half, abs=0.25 * half)
    assert ci.high - ci.low < 0.2  # far narrower than an unpaired interval (sd of a alone is 1.0)


def test_paired_bootstrap_needs_pairs():
    with pytest.raises(ValueError):
        paired_bootstrap([1.0], [1.0, 2.0])
    assert paired_bootstrap([1.0, 2.0], [1.0, 2.0], seed=0) == paired_bootstrap([1.0, 2.0], [1.0, 2.0], seed=0)


def test_eval_summaries_carry_the_intervals():
    from mc_retrofit.eval import perplexity, retrieval

    recs = [{"kind": "passkey", "variant": v, "length": 512, "depth": 0.5, "sample": i, "tokens": 512,
             "correct": int(i < k), "answer_nll": 1.0, "answer_tokens": 5} for v, k in (("base", 3), ("mc", 9))
            for i in range(10)]
    s = retrieval.summarise(recs, "passkey", ["base", "mc"])["by_length"]
    assert s["mc"]["512"]["ci95"] == pytest.approx([wilson(9, 10).low, wilson(9, 10).high])
    rng = random.Random(0)
    win = []
    for start in range(0, 4000, 100):
        nll = rng.uniform(1.0, 3.0)
        for v, shift in (("base", 0.0), ("mc", 0.05)):  # MC costs exactly 0.05 nats/token on every window
            win.append({"kind": "perplexity", "variant": v, "length": 256, "start": start, "nll_sum": (nll + shift) * 256,
                        "count": 256, "bucket": 256, "bucket_nll": [(nll + shift) * 256], "bucket_count": [256]})
    p = perplexity.summarise(win, ["base", "mc"])["by_length"]
    lo, hi = p["mc"]["256"]["delta_ci95"]
    assert lo == pytest.approx(0.05 / math.log(2)) and hi == pytest.approx(0.05 / math.log(2))  # paired: no spread
    assert "delta_ci95" not in p["base"]["256"]

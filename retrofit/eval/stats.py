"""Uncertainty for the numbers people compare: accuracies and paired differences.

- :func:`wilson` — the Wilson score interval of a proportion (k successes in n trials).
  It stays inside [0, 1] and is sensible at 0/n and n/n, where the normal approximation
  collapses to a zero-width interval (pass-key accuracies sit there often).
- :func:`paired_bootstrap` — a confidence interval for the mean difference between two
  systems scored on the *same* items (base vs MC on the same windows or prompts):
  resampling items keeps each pair together, so the shared difficulty of an item cancels.

Both are plain functions of numbers (no torch), deterministic for a given seed.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from statistics import NormalDist


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float
    n: int
    level: float = 0.95

    def to_dict(self) -> dict:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "n": self.n, "level": self.level}

    def __str__(self) -> str:
        return f"{self.estimate:.3f} [{self.low:.3f}, {self.high:.3f}]"


def _z(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must lie in (0, 1), not {level}")
    return NormalDist().inv_cdf(0.5 + level / 2.0)


def wilson(successes: float, n: int, level: float = 0.95) -> Interval:
    """Wilson score interval for ``successes / n``. ``successes`` may be fractional (a mean
    of per-item scores in [0, 1] times n, e.g. MQAR's share of keys recalled); n = 0 gives
    the uninformative [0, 1]."""
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return Interval(float("nan"), 0.0, 1.0, 0, level)
    z = _z(level)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # the interval always contains p; clamp so rounding cannot put it a hair outside (at 0/n, n/n)
    return Interval(p, min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half)), n, level)


def paired_bootstrap(a: list[float], b: list[float], *, level: float = 0.95, resamples: int = 2000,
                     seed: int = 0) -> Interval:
    """Percentile bootstrap interval of ``mean(b) - mean(a)`` over items scored by both
    systems (``a[i]`` and ``b[i]`` belong to item i)."""
    if len(a) != len(b):
        raise ValueError(f"paired scores need equal lengths, got {len(a)} and {len(b)}")
    n = len(a)
    if n == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0, level)
    _z(level)  # validates the level
    diffs = [y - x for x, y in zip(a, b)]
    estimate = sum(diffs) / n
    rng = random.Random(seed)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    lo_i = int(math.floor((1 - level) / 2 * (resamples - 1)))
    hi_i = int(math.ceil((1 + level) / 2 * (resamples - 1)))
    return Interval(estimate, means[lo_i], means[hi_i], n, level)

"""The report's statistics over seeds, tolerant of missing values: None, NaN and inf are left out.

- mean_std(values) -> Spread(mean, std, n): std is the sample std (n - 1), None for n < 2; mean is
  None for n = 0.
- paired(a, b) -> Delta of the per-seed differences a[s] - b[s] over the seeds both hold a finite
  value for: mean d̄, sample std s_d, n pairs, the 95 % Student-t interval d̄ ± t(0.975, n-1) s_d/√n
  (None for n < 2), and `seeds_needed`: the smallest n' >= 2 with t(0.975, n'-1) s_d/√n' < |d̄|, the
  number of seeds at which the interval would exclude 0 if d̄ and s_d stayed as observed (None
  when unknown: n < 2, or d̄ = 0; capped at SEEDS_CAP).
- median_range(values) -> (median, min, max, n) or None.
"""
from __future__ import annotations

import math
import statistics
from typing import NamedTuple

# t(0.975, df) for df = 1..30; beyond, the Cornish-Fisher expansion in 1/df (error < 1e-5 there)
T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604,
        2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555,
        2.0518, 2.0484, 2.0452, 2.0423)
Z975 = 1.959963985
SEEDS_CAP = 100  # 'at least 100': more seeds than any sweep here would buy


class Spread(NamedTuple):
    mean: float | None
    std: float | None
    n: int


class Delta(NamedTuple):
    mean: float
    std: float | None
    n: int
    lo: float | None
    hi: float | None
    seeds_needed: int | None

    @property
    def half(self) -> float | None:
        return None if self.lo is None else (self.hi - self.lo) / 2

    @property
    def contains_zero(self) -> bool:
        return self.lo is not None and self.lo <= 0 <= self.hi


def number(v) -> float | None:
    """v as a finite float, else None (None, NaN, inf, text, bool)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def finite(values) -> list[float]:
    return [x for x in (number(v) for v in values) if x is not None]


def t975(df: int) -> float:
    if df < 1:
        raise ValueError("t(0.975, df) needs df >= 1")
    if df <= len(T975):
        return T975[df - 1]
    z, v = Z975, df
    return (z + (z ** 3 + z) / (4 * v) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * v ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * v ** 3))


def mean_std(values) -> Spread:
    xs = finite(values)
    if not xs:
        return Spread(None, None, 0)
    return Spread(statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else None, len(xs))


def seeds_needed(mean: float, std: float) -> int | None:
    if mean == 0:
        return None
    for n in range(2, SEEDS_CAP + 1):
        if t975(n - 1) * std / math.sqrt(n) < abs(mean):
            return n
    return SEEDS_CAP


def paired(a: dict, b: dict, scale: float = 1.0) -> Delta | None:
    """Per-seed differences scale * (a[s] - b[s]) over the seeds with a finite value in both."""
    d = [scale * (x - y) for s in sorted(a) if s in b
         for x, y in [(number(a[s]), number(b[s]))] if x is not None and y is not None]
    if not d:
        return None
    mu = statistics.fmean(d)
    if len(d) < 2:
        return Delta(mu, None, 1, None, None, None)
    sd = statistics.stdev(d)
    half = t975(len(d) - 1) * sd / math.sqrt(len(d))
    return Delta(mu, sd, len(d), mu - half, mu + half, seeds_needed(mu, sd))


def median_range(values) -> tuple[float, float, float, int] | None:
    xs = finite(values)
    return (statistics.median(xs), min(xs), max(xs), len(xs)) if xs else None

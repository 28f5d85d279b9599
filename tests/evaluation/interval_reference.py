"""An independent NumPy implementation of the case-clustered Wilson interval (kelight.evaluation.intervals), from
the per-case value arrays themselves: residuals computed directly (not from expanded sums) and the Wilson
bounds as the roots of its defining quadratic (not from the closed form)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z = 1.96


def wilson_roots(p: float, n: float) -> tuple[float, float]:
    """The π with (p - π)² = z²·π(1 - π)/n: the Wilson score interval, as the roots of its quadratic."""
    shrink = Z * Z / n
    roots = np.sort(np.roots([1.0 + shrink, -(2.0 * p + shrink), p * p]).real)
    return max(float(roots[0]), 0.0), min(float(roots[1]), 1.0)


def effective_n(cases: Sequence[Sequence[float]]) -> float:
    """n_eff: Σn/deff · p(1-p)/σ², deff = max(1, V_clustered/V_independent); k where the variance is 0 or undefined."""
    cases = [np.asarray(c, dtype=float) for c in cases if len(c)]
    items = np.concatenate(cases)
    y, n = np.array([c.sum() for c in cases]), np.array([c.size for c in cases], dtype=float)
    k, total = len(cases), n.sum()
    p = y.sum() / total
    sigma2 = items.var()  # the prompts' own (population) variance
    if k < 2 or sigma2 <= 1e-9 * p * (1 - p):
        return float(k)
    v_clustered = k / (k - 1) * np.sum((y - p * n) ** 2) / total**2
    deff = max(1.0, v_clustered / (sigma2 / total))
    return total / deff * p * (1 - p) / sigma2


def reference_interval(cases: Sequence[Sequence[float]]) -> tuple[float, float]:
    """(low, high) of the pooled mean of the cases' values in [0, 1]."""
    items = np.concatenate([np.asarray(c, dtype=float) for c in cases if len(c)])
    return wilson_roots(float(items.mean()), effective_n(cases))


def reference_normal(values: Sequence[float]) -> float:
    """Half-width of the normal interval over cases with one value each: 1.96·s/sqrt(k), s the sample sd."""
    values = np.asarray(values, dtype=float)
    return Z * float(values.std(ddof=1)) / math.sqrt(values.size) if values.size > 1 else math.nan

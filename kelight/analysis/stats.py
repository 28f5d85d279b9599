"""Pearson correlation with its two-sided p-value (the statistic of the paper's Figure 4/Table 2)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def pearson(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Pearson's r of ``x`` and ``y`` and the two-sided p-value of H0: r = 0 (t-test, ``n - 2`` dof).

    Non-finite pairs are dropped. Returns ``(nan, nan)`` with fewer than 3 pairs or a constant
    input, where r is undefined or the test has no degrees of freedom.

    Example:
        >>> r, p = pearson([1, 2, 3, 4], [1, 3, 2, 5])
        >>> round(r, 4), round(p, 4)
        (0.8315, 0.1685)
    """
    from scipy import stats  # noqa: PLC0415 (pulls in a large library; only needed here)

    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"expected two 1-D sequences of the same length, got shapes {a.shape} and {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan, math.nan
    result = stats.pearsonr(a, b)
    return float(result.statistic), float(result.pvalue)

"""Statistics over cases: Pearson correlation (the paper's Figure 4/Table 2), pooled scores and the sums of
their case-clustered intervals, and paired case-bootstrap intervals (won-back shares, run differences)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from kelight.evaluation.intervals import CaseSums


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


def pooled(percents: np.ndarray, counts: np.ndarray) -> float | np.ndarray:
    """Pooled percentage of per-case percentages weighted by their prompt counts (``Σ p·n / Σ n``
    over the last axis), i.e. what ``metrics.json`` reports; ``nan`` where no case has a prompt.

    Example:
        >>> pooled(np.array([100.0, 0.0]), np.array([3, 1]))
        75.0
    """
    percents, counts = np.asarray(percents, dtype=float), np.asarray(counts, dtype=float)
    total = counts.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(total > 0, (percents * counts).sum(-1) / total, math.nan)
    return float(out) if out.ndim == 0 else out


def score_sums(percents: np.ndarray, counts: np.ndarray, mean_squares: np.ndarray | None = None) -> CaseSums:
    """The :class:`~kelight.evaluation.intervals.CaseSums` of one score from ``cases.jsonl`` columns, so that
    its case-clustered interval is recomputed from the rows alone: case ``i`` has ``y_i = percent_i/100 · n_i``.

    Args:
        percents: ``(C,)`` per-case scores in percent (the mean of the case's per-prompt values).
        counts: ``(C,)`` prompts behind each (``n_<score>``).
        mean_squares: ``(C,)`` per-case mean squares of the per-prompt values in percent (``<score>_sq``),
            for fractional values (token accuracies, F1); ``None`` for 0/1 values, whose square is themselves.

    Example:
        >>> score_sums(np.array([100.0, 0.0]), np.array([2, 1]))
        CaseSums(total=2.0, total_sq=2.0, n=3.0, case_sq=4.0, case_cross=4.0, case_n_sq=5.0, cases=2.0)
    """
    n = np.asarray(counts, dtype=float)
    y = np.asarray(percents, dtype=float) / 100.0 * n
    squares = y if mean_squares is None else np.asarray(mean_squares, dtype=float) / 100.0 * n
    return CaseSums(float(y.sum()), float(squares.sum()), float(n.sum()), float((y * y).sum()),
                    float((y * n).sum()), float((n * n).sum()), float((n > 0).sum()))


def damage_won_back(none: float | np.ndarray, without: float | np.ndarray,
                    with_: float | np.ndarray) -> float | np.ndarray:
    """``(with − without) / (none − without)``: the share of the damage ``without`` did (relative to
    the unedited ``none``) that ``with_`` wins back; ``nan`` where there was no damage. Element-wise.

    Example:
        >>> damage_won_back(80.0, 20.0, 35.0)
        0.25
    """
    damage = np.asarray(none, dtype=float) - without
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(np.abs(damage) > 1e-9, (np.asarray(with_, dtype=float) - without) / damage, math.nan)
    return float(out) if out.ndim == 0 else out


def won_back_interval(
    percents: np.ndarray, counts: np.ndarray, n_resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """The pooled share of damage won back and its paired case-bootstrap percentile interval.

    Args:
        percents: ``(3, C)`` per-case percentages of one score for the same ``C`` cases, rows
            unedited / editor / editor + objective (``nan`` where a case has no such prompt).
        counts: ``(C,)`` prompts of that score per case (the weights of the pooled mean).
        n_resamples: bootstrap resamples of the cases (the same cases for all three rows).
        seed: seed of the resampling.
        level: coverage of the interval.

    Returns:
        ``(share, low, high)``; resamples without damage are dropped from the interval.

    Example:
        >>> p = np.array([[100.0, 100.0], [0.0, 50.0], [50.0, 50.0]])  # pooled: 100, 25, 50
        >>> round(won_back_interval(p, np.array([1, 1]))[0], 4)
        0.3333
    """
    return _paired_bootstrap(percents, counts, 3, lambda rows: damage_won_back(*rows), n_resamples, seed, level)


def paired_difference_interval(
    percents: np.ndarray, counts: np.ndarray, n_resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """Pooled ``B − A`` of one score of two runs on the same cases, with its paired case-bootstrap
    percentile interval (the same resampled cases in both runs).

    Args:
        percents: ``(2, C)`` per-case percentages, rows A and B (``nan`` where a case has no value).
        counts: ``(C,)`` prompts of that score per case (the weights of the pooled mean).
        n_resamples: bootstrap resamples of the cases.
        seed: seed of the resampling.
        level: coverage of the interval.

    Returns:
        ``(difference, low, high)`` in percentage points.

    Example:
        >>> p = np.array([[100.0, 0.0, 50.0], [100.0, 100.0, 50.0]])  # pooled: 50, 83.3
        >>> round(paired_difference_interval(p, np.array([1, 1, 1]))[0], 4)
        33.3333
    """
    return _paired_bootstrap(percents, counts, 2, lambda rows: rows[1] - rows[0], n_resamples, seed, level)


def _paired_bootstrap(percents: np.ndarray, counts: np.ndarray, n_rows: int, statistic, n_resamples: int,
                      seed: int, level: float) -> tuple[float, float, float]:
    """``statistic`` of the rows' pooled values over the cases every row has, and its percentile interval
    over resamples of those cases (the same cases for every row; non-finite resamples dropped)."""
    percents, counts = np.asarray(percents, dtype=float), np.asarray(counts, dtype=float)
    if percents.ndim != 2 or percents.shape[0] != n_rows or percents.shape[1] != counts.shape[0]:
        raise ValueError(f"expected percents ({n_rows}, C) and counts (C,), got {percents.shape} and {counts.shape}")
    has = np.isfinite(percents).all(0) & (counts > 0)
    p, n = percents[:, has], counts[has]
    value = statistic(pooled(p, n))
    if p.shape[1] == 0:
        return value, math.nan, math.nan
    idx = np.random.default_rng(seed).integers(0, p.shape[1], size=(n_resamples, p.shape[1]))  # (B, C) cases
    values = np.asarray(statistic(pooled(p[:, idx], n[idx])))  # (B,): rows pooled per resample
    values = values[np.isfinite(values)]
    if values.size == 0:
        return value, math.nan, math.nan
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(value), float(low), float(high)


def block_means(values: list[float], block: int) -> list[float]:
    """Mean of each run of ``block`` consecutive values (the last block may be shorter), over the finite
    values only (a case without the metric is skipped); ``nan`` for a block with none.

    Example:
        >>> block_means([1.0, 3.0, 5.0, math.nan, 9.0], 2)
        [2.0, 5.0, 9.0]
    """
    if block < 1:
        raise ValueError(f"expected block ≥ 1, got {block}")
    out = []
    for start in range(0, len(values), block):
        chunk = np.asarray(values[start : start + block], dtype=float)
        chunk = chunk[np.isfinite(chunk)]
        out.append(float(chunk.mean()) if chunk.size else math.nan)
    return out

"""95% intervals of pooled scores that treat the CASE as the unit: a case-clustered Wilson score interval.

A pooled score is ``p = Σ_i y_i / Σ_i n_i`` over cases ``i``, where case ``i`` has ``n_i`` prompts whose
per-prompt values (0/1 successes, or fractions in [0, 1] such as token accuracies) sum to ``y_i``. The
prompts of one case are not independent (one edit, one subject), so an interval that treats the
``N = Σ n_i`` prompts as independent is too narrow, and a Wald interval ``p ± 1.96·sqrt(p(1-p)/N)`` has zero
width at 0% and 100%. Here:

1. ``V_c``, the cluster-robust (ratio-estimator linearisation) variance of ``p`` with the usual small-sample
   factor: ``V_c = k/(k-1) · Σ_i (y_i - p·n_i)² / N²`` over the ``k`` cases that have prompts.
2. ``V_b = σ²/N``, the variance if the ``N`` prompts were independent, with ``σ²`` the prompts' own variance
   (``p(1-p)`` for 0/1 values), and the design effect ``deff = max(1, V_c / V_b)``: an interval is never
   narrower than independent prompts would give.
3. The Wilson score interval of ``p`` with the effective sample size ``n_eff = N/deff · p(1-p)/σ²``, the size
   at which Wilson's variance ``p(1-p)/n_eff`` equals ``deff·V_b``. For 0/1 values this is ``N/deff`` (Kish's
   effective sample size); for fractions ``p(1-p)/σ² ≥ 1`` counts how much less a fraction varies than a
   0/1 value of the same mean, without which Wilson's ``p(1-p)`` would overstate their spread (token
   accuracies of 2/3 and 1 are not coin flips).
4. Where the variance is zero or undefined (``p`` of 0 or 1, prompts that all have one value, a single
   case), ``n_eff = k``: each case counted once, the conservative end, so the interval keeps its width
   (``[0, z²/(k+z²)]`` at 0%).

References: Wilson (1927), JASA 22:209; Kish (1965), *Survey Sampling*, §8.2 (design effect); Korn and
Graubard (1998), *Survey Methodology* 24:193 (Wilson-type intervals with an effective sample size).

Every quantity comes from the sums of :class:`CaseSums`, so torchmetrics states reduced with ``sum`` give
the same interval under DDP as in one process, and ``cases.jsonl`` (each case's score and prompt count)
gives it again (:func:`kelight.runs.merge.metrics_from_rows`). Unbounded per-case values (fluency) get the
normal interval ``mean ± 1.96·sqrt(V_c)``, which with one value per case is the usual one over cases with
the sample (``k - 1``) variance; it is undefined (``nan``) for a single case.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

import torch

Z95 = 1.96  # two-sided 95% normal quantile
_ZERO_VARIANCE = 1e-9  # σ² below this share of p(1-p) is rounding, not spread


class CaseSums(NamedTuple):
    """Sums over cases of one score: its sufficient statistics, each a plain sum (so shards add up).

    Attributes:
        total: ``Σ y_i``, the cases' summed per-prompt values (successes, for 0/1 values).
        total_sq: ``Σ`` over all prompts of value² (equal to ``total`` for 0/1 values).
        n: ``N = Σ n_i``, the prompts.
        case_sq: ``Σ y_i²``.
        case_cross: ``Σ y_i·n_i``.
        case_n_sq: ``Σ n_i²``.
        cases: ``k``, the cases with at least one prompt.
    """

    total: float
    total_sq: float
    n: float
    case_sq: float
    case_cross: float
    case_n_sq: float
    cases: float

    def __add__(self, other: tuple) -> CaseSums:  # type: ignore[override]
        return CaseSums(*(a + b for a, b in zip(self, other, strict=True)))


def case_sums(values: torch.Tensor | Iterable[float]) -> CaseSums:
    """The sums one case adds, from its per-prompt values ``(n_i,)`` (all zero for a case without prompts).

    Example:
        >>> case_sums([1.0, 0.0, 1.0])
        CaseSums(total=2.0, total_sq=2.0, n=3.0, case_sq=4.0, case_cross=6.0, case_n_sq=9.0, cases=1.0)
    """
    values = torch.as_tensor(values, dtype=torch.float64).flatten()  # (n_i,)
    n, y = float(values.numel()), float(values.sum())
    return CaseSums(y, float(values.square().sum()), n, y * y, y * n, n * n, float(n > 0))


def sum_cases(cases: Iterable[CaseSums]) -> CaseSums:
    """The element-wise sum of several cases' (or shards') sums."""
    return sum(cases, CaseSums(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0))


def clustered_variance(s: CaseSums) -> float:
    """``V_c = k/(k-1) · Σ_i (y_i - p·n_i)² / N²``, the cluster-robust variance of ``p = Σy/N``, expanded into
    the sums as ``Σy_i² - 2p·Σy_i·n_i + p²·Σn_i²``; ``nan`` for fewer than two cases.

    Example:
        >>> clustered_variance(sum_cases([case_sums([1.0, 1.0]), case_sums([0.0, 0.0])]))  # 2·(1² + 1²)/16
        0.25
    """
    if s.cases < 2 or s.n <= 0:
        return math.nan
    p = s.total / s.n
    residual = s.case_sq - 2.0 * p * s.case_cross + p * p * s.case_n_sq
    return s.cases / (s.cases - 1.0) * max(residual, 0.0) / (s.n * s.n)


def effective_size(s: CaseSums) -> float:
    """``n_eff`` of the clustered Wilson interval (module docstring, steps 2-4); ``nan`` without prompts.

    Example:
        >>> pairs = sum_cases(case_sums([v, v]) for v in (1.0, 0.0, 1.0, 0.0))  # each case's prompts agree
        >>> round(effective_size(pairs), 6)  # deff = 2 · k/(k-1): N/deff = k - 1
        3.0
        >>> effective_size(sum_cases([case_sums([1.0]), case_sums([1.0, 1.0])]))  # 100%: one per case
        2.0
    """
    if s.n <= 0:
        return math.nan
    p = s.total / s.n
    spread = max(s.total_sq / s.n - p * p, 0.0)  # σ², the prompts' own variance
    binomial = p * (1.0 - p)
    if s.cases < 2 or spread <= _ZERO_VARIANCE * binomial:  # includes p = 0 and p = 1 (both sides 0)
        return float(s.cases)
    independent = spread / s.n  # V_b
    deff = max(1.0, clustered_variance(s) / independent)
    return binomial / (deff * independent)


def wilson_interval(p: float, n: float, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval ``(low, high)`` of a proportion ``p`` observed in ``n`` (possibly fractional)
    trials: ``(p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)``; ``(nan, nan)`` for ``n <= 0``.

    Raises:
        ValueError: if ``p`` is outside [0, 1].

    Example:
        >>> [round(x, 4) for x in wilson_interval(0.0, 10)]  # never zero width
        [0.0, 0.2775]
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"expected a proportion p in [0, 1], got {p}")
    if not n > 0:
        return math.nan, math.nan
    shrink = z * z / n
    center = (p + shrink / 2.0) / (1.0 + shrink)
    half = z / (1.0 + shrink) * math.sqrt(p * (1.0 - p) / n + shrink / (4.0 * n))
    return max(center - half, 0.0), min(center + half, 1.0)


def clustered_wilson_interval(s: CaseSums, z: float = Z95) -> tuple[float, float]:
    """The case-clustered 95% interval ``(low, high)`` of the pooled score ``Σy/N`` of values in [0, 1]:
    :func:`wilson_interval` at :func:`effective_size`. ``(nan, nan)`` without prompts.

    Raises:
        ValueError: if the pooled value is outside [0, 1] (values that are no fractions: use
            :func:`clustered_normal_interval`).

    Example:
        >>> [round(x, 4) for x in clustered_wilson_interval(sum_cases(case_sums([1.0]) for _ in range(32)))]
        [0.8928, 1.0]
    """
    if s.n <= 0:
        return math.nan, math.nan
    p = s.total / s.n
    if -1e-12 <= p <= 1.0 + 1e-12:
        p = min(max(p, 0.0), 1.0)  # rounding of sums of fractions
    return wilson_interval(p, effective_size(s), z)


def clustered_normal_interval(s: CaseSums, z: float = Z95) -> tuple[float, float]:
    """``mean ± z·sqrt(V_c)`` (:func:`clustered_variance`) for values that are not fractions (fluency);
    ``(nan, nan)`` for fewer than two cases, whose spread is unknown.

    Example:
        >>> clustered_normal_interval(sum_cases([case_sums([5.0]), case_sums([7.0])]))  # 6 ± 1.96·1
        (4.04, 7.96)
    """
    variance = clustered_variance(s)
    if math.isnan(variance):
        return math.nan, math.nan
    mean, half = s.total / s.n, z * math.sqrt(variance)
    return mean - half, mean + half


def percent_interval(name: str, low: float, high: float) -> dict[str, float]:
    """The report keys of a score's interval, in percent: ``<name>_lo``, ``<name>_hi`` and ``<name>_ci``, the
    half-width ``(high - low)/2`` (the Wilson interval is not symmetric about the score).

    Example:
        >>> {k: round(v, 2) for k, v in percent_interval("ES", 0.8928, 1.0).items()}
        {'ES_ci': 5.36, 'ES_lo': 89.28, 'ES_hi': 100.0}
    """
    return {f"{name}_ci": 100.0 * (high - low) / 2.0, f"{name}_lo": 100.0 * low, f"{name}_hi": 100.0 * high}

"""Pearson r and its p-value against closed forms of the t distribution."""

import math

import numpy as np
import pytest

from kelight.analysis.stats import pearson


def _t(r: float, n: int) -> float:
    return r * math.sqrt((n - 2) / (1 - r * r))


@pytest.mark.parametrize(("x", "y"), [([1.0, 2.0, 4.0], [1.0, 3.0, 2.0]), ([0.5, -1.0, 2.0], [2.0, 0.1, 3.5])])
def test_three_points_p_value_is_the_cauchy_tail(x, y):
    """n = 3: t has 1 dof (Cauchy), two-sided p = 1 − (2/π)·atan(|t|)."""
    r, p = pearson(x, y)
    assert r == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    assert p == pytest.approx(1 - 2 / math.pi * math.atan(abs(_t(r, 3))), abs=1e-10)


def test_four_points_p_value_has_two_dof_closed_form():
    """n = 4: t has 2 dof, two-sided p = 1 − |t| / sqrt(t² + 2)."""
    x, y = [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 5.0]
    r, p = pearson(x, y)
    t = _t(r, 4)
    assert r == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    assert p == pytest.approx(1 - abs(t) / math.sqrt(t * t + 2), abs=1e-10)


def test_undefined_cases_give_nan_and_non_finite_pairs_are_dropped():
    assert all(math.isnan(v) for v in pearson([1.0, 2.0], [3.0, 4.0]))  # no degrees of freedom
    assert all(math.isnan(v) for v in pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))  # constant input
    r, _ = pearson([1.0, 2.0, 3.0, float("nan"), 4.0], [1.0, 3.0, 2.0, 9.0, 5.0])
    assert r == pytest.approx(np.corrcoef([1, 2, 3, 4], [1, 3, 2, 5])[0, 1])
    with pytest.raises(ValueError, match="same length"):
        pearson([1.0, 2.0, 3.0], [1.0, 2.0])

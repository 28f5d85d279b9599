"""Pearson r and its p-value against closed forms of the t distribution; pooled scores and the
case-bootstrap interval of the share of damage won back."""

import doctest
import math

import numpy as np
import pytest

import kelight.evaluation.stats
from kelight.evaluation.stats import damage_won_back, pearson, pooled, won_back_interval


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


def test_pooled_weights_cases_by_prompts_and_won_back_share():
    assert pooled(np.array([100.0, 50.0, 0.0]), np.array([1, 2, 1])) == pytest.approx(50.0)
    assert math.isnan(pooled(np.array([100.0]), np.array([0])))
    assert damage_won_back(none=80.0, without=20.0, with_=50.0) == pytest.approx(0.5)
    assert damage_won_back(none=80.0, without=20.0, with_=10.0) == pytest.approx(-1 / 6)
    assert math.isnan(damage_won_back(50.0, 50.0, 60.0))  # no damage: share undefined


def test_won_back_interval_point_is_pooled_and_constant_cases_give_a_degenerate_interval():
    """Every case wins back exactly half of its damage: every resample does too."""
    p = np.array([[100.0, 80.0, 60.0], [0.0, 40.0, 20.0], [50.0, 60.0, 40.0]])
    share, low, high = won_back_interval(p, np.array([2, 1, 3]), n_resamples=200)
    assert share == pytest.approx(0.5) and low == pytest.approx(0.5) and high == pytest.approx(0.5)


def test_won_back_interval_matches_a_loop_reference_and_skips_cases_without_the_score():
    rng = np.random.default_rng(1)
    p = rng.uniform(0, 100, size=(3, 12))
    p[0] += 100.0  # unedited well above the editor: damage in every resample
    p[:, 3] = np.nan  # a case with no such prompt (e.g. no relation prompts)
    n = rng.integers(1, 5, size=12)
    share, low, high = won_back_interval(p, n, n_resamples=500, seed=3)
    keep = [c for c in range(12) if c != 3]
    q, m = p[:, keep], n[keep]
    rows = [(q[r] * m).sum() / m.sum() for r in range(3)]
    assert share == pytest.approx((rows[2] - rows[1]) / (rows[0] - rows[1]))
    idx = np.random.default_rng(3).integers(0, len(keep), size=(500, len(keep)))
    shares = []
    for sample in idx:  # the slow reference: one resample at a time
        pooled_rows = [(q[r, sample] * m[sample]).sum() / m[sample].sum() for r in range(3)]
        shares.append((pooled_rows[2] - pooled_rows[1]) / (pooled_rows[0] - pooled_rows[1]))
    assert (low, high) == pytest.approx(tuple(np.percentile(shares, [2.5, 97.5])))
    assert low < share < high


def test_won_back_interval_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"expected percents \(3, C\) and counts \(C,\)"):
        won_back_interval(np.zeros((2, 4)), np.ones(4))


def test_doctests():
    assert doctest.testmod(kelight.evaluation.stats, raise_on_error=True).failed == 0


def test_block_means_skip_missing_values_and_reject_bad_blocks():
    import math

    from kelight.evaluation.stats import block_means

    assert block_means([1.0, 2.0, 3.0, 4.0, 5.0], 2) == [1.5, 3.5, 5.0]  # the last block is shorter
    out = block_means([math.nan, math.nan, 4.0], 2)
    assert math.isnan(out[0]) and out[1] == 4.0  # a block with no value is nan, not 0
    with pytest.raises(ValueError, match="block"):
        block_means([1.0], 0)


def test_score_sums_from_rows_equal_the_sums_of_the_prompt_values():
    """cases.jsonl keeps a case's score (percent), its prompt count and, for fractions, their mean square: enough
    for every sum of the case-clustered interval."""
    from kelight.evaluation import intervals
    from kelight.evaluation.stats import score_sums

    cases = [[1.0, 0.0, 1.0], [0.5], [2 / 3, 1 / 3], [0.0, 0.0]]
    percents = np.array([100 * np.mean(c) for c in cases])
    squares = np.array([100 * np.mean(np.square(c)) for c in cases])
    counts = np.array([len(c) for c in cases])
    expected = intervals.sum_cases(intervals.case_sums(c) for c in cases)
    assert score_sums(percents, counts, squares) == pytest.approx(expected, abs=1e-12)
    zero_one = [[1.0, 0.0, 1.0], [0.0, 0.0]]
    assert score_sums(np.array([200 / 3, 0.0]), np.array([3, 2])) == pytest.approx(
        intervals.sum_cases(intervals.case_sums(c) for c in zero_one), abs=1e-12)

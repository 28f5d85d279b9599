"""Case-clustered intervals (kelight.evaluation.intervals) against an independent NumPy reference: never zero width,
wider when a case's prompts agree, the prompts' own spread for fractional values, exact over shards."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import torch

from kelight.evaluation import intervals
from kelight.evaluation.metrics import Fluency, PairwiseScore, TokenAccuracy, _MeanOfItems
from tests.evaluation.interval_reference import effective_n, reference_interval, reference_normal, wilson_roots


class Items(_MeanOfItems):
    """A metric of per-prompt values in [0, 1], as the wild scores are: one update per case."""

    def update(self, values: list[float]) -> None:
        self._add(torch.tensor(values, dtype=torch.float64))


def _interval(cases: list[list[float]]) -> tuple[float, float]:
    metric = Items()
    for values in cases:
        metric.update(values)
    out = metric.compute()
    assert float(out["ci"]) == pytest.approx((float(out["hi"]) - float(out["lo"])) / 2, abs=1e-15)
    return float(out["lo"]), float(out["hi"])


def _random_cases(seed: int, fractional: bool) -> list[list[float]]:
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(int(rng.integers(2, 30))):
        n, rate = int(rng.integers(0, 8)), rng.beta(1.0, 1.0)  # cases differ: clustering
        values = rng.integers(0, 4, size=n) / 3 if fractional else (rng.random(n) < rate).astype(float)
        cases.append(values.tolist())
    return cases if sum(map(len, cases)) else [[1.0], [0.0]]


@pytest.mark.parametrize("fractional", [False, True])
@pytest.mark.parametrize("seed", range(8))
def test_interval_equals_the_numpy_reference(seed: int, fractional: bool) -> None:
    cases = _random_cases(seed, fractional)
    assert _interval(cases) == pytest.approx(reference_interval(cases), abs=1e-9)
    sums = intervals.sum_cases(intervals.case_sums(c) for c in cases)
    assert intervals.effective_size(sums) == pytest.approx(effective_n(cases), rel=1e-9)


def test_pairwise_score_interval_equals_the_reference_on_its_successes() -> None:
    rng = np.random.default_rng(3)
    metric, cases = PairwiseScore(), []
    for n in (1, 4, 0, 3, 6, 2):
        right, wrong = torch.from_numpy(rng.gamma(2.0, 1.0, size=(2, n)))
        metric.update(right, wrong)
        cases.append((right < wrong).double().tolist())
    out = metric.compute()
    assert (float(out["lo"]), float(out["hi"])) == pytest.approx(reference_interval(cases), abs=1e-12)
    assert int(out["n"]) == 16 and float(metric.cases) == 5.0  # the case without prompts is no cluster


@pytest.mark.parametrize("value", [0.0, 1.0])
@pytest.mark.parametrize("sizes", [[1] * 32, [3, 1, 5, 2], [4]])
def test_never_zero_width_at_0_and_100_percent(value: float, sizes: list[int]) -> None:
    """All prompts agree: no spread to measure, so every case counts once (n_eff = k, also for one case)."""
    low, high = _interval([[value] * n for n in sizes])
    assert high - low > 0.05 and low <= value <= high
    assert (low, high) == pytest.approx(wilson_roots(value, len(sizes)), abs=1e-12)
    if value == 1.0 and sizes == [1] * 32:  # the demo's ES: 100% of 32 cases
        assert (round(100 * low, 1), round(100 * high, 1)) == (89.3, 100.0)


def test_perfectly_correlated_prompts_widen_the_interval() -> None:
    """20 cases of 5 prompts at 50%: where each case's prompts agree the cases carry the information (n_eff = k - 1
    with the small-sample factor k/(k-1)); where they are mixed the design effect is 1 (n_eff = N = 100)."""
    correlated = [[float(i % 2)] * 5 for i in range(20)]
    mixed = [[1.0, 0.0, 1.0, 0.0, 1.0] if i % 2 else [0.0, 1.0, 0.0, 1.0, 0.0] for i in range(20)]
    wide, narrow = _interval(correlated), _interval(mixed)
    assert wide == pytest.approx(wilson_roots(0.5, 19), abs=1e-12)
    assert narrow == pytest.approx(wilson_roots(0.5, 100), abs=1e-12)
    assert wide[1] - wide[0] > 2 * (narrow[1] - narrow[0])
    wald = 2 * 1.96 * math.sqrt(0.25 / 100)  # what independent prompts claim
    assert wide[1] - wide[0] > 2 * wald


def test_one_prompt_per_case_is_wilson_over_the_cases() -> None:
    """No clustering: n_eff = k - 1 (the k/(k-1) of the unbiased variance), Wilson otherwise."""
    cases = [[1.0]] * 30 + [[0.0]] * 10
    assert _interval(cases) == pytest.approx(wilson_roots(0.75, 39), abs=1e-12)


def test_fractional_values_keep_their_own_spread() -> None:
    """Token accuracies near 0.5 vary far less than coin flips: the interval is the normal one of their own
    variance, the larger of the clustered one and the independent prompts' (to Wilson's small shift), not
    p(1-p)'s, which would be over ten times too wide here."""
    rng = np.random.default_rng(0)
    cases = [rng.uniform(0.45, 0.55, size=int(rng.integers(1, 4))).tolist() for _ in range(200)]
    low, high = _interval(cases)
    sums = intervals.sum_cases(intervals.case_sums(c) for c in cases)
    items = np.concatenate(cases)
    variance = max(intervals.clustered_variance(sums), items.var() / items.size)  # deff >= 1
    assert (high - low) / 2 == pytest.approx(1.96 * math.sqrt(variance), rel=1e-3)
    coin_flips = wilson_roots(0.5, sums.n)  # what p(1-p) with N/deff would give at deff 1
    assert (coin_flips[1] - coin_flips[0]) / (high - low) > 8
    assert _interval([[0.5, 0.5], [0.5]]) == pytest.approx(wilson_roots(0.5, 2), abs=1e-12)  # no spread: k


def test_bounded_metric_refuses_values_outside_0_1() -> None:
    with pytest.raises(ValueError, match=r"expected Items items in \[0, 1\], got \[1.5\]; .*bounded = False"):
        Items().update([1.5])


def test_fluency_is_normal_over_cases_with_the_sample_variance() -> None:
    metric = Fluency()
    metric.update(["a b a b"])
    assert math.isnan(float(metric.compute()["ci"]))  # one case: spread unknown, not zero
    metric.update(["the cat sat on the mat"])
    metric.update(["a a a b"])
    per_case = [Fluency() for _ in range(3)]
    for m, texts in zip(per_case, (["a b a b"], ["the cat sat on the mat"], ["a a a b"]), strict=True):
        m.update(texts)
    means = [float(m.compute()["mean"]) for m in per_case]
    assert float(metric.compute()["ci"]) == pytest.approx(reference_normal(means), rel=1e-12)


def test_token_accuracy_interval_is_over_prompt_accuracies_clustered_by_case() -> None:
    t = torch.tensor
    metric = TokenAccuracy()
    metric.update([t([1, 2, 3]), t([4])], [t([1, 2, 0]), t([4])])  # case 0: 2/3 and 1
    metric.update([t([5, 6])], [t([0, 0])])  # case 1: 0
    out = metric.compute()
    assert (float(out["lo"]), float(out["hi"])) == pytest.approx(reference_interval([[2 / 3, 1.0], [0.0]]), abs=1e-12)


def test_shards_add_up_to_the_whole() -> None:
    """DDP: every state is a sum, so two ranks' merged states give the one-process interval exactly."""
    cases = _random_cases(5, fractional=True)
    whole, rank0, rank1 = Items(), Items(), Items()
    for i, values in enumerate(cases):
        whole.update(values)
        (rank0 if i % 2 else rank1).update(values)
    rank0.merge_state(rank1)
    assert {k: float(v) for k, v in rank0.compute().items()} == pytest.approx(
        {k: float(v) for k, v in whole.compute().items()}, rel=1e-12)


@pytest.mark.parametrize(("p", "n"), [(0.5, 100), (0.9, 400), (0.0, 10), (1.0, 3), (0.3, 2.5)])
def test_wilson_interval_equals_the_roots_of_its_quadratic(p: float, n: float) -> None:
    assert intervals.wilson_interval(p, n) == pytest.approx(wilson_roots(p, n), abs=1e-12)


def test_wilson_interval_values_and_edges() -> None:
    assert intervals.wilson_interval(0.5, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)  # hand-computed
    assert intervals.wilson_interval(0.0, 10) == pytest.approx((0.0, 1.96**2 / (10 + 1.96**2)), abs=1e-12)
    assert all(math.isnan(x) for x in intervals.wilson_interval(0.5, 0))
    assert all(math.isnan(x) for x in intervals.clustered_wilson_interval(intervals.sum_cases([])))
    with pytest.raises(ValueError, match=r"expected a proportion p in \[0, 1\], got 1.5"):
        intervals.wilson_interval(1.5, 10)
    with pytest.raises(ValueError, match="expected a proportion"):
        intervals.clustered_wilson_interval(intervals.case_sums([2.0, 3.0]))


def test_doctests() -> None:
    assert doctest.testmod(intervals, raise_on_error=True).failed == 0

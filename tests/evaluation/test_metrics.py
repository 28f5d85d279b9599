"""torchmetrics classes and EditMetrics against an independent NumPy reference."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import torch
from torchmetrics import Metric

import kelight.evaluation.metrics
from kelight.evaluation.metrics import EditMetrics, Fluency, PairwiseScore, Perplexity, TokenAccuracy
from kelight.evaluation.scoring import CaseResult
from kelight.types import PROBE_GROUPS
from tests.evaluation.interval_reference import reference_interval, reference_normal

METRIC_CLASSES = [PairwiseScore, TokenAccuracy, Fluency, Perplexity]


def _random_cases(seed: int, n_cases: int = 7) -> list[CaseResult]:
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n_cases):
        scores = {}
        for group in ("rewrite", "paraphrase", "neighbor", "distracted_neighbor"):
            n = int(rng.integers(0, 6)) if group != "rewrite" else 1
            right, wrong = rng.gamma(2.0, 1.0, size=(2, n)).astype(np.float32)
            scores[group] = (torch.from_numpy(right), torch.from_numpy(wrong))
        tokens = {}
        for group in ("efficacy", "locality"):
            lengths = rng.integers(1, 5, size=int(rng.integers(1, 4)))
            preds = [torch.from_numpy(rng.integers(0, 3, size=t)) for t in lengths]
            refs = [torch.from_numpy(rng.integers(0, 3, size=t)) for t in lengths]
            tokens[group] = (preds, refs)
        texts = ("a b a b c", "the cat sat on the mat") if i % 2 else ()
        ppl = (float(rng.uniform(10, 50)), int(rng.integers(5, 20)))
        cases.append(CaseResult(i, scores, tokens, texts, ppl))
    return cases


def _entropy(text: str) -> float:
    # Independent n-gram entropy: whitespace words (the test texts have no punctuation).
    words, out = text.split(), []
    for n, w in ((2, 2 / 3), (3, 4 / 3)):
        grams = [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]
        _, counts = np.unique(np.array(grams, dtype=str), return_counts=True)
        p = counts / max(counts.sum(), 1)
        out.append(w * float(-(p * np.log2(p)).sum()))
    return float(np.mean(out))


def _interval_keys(name: str, per_case: list[list[float]]) -> dict[str, float]:
    low, high = reference_interval(per_case)  # case-clustered Wilson, the case as the unit
    return {f"{name}_ci": 100 * (high - low) / 2, f"{name}_lo": 100 * low, f"{name}_hi": 100 * high}


def _reference(cases: list[CaseResult]) -> dict[str, float]:
    out: dict[str, float] = {}
    for group, (s_name, m_name) in PROBE_GROUPS.items():
        right = np.concatenate([c.scores[group][0].numpy() for c in cases if group in c.scores] or [[]])
        wrong = np.concatenate([c.scores[group][1].numpy() for c in cases if group in c.scores] or [[]])
        if right.size:
            p = float(np.mean(np.exp(-wrong) < np.exp(-right)))
            out[s_name], out[m_name] = 100 * p, 100 * float(np.mean(np.exp(-right)))
            per_case = [(np.exp(-c.scores[group][1].numpy()) < np.exp(-c.scores[group][0].numpy())).tolist()
                        for c in cases if group in c.scores]
            out.update(_interval_keys(s_name, per_case))
    texts = [c.texts for c in cases if c.texts]
    per_case = [np.mean([_entropy(t) for t in ts]) for ts in texts]
    out["FL"] = 100 * float(np.mean(per_case))
    out["FL_ci"] = 100 * reference_normal(per_case)  # normal over cases, sample variance
    out["PPL"] = math.exp(sum(c.perplexity[0] for c in cases) / sum(c.perplexity[1] for c in cases))
    for group, name in (("efficacy", "Efficacy"), ("locality", "Locality")):
        accs = [[np.mean(p.numpy() == r.numpy()) for p, r in zip(*c.tokens[group], strict=True)] for c in cases]
        out[name] = 100 * float(np.mean(np.concatenate(accs)))  # per-prompt accuracies pooled over cases
        out.update(_interval_keys(name, accs))
    out["Score"] = (out["Efficacy"] + out["Locality"]) / 2
    present = np.array([out[k] for k in ("ES", "PS", "NS", "DNS")])
    out["Avg.S"] = 0.0 if (present == 0).any() else float(len(present) / np.sum(1 / present))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_edit_metrics_match_numpy_reference(seed: int) -> None:
    cases = _random_cases(seed)
    metrics = EditMetrics()
    for case in cases:
        metrics.update(case)
    got, expected = metrics.compute(), _reference(cases)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert math.isclose(got[key], value, rel_tol=1e-6, abs_tol=1e-9), key


def test_point_estimates_are_the_pooled_sums_bit_for_bit() -> None:
    """The intervals changed; the scores did not: each is the sum over cases accumulated as before, over the count."""
    from kelight.evaluation import functional as F

    cases = _random_cases(4, n_cases=11)
    metrics = EditMetrics()
    for case in cases:
        metrics.update(case)
    out = metrics.compute()
    for group, (s_name, _) in PROBE_GROUPS.items():
        total, n = torch.tensor(0.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
        for case in (c for c in cases if group in c.scores):
            total += F.pairwise_scores(*(x.double() for x in case.scores[group]))[0].sum()
            n += case.scores[group][0].numel()
        if n:
            assert out[s_name] == 100.0 * float(total / n), s_name
    total, n = torch.tensor(0.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    for case in cases:
        total += F.token_accuracies(*case.tokens["efficacy"]).double().sum()
        n += len(case.tokens["efficacy"][0])
    assert out["Efficacy"] == 100.0 * float(total / n)


def test_prompts_are_pooled_not_averaged_per_case() -> None:
    # Case A: 1 prompt, succeeds. Case B: 3 prompts, all fail. Pooled 1/4, per-case mean 1/2.
    a = CaseResult("a", {"neighbor": (torch.tensor([0.1]), torch.tensor([1.0]))})
    b = CaseResult("b", {"neighbor": (torch.tensor([2.0, 2.0, 2.0]), torch.tensor([1.0, 1.0, 1.0]))})
    metrics = EditMetrics()
    metrics.update(a)
    metrics.update(b)
    out = metrics.compute()
    assert math.isclose(out["NS"], 25.0)
    low, high = reference_interval([[1.0], [0.0, 0.0, 0.0]])  # two cases, not four independent prompts
    assert math.isclose(out["NS_ci"], 100 * (high - low) / 2) and math.isclose(out["NS_lo"], 100 * low)
    assert "Avg.S" not in out  # no edit score (ES/PS) to average with


def test_avg_s_is_zero_when_a_term_is_zero_and_groups_without_data_are_omitted() -> None:
    case = CaseResult(
        0,
        {
            "rewrite": (torch.tensor([0.1, 0.2]), torch.tensor([1.0, 1.0])),  # ES 100
            "relation": (torch.tensor([3.0]), torch.tensor([1.0])),  # RS 0
            "paraphrase": (torch.zeros(0), torch.zeros(0)),  # no prompts: omitted
        },
    )
    metrics = EditMetrics()
    metrics.update(case)
    out = metrics.compute()
    assert out["ES"] == 100.0 and out["RS"] == 0.0 and out["Avg.S"] == 0.0
    assert "PS" not in out and "FL" not in out and "PPL" not in out and "Score" not in out
    assert set(out) == {"ES", "ES_ci", "ES_lo", "ES_hi", "EM", "RS", "RS_ci", "RS_lo", "RS_hi", "RM", "Avg.S"}
    assert out["ES_hi"] == 100.0 and out["ES_lo"] < 90.0 and out["RS_lo"] == 0.0 and out["RS_hi"] > 10.0


def test_empty_report_without_warnings(recwarn: pytest.WarningsRecorder) -> None:
    assert EditMetrics().compute() == {}
    assert not [w for w in recwarn if "compute" in str(w.message)]


@pytest.mark.parametrize("cls", METRIC_CLASSES)
def test_states_are_sums(cls: type[Metric]) -> None:
    metric = cls()
    assert cls.full_state_update is False
    assert metric._reductions and all(fx is torch.sum or getattr(fx, "__name__", "") == "dim_zero_sum"
                                      for fx in metric._reductions.values())


def _update_pairs(metric: Metric, data: list[tuple]) -> None:
    for args in data:
        metric.update(*args)


def _metric_data(seed: int) -> dict[type[Metric], list[tuple]]:
    rng = np.random.default_rng(seed)
    pairs = [tuple(torch.from_numpy(x) for x in rng.gamma(2.0, 1.0, size=(2, 4))) for _ in range(6)]
    tokens = [([torch.tensor([1, 2, 3])], [torch.from_numpy(rng.integers(1, 4, size=3))]) for _ in range(6)]
    texts = [((("a b a b",) if i % 2 else ("x y z w", "a a a a")),) for i in range(6)]
    ppl = [(float(rng.uniform(1, 9)), int(rng.integers(1, 5))) for _ in range(6)]
    return {PairwiseScore: pairs, TokenAccuracy: tokens, Fluency: texts, Perplexity: ppl}


def _as_float(value: torch.Tensor | dict[str, torch.Tensor]) -> dict[str, float]:
    items = value.items() if isinstance(value, dict) else [("value", value)]
    return {k: float(v) for k, v in items}


@pytest.mark.parametrize("cls", METRIC_CLASSES)
def test_merged_shards_equal_one_process(cls: type[Metric]) -> None:
    # DDP simulation: two ranks each see half the data; merging by the sum reductions is exact.
    data = _metric_data(0)[cls]
    whole, rank0, rank1 = cls(), cls(), cls()
    _update_pairs(whole, data)
    _update_pairs(rank0, data[:3])
    _update_pairs(rank1, data[3:])
    rank0.merge_state(rank1)
    assert _as_float(rank0.compute()) == pytest.approx(_as_float(whole.compute()), rel=1e-12)


@pytest.mark.parametrize("cls", METRIC_CLASSES)
def test_reset_clears_state(cls: type[Metric]) -> None:
    data = _metric_data(1)[cls]
    fresh, used = cls(), cls()
    _update_pairs(used, data)
    used.reset()
    _update_pairs(used, data[:2])
    _update_pairs(fresh, data[:2])
    assert _as_float(used.compute()) == pytest.approx(_as_float(fresh.compute()), rel=1e-12)


def test_edit_metrics_reset_and_reuse() -> None:
    cases = _random_cases(3)
    metrics = EditMetrics()
    for case in cases:
        metrics.update(case)
    metrics.reset()
    assert metrics.compute() == {}
    metrics.update(cases[0])
    one = EditMetrics()
    one.update(cases[0])
    assert metrics.compute() == one.compute()


def test_pairwise_score_values() -> None:
    metric = PairwiseScore()
    metric.update(torch.tensor([0.5, 3.0, 1.0]), torch.tensor([1.0, 1.0, 1.0]))  # tie fails
    out = metric.compute()
    assert float(out["score"]) == pytest.approx(1 / 3)
    assert float(out["magnitude"]) == pytest.approx((math.exp(-0.5) + math.exp(-3.0) + math.exp(-1.0)) / 3)
    low, high = reference_interval([[1.0, 0.0, 0.0]])  # one case: counted once
    assert (float(out["lo"]), float(out["hi"])) == pytest.approx((low, high)) and float(out["ci"]) == pytest.approx(
        (high - low) / 2)
    assert int(out["n"]) == 3


def test_fluency_averages_cases_not_texts() -> None:
    metric = Fluency()
    metric.update(["a b a b"])
    metric.update(["the cat sat", "the cat sat", "the cat sat"])
    metric.update([])  # a case without generations is not counted
    values = [_entropy("a b a b"), _entropy("the cat sat")]
    out = metric.compute()
    assert float(out["mean"]) == pytest.approx(np.mean(values)) and int(out["n"]) == 2
    assert float(out["ci"]) == pytest.approx(reference_normal(values))  # over cases, sample variance


def test_unknown_group_raises() -> None:
    metrics = EditMetrics(probe_groups={"rewrite": ("ES", "EM")})
    with pytest.raises(KeyError, match="unknown metric group 'neighbor'"):
        metrics.update(CaseResult(0, {"neighbor": (torch.zeros(1), torch.ones(1))}))


def test_doctests() -> None:
    assert doctest.testmod(kelight.evaluation.metrics, raise_on_error=True).failed == 0


@pytest.mark.parametrize(
    ("report", "expected"),
    [
        ({"ES": 100.0, "PS": 100.0}, None),  # ZsRE: no specificity score, so no Avg.S (not a perfect 100)
        ({"NS": 50.0, "RS": 25.0}, None),  # nothing edited is scored
        ({"PS": 50.0, "DNS": 25.0, "Efficacy": 1.0}, 100 / 3),  # 2 / (1/50 + 1/25); token accuracies left out
        ({"ES": 100.0, "NS": 0.0}, 0.0),
    ],
)
def test_avg_s_needs_an_edit_score_and_a_specificity_score(report: dict[str, float], expected: float | None) -> None:
    from kelight.evaluation.metrics import avg_s

    out = avg_s(report)
    assert out == ({} if expected is None else {"Avg.S": pytest.approx(expected)})

"""torchmetrics classes for edit scores, and :class:`EditMetrics`, the flat report of a run.

Every state is a sum reduced with ``dist_reduce_fx="sum"``, so results are exact under DDP
(evaluate with an unrepeated sampler: padded duplicates would be counted). Prompts are pooled
across cases, as in the reference summariser: ES = successes / prompts over all cases.

Contract: each ``update`` call of a score metric (:class:`PairwiseScore`, the ``_MeanOfItems`` family) adds
ONE case's prompts, and :meth:`EditMetrics.update` takes one case (``EditModule``, ``kelight.evaluate``
and the sequential curves call it once per case). The 95% intervals treat the case as the unit
(:mod:`kelight.evaluation.intervals`: a case-clustered Wilson interval from the sums of
:class:`~kelight.evaluation.intervals.CaseSums`), so a call with several cases' prompts would make them too narrow.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from torchmetrics import Metric

from kelight.evaluation import functional as F
from kelight.evaluation import intervals
from kelight.evaluation.judge import WILD_METRICS, wild_items
from kelight.types import PROBE_GROUPS, TOKEN_GROUPS

if TYPE_CHECKING:
    from kelight.evaluation.scoring import CaseResult

AVG_S_METRICS = ("ES", "PS", "NS", "RS", "DNS")
_SPECIFICITY = ("NS", "RS", "DNS")


def avg_s(report: Mapping[str, float]) -> dict[str, float]:
    """``{"Avg.S": harmonic mean of the scores of AVG_S_METRICS in report}``; empty unless an edit score
    (ES or PS) and a specificity score (NS, RS or DNS) are both there: without the second (ZsRE, whose
    locality prompts have no pairwise score) a mean of ES and PS alone would read as a perfect edit."""
    present = [report[name] for name in AVG_S_METRICS if name in report]
    complete = any(name in report for name in ("ES", "PS")) and any(name in report for name in _SPECIFICITY)
    return {"Avg.S": F.harmonic_mean(present)} if complete else {}


def _sum_state(metric: Metric, name: str) -> None:
    metric.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")


# The per-case sums of the clustered interval beyond a score's total and prompt count (CaseSums' fields).
_CASE_STATES = ("case_sq", "case_cross", "case_n_sq", "cases")


def _add_case(metric: Metric, sums: intervals.CaseSums) -> None:
    """Add one case's ``case_sq, case_cross, case_n_sq, cases`` to ``metric``'s states of those names."""
    for name in _CASE_STATES:
        setattr(metric, name, getattr(metric, name) + getattr(sums, name))


def _case_sums(metric: Metric, total: torch.Tensor, total_sq: torch.Tensor) -> intervals.CaseSums:
    """The metric's :class:`~kelight.evaluation.intervals.CaseSums` (``total``/``total_sq`` name its own states)."""
    return intervals.CaseSums(float(total), float(total_sq), float(metric.n),
                      *(float(getattr(metric, name)) for name in _CASE_STATES))


def _interval_report(name: str, res: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """``<name>_ci`` (half-width), ``<name>_lo`` and ``<name>_hi`` in percent from a ``compute()`` result."""
    return intervals.percent_interval(name, float(res["lo"]), float(res["hi"]))


class PairwiseScore(Metric):
    """Fraction of prompts whose right target beats the wrong one, and mean ``P(right)``.

    ``update(nll_right, nll_wrong)`` takes one case's ``(N,)`` mean per-token NLLs; ``compute()`` returns
    fractions (not percent): ``{"score", "magnitude", "ci", "lo", "hi", "n"}``, ``(lo, hi)`` the case-clustered
    95% Wilson interval (:func:`~kelight.evaluation.intervals.clustered_wilson_interval`) and ``ci`` its
    half-width ``(hi - lo)/2``.

    Example:
        >>> m = PairwiseScore()
        >>> m.update(torch.tensor([0.5, 3.0]), torch.tensor([1.0, 1.0]))
        >>> m.compute()["score"].item()
        0.5
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        for name in ("successes", "magnitude", "n", *_CASE_STATES):
            _sum_state(self, name)

    def update(self, nll_right: torch.Tensor, nll_wrong: torch.Tensor) -> None:
        """Add the prompts of one case (one cluster of the interval)."""
        success, magnitude = F.pairwise_scores(nll_right.double(), nll_wrong.double())
        self.successes += success.sum().to(self.successes.device)
        self.magnitude += magnitude.sum().to(self.magnitude.device)
        self.n += success.numel()
        _add_case(self, intervals.case_sums(success))

    def compute(self) -> dict[str, torch.Tensor]:
        """Pooled fractions (``nan`` when no prompt was seen)."""
        n = int(self.n.item())
        score = self.successes / self.n if n else self.n.new_tensor(math.nan)
        magnitude = self.magnitude / self.n if n else self.n.new_tensor(math.nan)
        sums = _case_sums(self, self.successes, self.successes)  # 0/1 values: y² = y
        low, high = intervals.clustered_wilson_interval(sums)
        return {"score": score, "magnitude": magnitude, "ci": self.n.new_tensor((high - low) / 2.0),
                "lo": self.n.new_tensor(low), "hi": self.n.new_tensor(high), "n": self.n.clone()}


class _MeanOfItems(Metric):
    """The mean of per-item values pooled over cases, from DDP-safe sums (:class:`~kelight.evaluation.intervals.
    CaseSums`); each ``_add(values)`` is ONE case's items. ``compute`` gives ``{"mean", "ci", "lo", "hi", "n"}``:
    the mean, its 95% interval ``(lo, hi)`` with ``ci = (hi - lo)/2``, and the number of items.

    ``bounded`` (default): items are fractions in [0, 1] (0/1 judgments, accuracies, F1) and the interval is
    the case-clustered Wilson interval (:func:`~kelight.evaluation.intervals.clustered_wilson_interval`);
    otherwise (fluency) ``mean ± 1.96·sqrt(V_c)`` (:func:`~kelight.evaluation.intervals.clustered_normal_interval`).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True
    bounded = True

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        for name in ("total", "total_sq", "n", *_CASE_STATES):
            _sum_state(self, name)

    def _add(self, values: torch.Tensor) -> None:
        """Add one case's items ``(n_i,)``.

        Raises:
            ValueError: a bounded metric's item outside [0, 1].
        """
        values = values.double().to(self.total.device)
        if self.bounded and bool(((values < -1e-12) | (values > 1 + 1e-12)).any()):  # rounding passes
            raise ValueError(f"expected {type(self).__name__} items in [0, 1], got {values.tolist()}; a metric "
                             f"of other values sets bounded = False (normal interval)")
        self.total += values.sum()
        self.total_sq += values.square().sum()
        self.n += values.numel()
        _add_case(self, intervals.case_sums(values))

    def compute(self) -> dict[str, torch.Tensor]:
        """Mean over the items seen and its 95% interval; ``nan`` when empty."""
        n = int(self.n.item())
        mean = self.total / self.n if n else self.n.new_tensor(math.nan)
        sums = _case_sums(self, self.total, self.total_sq)
        interval = intervals.clustered_wilson_interval if self.bounded else intervals.clustered_normal_interval
        low, high = interval(sums)
        return {"mean": mean, "ci": self.n.new_tensor((high - low) / 2.0), "lo": self.n.new_tensor(low),
                "hi": self.n.new_tensor(high), "n": self.n.clone()}


class TokenAccuracy(_MeanOfItems):
    """EasyEdit token accuracy (or locality), averaged over prompts.

    ``update(preds, targets)`` takes per-prompt ``(T_i,)`` predictions and references (target ids,
    or the pre-edit predictions for locality); each prompt contributes its fraction of matches.
    """

    def update(self, preds: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> None:
        """Add the prompts of one case."""
        self._add(F.token_accuracies(preds, targets))


class Fluency(_MeanOfItems):
    """ROME n-gram entropy (bits, not ×100): each ``update(texts)`` is one case's generations.

    As in the reference, a case scores the mean entropy of its texts and cases are averaged; the interval
    is normal over cases, with their sample variance (none for a single case).
    """

    bounded = False

    def update(self, texts: Sequence[str]) -> None:
        """Add one case's generated texts (ignored when empty)."""
        if texts:
            self._add(torch.tensor([F.n_gram_entropy(texts)], dtype=torch.float64))


class WildScore(_MeanOfItems):
    """A wild (generated-answer) score: each ``update(values)`` is one case's per-prompt values, 0/1 judgments
    or token-F1 in [0, 1] (:func:`kelight.evaluation.judge.wild_items`); the mean is over the prompts pooled.

    Example:
        >>> m = WildScore()
        >>> m.update(torch.tensor([1.0, 0.0, 1.0])); m.update(torch.tensor([1.0]))
        >>> m.compute()["mean"].item()
        0.75
    """

    def update(self, values: torch.Tensor | Sequence[float]) -> None:
        """Add one case's prompts."""
        self._add(torch.as_tensor(values, dtype=torch.float64))


class Perplexity(Metric):
    """Corpus perplexity ``exp(sum NLL / tokens)`` from :func:`kelight.evaluation.scoring.perplexity_stats`."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        _sum_state(self, "nll")
        _sum_state(self, "tokens")

    def update(self, nll_sum: float | torch.Tensor, n_tokens: int | torch.Tensor) -> None:
        """Add a summed NLL over ``n_tokens`` predicted tokens."""
        self.nll += torch.as_tensor(nll_sum, dtype=torch.float64).to(self.nll.device)
        self.tokens += torch.as_tensor(n_tokens, dtype=torch.float64).to(self.tokens.device)

    def compute(self) -> torch.Tensor:
        """Perplexity (``nan`` when no token was seen)."""
        return self.nll.new_tensor(F.perplexity(float(self.nll), int(self.tokens)))


def _compute_quietly(metric: Metric) -> torch.Tensor | dict[str, torch.Tensor]:
    # Every metric is computed on every rank (a skipped all-gather would hang DDP); metrics that
    # received no data locally are expected here, so their "compute before update" warning is noise.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*was called before the ``update``.*")
        return metric.compute()


class EditMetrics(nn.Module):
    """All edit scores of a run; ``compute()`` gives the flat, percent-valued report of the output contract
    (docs/design.md, "The output contract").

    Keys, for the groups that received data: ``ES, ES_ci, ES_lo, ES_hi, EM, PS, ...`` (score, its interval,
    magnitude per probe group of ``probe_groups``; every score's interval is the case-clustered 95% Wilson
    interval ``[_lo, _hi]`` of :mod:`kelight.evaluation.intervals`, ``_ci`` its half-width), ``FL`` (n-gram
    entropy ×100) and ``FL_ci`` (a normal half-width over cases), ``PPL``, ``Efficacy``,
    ``Generality``, ``Locality`` (each with its ``_ci``, ``_lo``, ``_hi``), ``Score`` (mean of those three present),
    the wild scores of :data:`~kelight.evaluation.judge.WILD_METRICS` (``wild_ES``, ``wild_ES_f1``, ... each with its
    ``_ci``, ``_lo``, ``_hi``; present only when cases were evaluated with ``eval_protocol`` wild or both) and
    ``Avg.S``, the harmonic mean of ``ES, PS, NS, RS, DNS`` among those present (0 if any is 0).

    Args:
        probe_groups: probe group -> (score name, magnitude name).
        token_groups: token group -> metric name.
        **metric_kwargs: torchmetrics options of every member, e.g. ``sync_on_compute=False`` for
            a report of this process's cases only.

    Example:
        >>> from kelight.evaluation.scoring import CaseResult
        >>> m = EditMetrics()
        >>> m.update(CaseResult(0, {"rewrite": (torch.tensor([0.1]), torch.tensor([2.0]))}))
        >>> m.compute()["ES"]
        100.0
    """

    def __init__(
        self,
        probe_groups: Mapping[str, tuple[str, str]] = PROBE_GROUPS,
        token_groups: Mapping[str, str] = TOKEN_GROUPS,
        **metric_kwargs: object,
    ) -> None:
        super().__init__()
        self.probe_groups = dict(probe_groups)
        self.token_groups = dict(token_groups)
        self.pairwise = nn.ModuleDict({g: PairwiseScore(**metric_kwargs) for g in self.probe_groups})
        self.tokens = nn.ModuleDict({g: TokenAccuracy(**metric_kwargs) for g in self.token_groups})
        self.fluency = Fluency(**metric_kwargs)
        self.perplexity = Perplexity(**metric_kwargs)
        self.wild = nn.ModuleDict({name: WildScore(**metric_kwargs) for name in WILD_METRICS})

    def update(self, result: CaseResult) -> None:
        """Add one evaluated case: call it once per case (each call is one cluster of the intervals).

        Raises:
            KeyError: if the result has a group this object was not created with.
        """
        for group, (nll_right, nll_wrong) in result.scores.items():
            self._member(self.pairwise, group).update(nll_right, nll_wrong)
        for group, (preds, refs) in result.tokens.items():
            self._member(self.tokens, group).update(preds, refs)
        self.fluency.update(result.texts)
        if result.perplexity is not None:
            self.perplexity.update(*result.perplexity)
        for name, values in wild_items(result.wild).items():
            self.wild[name].update(values)

    @staticmethod
    def _member(metrics: nn.ModuleDict, group: str) -> Metric:
        if group not in metrics:
            raise KeyError(f"unknown metric group {group!r}; expected one of {sorted(metrics.keys())}")
        return metrics[group]

    def compute(self) -> dict[str, float]:
        """The flat report (scores in percent); groups without data are omitted."""
        out: dict[str, float] = {}
        for group, (score_name, magnitude_name) in self.probe_groups.items():
            res = _compute_quietly(self.pairwise[group])
            if res["n"] > 0:
                out[score_name] = 100.0 * float(res["score"])
                out.update(_interval_report(score_name, res))  # _ci, _lo, _hi
                out[magnitude_name] = 100.0 * float(res["magnitude"])
        fluency = _compute_quietly(self.fluency)
        if fluency["n"] > 0:  # over cases, each scoring its texts' mean entropy; a symmetric (normal) interval
            out["FL"], out["FL_ci"] = 100.0 * float(fluency["mean"]), 100.0 * float(fluency["ci"])
        ppl = float(_compute_quietly(self.perplexity))
        if not math.isnan(ppl):
            out["PPL"] = ppl
        out.update(self._token_report())
        out.update(avg_s(out))
        for name in WILD_METRICS:
            res = _compute_quietly(self.wild[name])
            if res["n"] > 0:
                out[name] = 100.0 * float(res["mean"])
                out.update(_interval_report(name, res))
        return out

    def _token_report(self) -> dict[str, float]:
        means, cis = {}, {}
        for group, name in self.token_groups.items():
            res = _compute_quietly(self.tokens[group])
            if res["n"] > 0:
                means[name] = 100.0 * float(res["mean"])
                cis.update(_interval_report(name, res))
        if not means:
            return {}
        return {**means, **cis, "Score": sum(means.values()) / len(means)}

    def reset(self) -> None:
        """Clear every state (call at the start of each evaluation epoch)."""
        for metric in self.modules():
            if isinstance(metric, Metric):
                metric.reset()

"""torchmetrics classes for edit scores, and :class:`EditMetrics`, the flat report of a run.

Every state is a sum reduced with ``dist_reduce_fx="sum"``, so results are exact under DDP
(evaluate with an unrepeated sampler: padded duplicates would be counted). Prompts are pooled
across cases, as in the reference summariser: ES = successes / prompts over all cases.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from torchmetrics import Metric

from kelight.metrics import functional as F
from kelight.types import PROBE_GROUPS, TOKEN_GROUPS

if TYPE_CHECKING:
    from kelight.evaluation import CaseResult

AVG_S_METRICS = ("ES", "PS", "NS", "RS", "DNS")


def avg_s(report: Mapping[str, float]) -> dict[str, float]:
    """``{"Avg.S": harmonic mean of the scores of AVG_S_METRICS in report}``; empty when none is."""
    present = [report[name] for name in AVG_S_METRICS if name in report]
    return {"Avg.S": F.harmonic_mean(present)} if present else {}


def _sum_state(metric: Metric, name: str) -> None:
    metric.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")


class PairwiseScore(Metric):
    """Fraction of prompts whose right target beats the wrong one, and mean ``P(right)``.

    ``update(nll_right, nll_wrong)`` takes ``(N,)`` mean per-token NLLs; ``compute()`` returns
    fractions (not percent): ``{"score", "magnitude", "ci", "n"}`` with ``ci`` the 95% half-width.

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
        for name in ("successes", "magnitude", "n"):
            _sum_state(self, name)

    def update(self, nll_right: torch.Tensor, nll_wrong: torch.Tensor) -> None:
        """Add a batch of prompts."""
        successes, magnitude, n = F.pairwise_update(nll_right.double(), nll_wrong.double())
        self.successes += successes.to(self.successes.device)
        self.magnitude += magnitude.to(self.magnitude.device)
        self.n += n

    def compute(self) -> dict[str, torch.Tensor]:
        """Pooled fractions (``nan`` when no prompt was seen)."""
        n = int(self.n.item())
        score = self.successes / self.n if n else self.n.new_tensor(math.nan)
        magnitude = self.magnitude / self.n if n else self.n.new_tensor(math.nan)
        ci = F.ci_half_width(float(score), n) if n else math.nan
        return {"score": score, "magnitude": magnitude, "ci": self.n.new_tensor(ci), "n": self.n.clone()}


class _MeanOfItems(Metric):
    """Sum and sum of squares of per-item values and the item count (DDP-safe sums); ``compute`` gives
    ``{"mean", "ci", "n"}``: their mean, its 95% half-width and the number of items."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        _sum_state(self, "total")
        _sum_state(self, "total_sq")
        _sum_state(self, "n")

    def _add(self, values: torch.Tensor) -> None:
        values = values.double().to(self.total.device)
        self.total += values.sum()
        self.total_sq += values.square().sum()
        self.n += values.numel()

    def compute(self) -> dict[str, torch.Tensor]:
        """Mean over the items seen and its 95% half-width
        (:func:`~kelight.metrics.functional.mean_ci_half_width`); ``nan`` when empty."""
        n = int(self.n.item())
        if not n:
            return {"mean": self.n.new_tensor(math.nan), "ci": self.n.new_tensor(math.nan), "n": self.n.clone()}
        mean, mean_sq = self.total / self.n, self.total_sq / self.n
        ci = F.mean_ci_half_width(float(mean), float(mean_sq), n)
        return {"mean": mean, "ci": self.n.new_tensor(ci), "n": self.n.clone()}


class TokenAccuracy(_MeanOfItems):
    """EasyEdit token accuracy (or locality), averaged over prompts.

    ``update(preds, targets)`` takes per-prompt ``(T_i,)`` predictions and references (target ids,
    or the pre-edit predictions for locality); each prompt contributes its fraction of matches.
    """

    def update(self, preds: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> None:
        """Add the prompts of one batch."""
        self._add(F.token_accuracies(preds, targets))


class Fluency(_MeanOfItems):
    """ROME n-gram entropy (bits, not ×100): each ``update(texts)`` is one case's generations.

    As in the reference, a case scores the mean entropy of its texts and cases are averaged.
    """

    def update(self, texts: Sequence[str]) -> None:
        """Add one case's generated texts (ignored when empty)."""
        if texts:
            self._add(torch.tensor([F.n_gram_entropy(texts)], dtype=torch.float64))


class Perplexity(Metric):
    """Corpus perplexity ``exp(sum NLL / tokens)`` from :func:`kelight.evaluation.perplexity_stats`."""

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
    """All edit scores of a run; ``compute()`` gives the flat, percent-valued report of DESIGN §5.

    Keys, for the groups that received data: ``ES, ES_ci, EM, PS, PS_ci, PM, ...`` (one triple per
    probe group of ``probe_groups``), ``FL`` (n-gram entropy ×100) and ``FL_ci``, ``PPL``, ``Efficacy``,
    ``Generality``, ``Locality`` (each with its ``_ci``), ``Score`` (mean of those three present) and
    ``Avg.S``, the harmonic
    mean of ``ES, PS, NS, RS, DNS`` among those present (0 if any is 0).

    Args:
        probe_groups: probe group -> (score name, magnitude name).
        token_groups: token group -> metric name.
        **metric_kwargs: torchmetrics options of every member, e.g. ``sync_on_compute=False`` for
            a report of this process's cases only.

    Example:
        >>> from kelight.evaluation import CaseResult
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

    def update(self, result: CaseResult) -> None:
        """Add one evaluated case.

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
                out[f"{score_name}_ci"] = 100.0 * float(res["ci"])
                out[magnitude_name] = 100.0 * float(res["magnitude"])
        fluency = _compute_quietly(self.fluency)
        if fluency["n"] > 0:  # over cases, each scoring its texts' mean entropy
            out["FL"], out["FL_ci"] = 100.0 * float(fluency["mean"]), 100.0 * float(fluency["ci"])
        ppl = float(_compute_quietly(self.perplexity))
        if not math.isnan(ppl):
            out["PPL"] = ppl
        out.update(self._token_report())
        out.update(avg_s(out))
        return out

    def _token_report(self) -> dict[str, float]:
        means, cis = {}, {}
        for group, name in self.token_groups.items():
            res = _compute_quietly(self.tokens[group])
            if res["n"] > 0:
                means[name], cis[f"{name}_ci"] = 100.0 * float(res["mean"]), 100.0 * float(res["ci"])
        if not means:
            return {}
        return {**means, **cis, "Score": sum(means.values()) / len(means)}

    def reset(self) -> None:
        """Clear every state (call at the start of each evaluation epoch)."""
        for metric in self.modules():
            if isinstance(metric, Metric):
                metric.reset()

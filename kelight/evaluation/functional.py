"""Pure metric math shared by the torchmetrics classes, the per-case summaries and the tests.

Scoring rule (the SADR/EasyEdit reference, ``my_evaluate.py``): a prompt is scored by the *mean
per-token* teacher-forced NLL of its right and its wrong target. The prompt succeeds when
``nll_right < nll_wrong`` (ties fail) and its magnitude is ``P = exp(-nll_right)``, the geometric
mean of the right target's token probabilities, not their product (ROME's original uses summed
NLL; a mean keeps multi-token targets comparable with single-token ones).

Fluency is ROME's ``n_gram_entropy``: bi- and tri-gram entropies in bits weighted 2/3 and 4/3,
averaged, then averaged over texts. nltk is not a dependency, so words are split with the regex
``\\w+|[^\\w\\s]`` (words, and each punctuation character on its own); ``nltk.word_tokenize``
additionally splits contractions (``don't`` -> ``do n't``) and keeps ``...`` or ``U.S.`` whole,
which moves the entropy of ordinary text by well under 1%.

The 95% intervals of pooled scores (case-clustered Wilson intervals) are in :mod:`kelight.evaluation.intervals`.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import torch

_WORD = re.compile(r"\w+|[^\w\s]")


def _check_pair(nll_right: torch.Tensor, nll_wrong: torch.Tensor) -> None:
    if nll_right.shape != nll_wrong.shape or nll_right.dim() != 1:
        raise ValueError(
            f"expected nll_right and nll_wrong of the same shape (N,), got "
            f"{tuple(nll_right.shape)} and {tuple(nll_wrong.shape)}"
        )


def pairwise_scores(nll_right: torch.Tensor, nll_wrong: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prompt success and magnitude from mean per-token NLLs.

    Args:
        nll_right: ``(N,)`` mean per-token NLL of the right target.
        nll_wrong: ``(N,)`` mean per-token NLL of the wrong target.

    Returns:
        ``(success, magnitude)``: ``(N,)`` float 0/1 with 1 where ``nll_right < nll_wrong``, and
        ``(N,)`` ``exp(-nll_right)``.

    Example:
        >>> s, p = pairwise_scores(torch.tensor([0.1, 2.0]), torch.tensor([1.0, 1.0]))
        >>> s.tolist()
        [1.0, 0.0]
    """
    _check_pair(nll_right, nll_wrong)
    success = (nll_right < nll_wrong).to(nll_right.dtype)
    return success, torch.exp(-nll_right)


def pairwise_update(
    nll_right: torch.Tensor, nll_wrong: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Sufficient statistics of a batch: ``(n_success, sum_magnitude, n_prompts)``."""
    success, magnitude = pairwise_scores(nll_right, nll_wrong)
    return success.sum(), magnitude.sum(), success.numel()


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean of non-negative values; 0 if any value is 0 (the Avg.S convention).

    Raises:
        ValueError: if ``values`` is empty or has a negative entry.
    """
    if not values:
        raise ValueError("expected at least one value for the harmonic mean, got none")
    if any(v < 0 for v in values):
        raise ValueError(f"expected non-negative values for the harmonic mean, got {list(values)}")
    if any(v == 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def words(text: str) -> list[str]:
    """Word tokens of ``text`` (regex stand-in for ``nltk.word_tokenize``; see the module doc)."""
    return _WORD.findall(text)


def ngram_entropy(
    text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)
) -> float:
    """ROME's ``compute_n_gram_entropy`` of one text: mean over ``n`` of ``weight_n * H_n`` (bits).

    A text with fewer than ``n`` words contributes ``H_n = 0``, as in the reference.
    """
    tokens = words(text)
    weighted = []
    for n, w in zip(ns, weights, strict=True):
        counts = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
        total = sum(counts.values())
        entropy = -sum(c / total * math.log2(c / total) for c in counts.values())
        weighted.append(w * entropy)
    return sum(weighted) / len(weighted)


def n_gram_entropy(texts: Sequence[str]) -> float:
    """ROME's ``n_gram_entropy``: arithmetic mean of :func:`ngram_entropy` over ``texts``.

    Reported ×100 by the papers (about 620 for real models); scale at the reporting layer.

    Raises:
        ValueError: if ``texts`` is empty.
    """
    if not texts:
        raise ValueError("expected at least one generated text for the n-gram entropy, got none")
    return sum(ngram_entropy(t) for t in texts) / len(texts)


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """``exp(nll_sum / n_tokens)`` (``inf`` past float range); ``nan`` for zero tokens."""
    if n_tokens < 0:
        raise ValueError(f"expected a token count >= 0, got {n_tokens}")
    if not n_tokens:
        return math.nan
    try:
        return math.exp(nll_sum / n_tokens)
    except OverflowError:  # mean NLL above ~709 nats: a collapsed model
        return math.inf


def token_accuracy(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """EasyEdit token accuracy of one prompt: fraction of positions where ``preds == target``.

    Also EasyEdit locality, with ``target`` the pre-edit predictions.

    Raises:
        ValueError: on a shape mismatch or an empty target.
    """
    if preds.shape != target.shape or preds.dim() != 1 or preds.numel() == 0:
        raise ValueError(
            f"expected predictions and target of the same non-empty shape (T,), got "
            f"{tuple(preds.shape)} and {tuple(target.shape)}; re-run the reference on the same probes"
        )
    return (preds == target.to(preds.device)).double().mean()


def token_accuracies(preds: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-prompt :func:`token_accuracy`, ``(N,)`` float64."""
    if len(preds) != len(targets):
        raise ValueError(f"expected as many predictions as targets, got {len(preds)} and {len(targets)}")
    if not preds:
        return torch.zeros(0, dtype=torch.float64)
    return torch.stack([token_accuracy(p, t).cpu() for p, t in zip(preds, targets, strict=True)])

"""PAC's path tracing: impact scores of every FFN key and value from the target NLL's gradient, and
the critical (T+) and negative (τ−) paths of every layer. Steps 1–2 of :mod:`kelight.editors.pathedit`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from transformers import PreTrainedModel

from kelight.editors.pac.deltas import MODULE_OF, PathSelection
from kelight.editors.steps import EditOptimizationError, forward_logprobs
from kelight.models.adapters import ArchAdapter
from kelight.objectives import rewrite_nll
from kelight.objectives.base import RewriteBatch
from kelight.types import EditInputError


def impact_scores(grad: torch.Tensor) -> torch.Tensor:
    """PAC's impact score of every FFN neuron from a summed gradient.

    Args:
        grad: ``(hidden, d_ff)`` summed signed gradient of one matrix (keys: ``mlp_in``ᵀ, values:
            ``mlp_out``, in linear convention).

    Returns:
        ``(d_ff,)`` float32: ``mean_h |(G[h] − mean(G[h])) / std(G[h])|`` (unbiased std, as
        ``torch.std`` in the reference). A hidden row whose gradient is constant across neurons
        contributes 0 (the reference would produce NaN).
    """
    g = grad.float()
    std, mean = torch.std_mean(g, dim=1, keepdim=True)  # (H, 1) each
    inv = torch.where(std > 0, std.reciprocal(), torch.zeros_like(std))  # (H, 1)
    return (inv.T @ (g - mean).abs_()).squeeze(0) / g.shape[0]  # (F,) = mean over h of |z[h]|, one pass


def select_paths(scores: torch.Tensor, path_size: int, neg_path_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``path_size`` and bottom ``neg_path_size`` neurons of every layer, never overlapping.

    Args:
        scores: ``(L, d_ff)`` impact scores.

    Returns:
        ``(pos, neg)``: ``(L, path_size)`` indices by decreasing score and ``(L, neg_path_size)``
        by increasing score; ties are broken by index (stable sort).

    Raises:
        EditInputError: if ``path_size + neg_path_size`` exceeds ``d_ff``.
        EditOptimizationError: if a score is NaN/inf.
    """
    n_ff = scores.shape[1]
    if path_size + neg_path_size > n_ff:
        raise EditInputError(
            f"path_size + neg_path_size = {path_size + neg_path_size} exceeds the FFN width d_ff = {n_ff}; "
            f"expected at most {n_ff} (lower path_size)"
        )
    if not torch.isfinite(scores).all():
        raise EditOptimizationError("path impact scores are NaN/inf (the gradient of the target NLL diverged); "
                                    "use float32 or check the data; the model weights were not changed")
    order = torch.argsort(scores, dim=1, descending=True, stable=True)  # (L, F)
    return order[:, :path_size], order[:, n_ff - neg_path_size:].flip(1)


@contextmanager
def _requires_grad(params: Sequence[torch.Tensor]) -> Iterator[None]:
    """Temporarily let autograd differentiate ``params`` (their values are never written)."""
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


def path_nll(model: PreTrainedModel, batch: RewriteBatch) -> torch.Tensor:
    """Mean per-token NLL of ``o_edit`` after each prompt, averaged over the prompts (the rewrite NLL)."""
    tgt, _, _ = forward_logprobs(model, batch, want_attn=False)  # (N, V)
    return rewrite_nll(tgt, batch.target_ids, batch.target_rows, batch.n_rewrite)


def trace_paths(model: PreTrainedModel, adapter: ArchAdapter, batches: Sequence[RewriteBatch], path_size: int,
                neg_path_size: int) -> PathSelection:
    """Impact scores from the target NLL's gradient summed over ``batches``, and the paths."""
    n_layers = adapter.n_layers(model)
    weights = [adapter.module(model, MODULE_OF[kind], layer).weight for layer in range(n_layers)
               for kind in ("key", "value")]
    if not batches:
        raise EditInputError("expected at least one batch of edit requests to trace paths on, got none")
    sums: list[torch.Tensor] = []
    with _requires_grad(weights), torch.enable_grad():
        for batch in batches:
            grads = torch.autograd.grad(path_nll(model, batch), weights)
            if not sums:
                sums = [g.float() for g in grads]  # fresh tensors: summed into in place below
                continue
            for total, grad in zip(sums, grads, strict=True):
                total.add_(grad.float())
    # (hidden, d_ff) per matrix: keys are rows of mlp_in (d_ff, D), values columns of mlp_out (D, d_ff)
    key_scores = torch.stack([impact_scores(adapter.as_linear(sums[2 * i]).T) for i in range(n_layers)])
    value_scores = torch.stack([impact_scores(adapter.as_linear(sums[2 * i + 1])) for i in range(n_layers)])
    key_pos, key_neg = select_paths(key_scores, path_size, neg_path_size)
    value_pos, value_neg = select_paths(value_scores, path_size, neg_path_size)
    return PathSelection(key_pos, key_neg, value_pos, value_neg, key_scores, value_scores)

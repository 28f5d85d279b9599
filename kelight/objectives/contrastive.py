"""Contrastive rectification of PathEdit (PAC, Zhai et al. ACL 2025, eq. 7, second term).

With only the negative path τ− trainable, the model run on ``prompt + target`` is pulled towards
the **unedited** model's own argmax predictions at the target positions:
``λ · CE(model(prompt + target), argmax_unedited)``. The reference (``PAC.edit``) takes a separate
Adam step on this loss with every gradient outside τ− zeroed; kelight adds it to the rewrite NLL
with the critical path detached in this forward (see :mod:`kelight.editors.pathedit`), which
reaches the same per-parameter gradients because T+ and τ− are disjoint.
"""

from __future__ import annotations

import torch

from kelight.checks import check_number
from kelight.objectives.rewrite import rewrite_nll


def unedited_targets(log_probs: torch.Tensor) -> torch.Tensor:
    """The unedited model's argmax token at each target position.

    Args:
        log_probs: ``(N, V)`` log-probabilities (or logits) of the *unedited* model at the N
            positions that predict target tokens (teacher-forced on ``prompt + target``).

    Returns:
        ``(N,)`` long token ids, detached.
    """
    return log_probs.detach().argmax(dim=-1)


def contrastive_loss(
    log_probs: torch.Tensor, reference_ids: torch.Tensor, prompt_index: torch.Tensor, n_prompts: int, weight: float
) -> torch.Tensor:
    """``weight · CE`` towards the unedited predictions, averaged like the rewrite NLL.

    The cross-entropy is :func:`~kelight.objectives.rewrite.rewrite_nll` with the reference tokens
    as targets (mean per-token NLL per prompt, then the mean over prompts). The reference averages
    over all target tokens of a batch instead; with one prompt per request the two agree whenever
    the targets have the same length.

    Args:
        log_probs: ``(N, V)`` log-probabilities at the target positions, computed with only the
            negative path trainable.
        reference_ids: ``(N,)`` :func:`unedited_targets` of the same positions.
        prompt_index: ``(N,)`` prompt of each position (``0..n_prompts-1``).
        n_prompts: number of prompts.
        weight: λ (``contrastive_lambda``), finite and ≥ 0.

    Returns:
        A scalar tensor (0 when ``weight`` is 0).

    Raises:
        ValueError: if ``weight`` is negative or not finite, or ``reference_ids`` does not match.
    """
    check_number("contrastive_lambda", weight, positive=False)
    if reference_ids.shape != log_probs.shape[:1]:
        raise ValueError(
            f"expected one reference token per target position, got {tuple(reference_ids.shape)} for "
            f"{log_probs.shape[0]} positions; compute unedited_targets on the same batch"
        )
    return weight * rewrite_nll(log_probs, reference_ids, prompt_index, n_prompts)

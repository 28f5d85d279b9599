"""Essence loss: keep P(x | "{subject} is a") close to the unedited model (ROME eq. 1, term 2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def essence_kl_rows(log_probs: torch.Tensor, log_probs_init: torch.Tensor) -> torch.Tensor:
    """KL(P_current ‖ P_init) of each essence prompt, ``(P,)``.

    Args:
        log_probs: ``(P, V)`` current next-token log-probabilities at the essence prompts' ends.
        log_probs_init: ``(P, V)`` the same at optimisation step 0 (detached).
    """
    return F.kl_div(log_probs_init, log_probs, log_target=True, reduction="none").sum(-1)


def essence_kl(log_probs: torch.Tensor, log_probs_init: torch.Tensor) -> torch.Tensor:
    """KL(P_current ‖ P_init) averaged over the essence prompts, as in ROME's reference (a scalar).

    Arguments as in :func:`essence_kl_rows`.
    """
    return essence_kl_rows(log_probs, log_probs_init).mean()

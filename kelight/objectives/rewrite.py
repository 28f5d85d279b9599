"""Rewrite loss: mean per-token NLL of ``o_edit`` over the rewriting prompts (ROME eq. 1, term 1)."""

from __future__ import annotations

import torch


def per_prompt_nll(
    log_probs: torch.Tensor, target_ids: torch.Tensor, prompt_index: torch.Tensor, n_prompts: int
) -> torch.Tensor:
    """Mean per-token NLL of the target tokens of each prompt, ``(n_prompts,)``.

    Args:
        log_probs: ``(N, V)`` log-probabilities at the N positions that predict target tokens.
        target_ids: ``(N,)`` the token each position must predict.
        prompt_index: ``(N,)`` which rewriting prompt each position belongs to (``0..n_prompts-1``).
        n_prompts: number of rewriting prompts.
    """
    token_nll = -log_probs.gather(1, target_ids[:, None]).squeeze(1)  # (N,)
    per_prompt = torch.zeros(n_prompts, dtype=token_nll.dtype, device=token_nll.device)
    per_prompt = per_prompt.index_add(0, prompt_index, token_nll)
    counts = torch.bincount(prompt_index, minlength=n_prompts).clamp(min=1).to(token_nll.dtype)
    return per_prompt / counts


def rewrite_nll(
    log_probs: torch.Tensor, target_ids: torch.Tensor, prompt_index: torch.Tensor, n_prompts: int
) -> torch.Tensor:
    """Mean over prompts of the mean per-token NLL of the target tokens (a scalar).

    Arguments as in :func:`per_prompt_nll`.
    """
    return per_prompt_nll(log_probs, target_ids, prompt_index, n_prompts).mean()

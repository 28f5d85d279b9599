"""SADR: selective attention-drift restriction (Wang et al., ICLR 2025, eq. 2).

At step 0 (z = 0) the vanilla attention rows of every rewriting prompt are recorded. At every
step, for every layer l after the edit point and head h, the head is selected iff its current
attention from the query row (the position predicting the first target token) to the subject's
last token s exceeds ``M_l = max_h' vanilla[l, h', row, s]``. The loss is
``mean_prompts Σ_l Σ_{h selected} KL(vanilla[l,h,row,:] ‖ current[l,h,row,:])``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kelight.checks import check_number
from kelight.objectives.base import StepState
from kelight.types import EditInputError

EPS = 1e-8


def query_rows(attentions: Sequence[torch.Tensor], rows: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
    """Stack the query rows of every layer: ``(L, P, H, T)`` from ``L`` tensors ``(B, H, T, T)``."""
    return torch.stack([a[rows, :, query_pos, :] for a in attentions]).float()  # (L, P, H, T)


def sadr_loss(
    vanilla: torch.Tensor, current: torch.Tensor, subject_pos: torch.Tensor, eps: float = EPS,
    selective: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selective KL(vanilla ‖ current) and the head mask.

    Args:
        vanilla: ``(L, P, H, T)`` attention rows at z = 0 (treated as constants).
        current: ``(L, P, H, T)`` attention rows now.
        subject_pos: ``(P,)`` key column of the subject's last token in each prompt.
        eps: added inside the log ratio.
        selective: restrain only the over-attending heads (SADR); ``False`` restrains every head
            (the paper's "all heads" ablation, Figure 6).

    Returns:
        ``(loss, mask)``: the scalar loss (summed over layers and selected heads, averaged over
        prompts) and the ``(L, P, H)`` boolean head selection.
    """
    per_prompt, mask = sadr_per_prompt_loss(vanilla, current, subject_pos, eps, selective)
    return per_prompt.mean(), mask


def sadr_per_prompt_loss(
    vanilla: torch.Tensor, current: torch.Tensor, subject_pos: torch.Tensor, eps: float = EPS,
    selective: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sadr_loss` before the mean over prompts: ``((P,) loss per prompt, (L, P, H) mask)``."""
    p = vanilla.detach()
    n_prompts = p.shape[1]
    cols = subject_pos.view(1, n_prompts, 1, 1).expand(p.shape[0], n_prompts, p.shape[2], 1)
    p_subj = p.gather(-1, cols).squeeze(-1)  # (L, P, H)
    q_subj = current.gather(-1, cols).squeeze(-1)  # (L, P, H)
    mask = q_subj > p_subj.max(dim=-1, keepdim=True).values  # (L, P, H), recomputed every step
    if not selective:
        mask = torch.ones_like(mask)
    kl = (p * ((p + eps) / (current + eps)).log()).sum(-1)  # (L, P, H)
    return (kl * mask).sum(dim=(0, 2)), mask


class SADR:
    """The SADR term ``γ·L_SADR`` as an extra loss of the z optimisation.

    Returns ``(R,)``, one term per request of a merged batch (``batch.n_requests``; each request's
    prompts are consecutive rewriting rows), so that independent edits optimised together keep
    their own losses.

    Args:
        gamma: weight γ (the paper uses 5e-3 … 8e-2); 0 disables the term.
        first_layer: first layer whose attention can drift (layers ≤ the edit point are skipped).
        selective: restrain only heads that over-attend the subject (``False``: every head).
    """

    def __init__(self, gamma: float, first_layer: int, selective: bool = True) -> None:
        self.gamma = check_sadr_gamma(gamma)
        self.first_layer = first_layer
        self.selective = selective
        self.vanilla: torch.Tensor | None = None
        self.selected: list[torch.Tensor] = []  # per step (L, P, H) masks, for statistics

    def __call__(self, state: StepState) -> torch.Tensor:
        batch = state.batch
        first = self.first_layer - state.attn_offset  # layers > edit point
        if state.rows is not None:  # the row kernel's rows of every batch row: the rewriting prompts come first
            current = state.rows[first:, : batch.n_rewrite]  # (L', P, H, T)
        else:
            rows = torch.arange(batch.n_rewrite, device=batch.input_ids.device)
            current = query_rows(state.outputs.attentions[first:], rows, batch.query_pos)  # (L', P, H, T)
        if state.step == 0 or self.vanilla is None:
            self.vanilla = current.detach()
            self.selected = []
        subject_keys = batch.subject_pos[: batch.n_rewrite] + batch.key_offset  # key columns of the subjects
        per_prompt, mask = sadr_per_prompt_loss(self.vanilla, current, subject_keys, selective=self.selective)
        self.selected.append(mask.detach().sum(dim=(1,)))  # (L', H) prompts selecting each head; no host sync
        return self.gamma * per_prompt.view(batch.n_requests, -1).mean(1)  # (R,) one term per request


def check_sadr_gamma(gamma: object) -> float:
    """``gamma`` if it is a valid SADR weight: a finite number ≥ 0 (0 = off)."""
    return check_number("sadr_gamma", gamma, positive=False, hint="; use 0 to turn SADR off")


@dataclass(frozen=True)
class SadrOptions:
    """The SADR term's options, shared by the hyper-parameters of every editor that optimises through a forward.

    Attributes:
        sadr_gamma: γ of the SADR attention-drift term (0 = off; the paper uses 5e-3 … 8e-2).
        sadr_selective: restrain only the heads that over-attend the subject (SADR); ``false`` restrains every
            head after the edit point (the paper's all-heads ablation).
    """

    sadr_gamma: float = 0.0
    sadr_selective: bool = True

    def __post_init__(self) -> None:
        sadr_terms(self.sadr_gamma, 0, self.sadr_selective)  # the checks

    def sadr(self, first_layer: int) -> tuple[SADR, ...]:
        """The SADR term for attention drift from ``first_layer`` on (empty when γ = 0)."""
        return sadr_terms(self.sadr_gamma, first_layer, self.sadr_selective)


def sadr_terms(gamma: float, first_layer: int, selective: bool = True) -> tuple[SADR, ...]:
    """``(SADR(gamma, first_layer, selective),)`` when γ > 0, else ``()`` (the term is off).

    Raises:
        EditInputError: if γ is not a finite number ≥ 0 or ``selective`` is not a bool.
    """
    if not isinstance(selective, bool):
        raise EditInputError(f"expected sadr_selective to be true or false, got {selective!r}")
    return (SADR(gamma, first_layer, selective),) if check_sadr_gamma(gamma) > 0 else ()

"""What every objective term sees: the batch of rewriting prompts and the state of one optimisation step.

:class:`RewriteBatch` is built by :func:`kelight.editors.rewrite.build_rewrite_batch`; terms such as SADR
(:mod:`kelight.objectives.sadr`) are callables ``ExtraLoss(state) -> loss`` that the editors' inner loops
(:mod:`kelight.editors.steps`) add to the edit loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class RewriteBatch:
    """Tensors of one request's ``P`` rewriting prompts followed by its essence and relation prompts.

    The rows after the rewriting ones are read at their last token only (the KL rows): each
    request's essence prompts, then its relation prompts (:func:`~kelight.editors.rewrite.add_relation_rows`).

    Attributes:
        input_ids, attention_mask: ``(B, T)`` with ``B = P + n_essence + n_relation``.
        subject_pos: ``(B,)`` column of the subject's last token in each row (z goes there).
        target_rows, target_cols, target_ids: positions predicting o_edit tokens and the tokens.
        query_pos: ``(P,)`` column that predicts the first target token of each rewriting prompt.
        essence_pos: ``(B - P,)`` last-token column of each row after the rewriting ones (the essence
            prompts, then the relation prompts, of each request in turn).
        n_rewrite: ``P``.
        n_requests: ``R``, independent requests merged by :func:`~kelight.editors.rewrite.merge_rewrite_batches` (rows:
            every request's ``P / R`` rewriting prompts in turn, then its essence and relation
            prompts in turn); 1 for one request or for one joint objective over all rows (PathEdit).
        key_offset: attention key column of input column 0 (> 0 when the batch runs on top of a cached
            prefix, :func:`~kelight.editors.prefix.split_at_subject`); SADR's subject key is
            ``subject_pos + key_offset``.
        n_relation: relation rows in the batch, ``n_relation / R`` per request, each request's after its
            essence rows; 0 unless :func:`~kelight.editors.rewrite.add_relation_rows` added them.
        relation_candidates: tokens and subject column of the request's relation prompts, in the
            order they are taken (:func:`~kelight.objectives.relations.relation_prompts`), for
            :func:`~kelight.editors.rewrite.add_relation_rows`; empty once merged or split.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    subject_pos: torch.Tensor
    target_rows: torch.Tensor
    target_cols: torch.Tensor
    target_ids: torch.Tensor
    query_pos: torch.Tensor
    essence_pos: torch.Tensor
    n_rewrite: int
    n_requests: int = 1
    key_offset: int = 0
    n_relation: int = 0
    relation_candidates: tuple[tuple[tuple[int, ...], int], ...] = ()

    @property
    def rows(self) -> torch.Tensor:
        return torch.arange(self.input_ids.shape[0], device=self.input_ids.device)

    @property
    def request_of_row(self) -> torch.Tensor:
        """``(B,)`` the request each row belongs to (``0..n_requests-1``)."""
        n_ess = self.input_ids.shape[0] - self.n_rewrite
        per_request = torch.arange(self.n_requests, device=self.input_ids.device)
        return torch.cat([per_request.repeat_interleave(self.n_rewrite // self.n_requests),
                          per_request.repeat_interleave(n_ess // self.n_requests)])

    @property
    def first_target_ids(self) -> torch.Tensor:
        """``(R,)`` each request's first o_edit token (the first target of its first rewriting row)."""
        first = self.target_rows[None, :] == self.first_rows[:, None]  # (R, N)
        return self.target_ids[first.int().argmax(1)]

    @property
    def first_rows(self) -> torch.Tensor:
        """``(R,)`` each request's first rewriting row (its plain prompt when templates start with "{}")."""
        step = self.n_rewrite // self.n_requests
        return torch.arange(self.n_requests, device=self.input_ids.device) * step



@dataclass
class StepState:
    """What an extra loss term sees at each step (e.g. SADR reads ``attentions``).

    ``attn_offset`` is the layer of ``outputs.attentions[0]`` (or ``rows[0]``): blocks replayed
    from a cache (:attr:`~kelight.editors.locate.zopt.ZConfig.reuse_prefix`) record no attention.
    ``rows``: with :attr:`~kelight.editors.locate.zopt.ZConfig.attention_rows`, the float32 query rows
    ``(L, B, H, T)`` of every batch row in the layers that ran (:mod:`kelight.lm.attention_rows`), and
    ``outputs.attentions`` is not filled.
    """

    step: int
    batch: RewriteBatch
    outputs: object
    extras: dict = field(default_factory=dict)
    attn_offset: int = 0
    rows: torch.Tensor | None = None


ExtraLoss = Callable[[StepState], torch.Tensor]

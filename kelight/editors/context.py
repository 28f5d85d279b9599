"""Context templates and the tensor batch of one request's rewriting + essence prompts.

A rewriting prompt is ``prefix + prompt + target[:-1]`` (ROME); the value vector is injected at
the subject's last token of every prompt, the essence prompt being ``"{subject} is a"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kelight.generation import sample_tokens
from kelight.readouts import left_pad
from kelight.tokens import pad_batch, pad_id, subject_last_index, target_ids
from kelight.types import EditInputError, EditRequest

_SEEDS = ("The", "Therefore", "Because", "I", "You")


@torch.no_grad()
def sample_context_templates(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    length_params: Sequence[Sequence[int]],
    seed: int = 0,
) -> list[str]:
    """``"{}"`` plus ``n`` model-sampled prefixes of ``length`` tokens per ``[length, n]``.

    Prefixes are top-5 samples from ``"The"``, ``"Therefore"``, ... (ROME), seeded, braces removed.
    """
    templates = ["{}"]
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for length, n in length_params:
        starts = [_SEEDS[i % len(_SEEDS)] for i in range(n)]
        for start in starts:
            ids = tok(start).input_ids  # ``length`` counts them, as ROME's max_out_len
            x, mask = left_pad([ids], pad_id(tok), device)
            x, _ = sample_tokens(model, x, mask, max(int(length) - len(ids), 0), 5, gen, None, pad_id(tok))
            text = tok.decode(x[0], skip_special_tokens=True)
            templates.append(text.replace("{", " ").replace("}", " ") + ". {}")
    return templates


@dataclass
class RewriteBatch:
    """Tensors of one request's ``P`` rewriting prompts followed by its essence prompts.

    Attributes:
        input_ids, attention_mask: ``(B, T)`` with ``B = P + n_essence``.
        subject_pos: ``(B,)`` column of the subject's last token in each row (z goes there).
        target_rows, target_cols, target_ids: positions predicting o_edit tokens and the tokens.
        query_pos: ``(P,)`` column that predicts the first target token of each rewriting prompt.
        essence_pos: ``(n_essence,)`` last-token column of each essence prompt.
        n_rewrite: ``P``.
        n_requests: ``R``, independent requests merged by :func:`merge_rewrite_batches` (rows:
            every request's ``P / R`` rewriting prompts in turn, then their essence prompts in
            turn); 1 for one request or for one joint objective over all rows (PathEdit).
        key_offset: attention key column of input column 0 (> 0 when the batch runs on top of
            a cached prefix, :func:`split_at_subject`); SADR's subject key is ``subject_pos + key_offset``.
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
    def first_rows(self) -> torch.Tensor:
        """``(R,)`` each request's first rewriting row (its plain prompt when templates start with "{}")."""
        step = self.n_rewrite // self.n_requests
        return torch.arange(self.n_requests, device=self.input_ids.device) * step


def build_rewrite_batch(
    tok: PreTrainedTokenizerBase,
    request: EditRequest,
    templates: Sequence[str],
    device: torch.device | str,
    essence_templates: Sequence[str] = ("{} is a",),
) -> RewriteBatch:
    """Tokenise the rewriting and essence prompts of ``request`` into a :class:`RewriteBatch`."""
    seqs, subj, query, rows, cols, tids = [], [], [], [], [], []
    for i, template in enumerate(templates):
        text = template.format(request.prompt)
        p_ids, t_ids = target_ids(tok, text, request.target_new)
        seqs.append(p_ids + t_ids[:-1])
        subj.append(subject_last_index(tok, text, request.subject))
        query.append(len(p_ids) - 1)
        rows += [i] * len(t_ids)
        cols += list(range(len(p_ids) - 1, len(p_ids) - 1 + len(t_ids)))
        tids += t_ids
    essence = []
    for template in essence_templates:
        text = template.format(request.subject)
        ids = list(tok(text)["input_ids"])
        seqs.append(ids)
        subj.append(subject_last_index(tok, text, request.subject))
        essence.append(len(ids) - 1)
    input_ids, mask = pad_batch(seqs, pad_id(tok), device)

    def as_tensor(x: list[int]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.long, device=device)

    return RewriteBatch(
        input_ids, mask, as_tensor(subj), as_tensor(rows), as_tensor(cols), as_tensor(tids),
        as_tensor(query), as_tensor(essence), len(templates),
    )


def merge_rewrite_batches(
    batches: Sequence[RewriteBatch], pad_id: int, independent: bool = True
) -> RewriteBatch:
    """One padded batch holding the rows of several single-request batches.

    Rows: every batch's rewriting prompts in turn, then every batch's essence prompts in turn.

    Args:
        batches: one :class:`RewriteBatch` per request, each built with the same templates.
        pad_id: padding token id.
        independent: the requests keep separate objectives (``n_requests = len(batches)``: z
            optimised together for independent edits); ``False`` merges them into one joint
            objective over all rows (``n_requests = 1``, PathEdit's batch).

    Raises:
        EditInputError: if ``batches`` is empty or, when independent, their prompt counts differ.
    """
    if not batches:
        raise EditInputError("expected at least one rewrite batch to merge, got none")
    if any(b.n_requests != 1 for b in batches):
        raise EditInputError("expected single-request batches to merge; merge each request's batch once")
    n_ess = [b.input_ids.shape[0] - b.n_rewrite for b in batches]
    if independent and (len({b.n_rewrite for b in batches}) > 1 or len(set(n_ess)) > 1):
        raise EditInputError(
            f"expected every request to have the same rewriting/essence prompt counts to optimise them "
            f"together, got {sorted({(b.n_rewrite, e) for b, e in zip(batches, n_ess, strict=True)})}; "
            "build all batches with the same context and essence templates"
        )
    device = batches[0].input_ids.device
    seqs, subj, rows, cols, tids, query, ess = [], [], [], [], [], [], []
    offset = 0
    for b in batches:  # rewriting rows
        for r in range(b.n_rewrite):
            seqs.append(b.input_ids[r][b.attention_mask[r].bool()].tolist())
        subj.append(b.subject_pos[: b.n_rewrite])
        rows.append(b.target_rows + offset)
        cols.append(b.target_cols)
        tids.append(b.target_ids)
        query.append(b.query_pos)
        offset += b.n_rewrite
    for b in batches:  # essence rows
        for r in range(b.n_rewrite, b.input_ids.shape[0]):
            seqs.append(b.input_ids[r][b.attention_mask[r].bool()].tolist())
        subj.append(b.subject_pos[b.n_rewrite :])
        ess.append(b.essence_pos)
    input_ids, mask = pad_batch(seqs, pad_id, device)
    return RewriteBatch(
        input_ids, mask, torch.cat(subj), torch.cat(rows), torch.cat(cols), torch.cat(tids), torch.cat(query),
        torch.cat(ess), offset, len(batches) if independent else 1,
    )



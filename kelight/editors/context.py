"""Context templates and the tensor batch of one request's rewriting + essence prompts.

A rewriting prompt is ``prefix + prompt + target[:-1]`` (ROME); the value vector is injected at
the subject's last token of every prompt, the essence prompt being ``"{subject} is a"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kelight.readouts import left_pad
from kelight.tokens import pad_batch, subject_last_index, target_ids
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
            ids = tok(start, return_tensors="pt").input_ids.to(device)
            text = _sample(model, tok, ids, int(length), gen)
            templates.append(text.replace("{", " ").replace("}", " ") + ". {}")
    return templates


def _sample(model: PreTrainedModel, tok: PreTrainedTokenizerBase, ids: torch.Tensor, length: int,
            gen: torch.Generator) -> str:
    for _ in range(max(length - ids.shape[1], 0)):
        logits = model(input_ids=ids, use_cache=False).logits[0, -1].float().cpu()  # (V,)
        top = logits.topk(5)
        pick = top.indices[torch.multinomial(top.values.softmax(-1), 1, generator=gen)]
        ids = torch.cat([ids, pick.to(ids.device)[None]], dim=1)
    return tok.decode(ids[0], skip_special_tokens=True)


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
    input_ids, mask = pad_batch(seqs, tok.pad_token_id, device)

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


@dataclass
class PrefixSplit:
    """A batch cut at each row's subject: the prefix before it (unaffected by z) and the rest.

    Attributes:
        prefix_ids, prefix_mask: ``(B, P)`` tokens ``0 … s_b − 1`` of each row, left-padded
            (``P = max_b s_b``), run once to fill a KV cache.
        suffix: the rest of each row, right-padded ``(B, T')``, as a :class:`RewriteBatch` whose
            columns count from the subject (``subject_pos`` is 0) and whose ``key_offset`` is ``P``.
        positions: ``(B, T')`` position ids of the suffix tokens (``s_b + j``).
        mask: ``(B, P + T')`` attention mask over the cached prefix and the suffix.
    """

    prefix_ids: torch.Tensor
    prefix_mask: torch.Tensor
    suffix: RewriteBatch
    positions: torch.Tensor
    mask: torch.Tensor


def split_at_subject(batch: RewriteBatch, pad_id: int) -> PrefixSplit | None:
    """Cut every row of ``batch`` before its subject's last token (where z is added).

    In a causal model nothing before that token depends on z, so its keys and values can be
    computed once and each optimisation step runs only the rest. Returns ``None`` when no row
    has a prefix (nothing to save).
    """
    starts = batch.subject_pos.tolist()
    width = max(starts)
    if width == 0:
        return None
    device = batch.input_ids.device
    lengths = batch.attention_mask.sum(1).tolist()
    rows = [batch.input_ids[b, : lengths[b]].tolist() for b in range(len(starts))]
    prefix_ids, prefix_mask = left_pad([r[:s] for r, s in zip(rows, starts, strict=True)], pad_id, device)  # ends at P
    suffix_ids, suffix_mask = pad_batch([r[s:] for r, s in zip(rows, starts, strict=True)], pad_id, device)
    start = batch.subject_pos  # (B,)
    suffix = RewriteBatch(
        suffix_ids, suffix_mask, torch.zeros_like(start), batch.target_rows,
        batch.target_cols - start[batch.target_rows], batch.target_ids, batch.query_pos - start[: batch.n_rewrite],
        batch.essence_pos - start[batch.n_rewrite :], batch.n_rewrite, batch.n_requests, key_offset=width,
    )
    positions = start[:, None] + torch.arange(suffix_ids.shape[1], device=device)  # (B, T')
    return PrefixSplit(prefix_ids, prefix_mask, suffix, positions, torch.cat([prefix_mask, suffix_mask], 1))

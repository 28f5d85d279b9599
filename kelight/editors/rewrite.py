"""Context templates and the tensor batch of one request's rewriting + essence (+ relation) prompts.

A rewriting prompt is ``prefix + prompt + target[:-1]`` (ROME); the value vector is injected at
the subject's last token of every prompt, the essence prompt being ``"{subject} is a"`` and the
relation prompts questions about the subject's other relations (:mod:`kelight.objectives.relations`),
added by :func:`add_relation_rows` when the z optimisation weighs them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kelight.lm.generation import sample_tokens
from kelight.lm.readouts import left_pad
from kelight.lm.tokens import pad_batch, pad_id, subject_last_index, target_ids
from kelight.objectives.base import RewriteBatch
from kelight.objectives.relations import MAX_RELATION_PROMPTS, relation_prompts
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


def build_rewrite_batch(
    tok: PreTrainedTokenizerBase,
    request: EditRequest,
    templates: Sequence[str],
    device: torch.device | str,
    essence_templates: Sequence[str] = ("{} is a",),
    relation_candidates: int = MAX_RELATION_PROMPTS,
) -> RewriteBatch:
    """Tokenise the rewriting and essence prompts of ``request`` into a :class:`RewriteBatch`.

    The first ``relation_candidates`` relation prompts of the request are tokenised too, but become
    rows only through :func:`add_relation_rows` (the z optimisation adds them when it weighs them).
    """
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

    candidates = tuple((tuple(tok(text)["input_ids"]), subject_last_index(tok, text, request.subject))
                       for text in (relation_prompts(request, relation_candidates) if relation_candidates else ()))
    return RewriteBatch(
        input_ids, mask, as_tensor(subj), as_tensor(rows), as_tensor(cols), as_tensor(tids),
        as_tensor(query), as_tensor(essence), len(templates), relation_candidates=candidates,
    )


def add_relation_rows(batch: RewriteBatch, n: int, pad_id: int) -> RewriteBatch:
    """``batch`` with its request's first ``n`` relation prompts as rows after its essence rows.

    Args:
        batch: a one-request batch from :func:`build_rewrite_batch`, without relation rows.
        n: how many relation prompts (at most ``len(batch.relation_candidates)``).
        pad_id: padding token id.

    Raises:
        EditInputError: if the batch holds several requests or relation rows already, or was built
            with fewer than ``n`` relation candidates.
    """
    if batch.n_requests != 1 or batch.n_relation:
        raise EditInputError(f"expected a one-request batch without relation rows, got {batch.n_requests} "
                             f"request(s) and {batch.n_relation} relation row(s); add relation rows before merging")
    if n > len(batch.relation_candidates):
        raise EditInputError(f"expected at most {len(batch.relation_candidates)} relation prompts (the batch's "
                             f"relation_candidates), got {n}; build the batch with relation_candidates >= {n}")
    if n <= 0:
        return batch
    lengths = batch.attention_mask.sum(1).tolist()
    seqs = [batch.input_ids[b, : lengths[b]].tolist() for b in range(batch.input_ids.shape[0])]
    chosen = batch.relation_candidates[:n]
    seqs += [list(ids) for ids, _ in chosen]
    device = batch.input_ids.device
    input_ids, mask = pad_batch(seqs, pad_id, device)
    subj = torch.tensor([s for _, s in chosen], dtype=torch.long, device=device)
    ends = torch.tensor([len(ids) - 1 for ids, _ in chosen], dtype=torch.long, device=device)
    return dataclasses.replace(batch, input_ids=input_ids, attention_mask=mask,
                               subject_pos=torch.cat([batch.subject_pos, subj]),
                               essence_pos=torch.cat([batch.essence_pos, ends]), n_relation=n)


def merge_rewrite_batches(
    batches: Sequence[RewriteBatch], pad_id: int, independent: bool = True
) -> RewriteBatch:
    """One padded batch holding the rows of several single-request batches.

    Rows: every batch's rewriting prompts in turn, then every batch's essence and relation prompts in turn.

    Args:
        batches: one :class:`RewriteBatch` per request, each built with the same templates.
        pad_id: padding token id.
        independent: the requests keep separate objectives (``n_requests = len(batches)``: z
            optimised together for independent edits); ``False`` merges them into one joint
            objective over all rows (``n_requests = 1``, PathEdit's joint edits).

    Raises:
        EditInputError: if ``batches`` is empty or, when independent, their prompt counts differ; or
            if a joint objective is asked of batches with relation rows (they are weighed per request).
    """
    if not batches:
        raise EditInputError("expected at least one rewrite batch to merge, got none")
    if any(b.n_requests != 1 for b in batches):
        raise EditInputError("expected single-request batches to merge; merge each request's batch once")
    counts = {(b.n_rewrite, b.input_ids.shape[0] - b.n_rewrite - b.n_relation, b.n_relation) for b in batches}
    if independent and len(counts) > 1:
        raise EditInputError(
            f"expected every request to have the same rewriting/essence/relation prompt counts to optimise them "
            f"together, got {sorted(counts)}; build all batches with the same context and essence templates "
            "and add the same number of relation rows"
        )
    if not independent and any(b.n_relation for b in batches):
        raise EditInputError("expected no relation rows in a joint objective (independent=False): the relation "
                             "term is weighed per request; merge the batches before add_relation_rows, or not at all")
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
    for b in batches:  # essence rows, then relation rows, of each request
        for r in range(b.n_rewrite, b.input_ids.shape[0]):
            seqs.append(b.input_ids[r][b.attention_mask[r].bool()].tolist())
        subj.append(b.subject_pos[b.n_rewrite :])
        ess.append(b.essence_pos)
    input_ids, mask = pad_batch(seqs, pad_id, device)
    return RewriteBatch(
        input_ids, mask, torch.cat(subj), torch.cat(rows), torch.cat(cols), torch.cat(tids), torch.cat(query),
        torch.cat(ess), offset, len(batches) if independent else 1, n_relation=sum(b.n_relation for b in batches),
    )



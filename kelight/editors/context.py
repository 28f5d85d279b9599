"""Context templates and the tensor batch of one request's rewriting + essence prompts.

A rewriting prompt is ``prefix + prompt + target[:-1]`` (ROME); the value vector is injected at
the subject's last token of every prompt, the essence prompt being ``"{subject} is a"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kelight.tokens import pad_batch, subject_last_index, target_ids
from kelight.types import EditRequest

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

    @property
    def rows(self) -> torch.Tensor:
        return torch.arange(self.input_ids.shape[0], device=self.input_ids.device)


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

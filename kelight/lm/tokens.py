"""Tokenisation helpers: prompt + target splits, subject positions, padding.

Targets are appended with one separating space (``prompt + " " + target``) and located by
tokenising the prompt alone: the target tokens are whatever follows the prompt's tokens. If a
tokenizer merges across that boundary, the target is tokenised on its own instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from kelight.types import EditInputError


def _encode(tok: PreTrainedTokenizerBase, text: str) -> list[int]:
    ids = tok(text, add_special_tokens=True)["input_ids"]
    return list(ids)


def target_ids(tok: PreTrainedTokenizerBase, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt`` and of ``target`` as it continues the prompt after a space.

    Raises:
        EditInputError: if the target is empty or tokenises to nothing.
    """
    if not isinstance(target, str) or not target.strip():
        raise EditInputError(f"expected a non-empty target after prompt {prompt!r}, got {target!r}")
    prompt_ids = _encode(tok, prompt)
    full = _encode(tok, f"{prompt} {target.strip()}")
    if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
        tgt = full[len(prompt_ids):]
    else:
        tgt = list(tok(" " + target.strip(), add_special_tokens=False)["input_ids"])
    if not tgt:
        raise EditInputError(
            f"target {target!r} tokenises to no tokens with this tokenizer; choose another target"
        )
    return prompt_ids, tgt


def subject_last_index(tok: PreTrainedTokenizerBase, text: str, subject: str) -> int:
    """Index of the last token of the last occurrence of ``subject`` in ``tok(text)``.

    Raises:
        EditInputError: if the subject is not in the text.
    """
    start = text.rfind(subject)
    if not subject or start < 0:
        raise EditInputError(f"subject {subject!r} does not occur in {text!r}; the prompt must contain it")
    end = start + len(subject)
    enc = tok(text, add_special_tokens=True, return_offsets_mapping=True)
    last = None
    for i, (a, b) in enumerate(enc["offset_mapping"]):
        if b > a and a < end:
            last = i
    if last is None:
        raise EditInputError(f"subject {subject!r} maps to no token in {text!r}")
    return last


def pad_id(tok: PreTrainedTokenizerBase) -> int:
    """The id that fills padded slots: the tokenizer's pad token, else 0 (always masked out)."""
    return tok.pad_token_id if tok.pad_token_id is not None else 0


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu") -> tuple[
    torch.Tensor, torch.Tensor
]:
    """Right-pad ``seqs`` into ``(input_ids, attention_mask)``, both ``(B, T)``."""
    if not seqs:
        raise ValueError("expected at least one sequence to pad")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)

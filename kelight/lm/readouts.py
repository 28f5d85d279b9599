"""Teacher-forced read-outs: log-probability and argmax of each target token after its prompt.

Two paths compute the same numbers:

* :func:`readouts` runs every ``prompt + target`` sequence in full (right-padded);
* :func:`shared_prompt_readouts` runs each distinct prompt once (left-padded, with a KV cache),
  gathers the cache for every target that follows it and runs only the targets on top. A probe
  is scored for two targets (o_edit and o_true) and the distracting-neighbourhood prompts are
  long, so this roughly halves the tokens an evaluation computes.

The LM head runs only on the positions that predict target tokens (:func:`kelight.lm.forward.head`).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from kelight.lm.forward import head, logits_at
from kelight.lm.tokens import pad_batch

# One read-out per sequence: (log-probs, argmax predictions, target ids), each (T,) on CPU.
Readout = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def cache_keyword(model: PreTrainedModel) -> str:
    """``cache`` in transformers >= 5.2x, ``past_key_values`` before (deprecated since)."""
    params = inspect.signature(model.base_model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``(input_ids, attention_mask)``, both ``(B, T)``."""
    ids, mask = pad_batch([list(s)[::-1] for s in seqs], pad_id, device)
    return ids.flip(1), mask.flip(1)


def _split(logits: torch.Tensor, targets: torch.Tensor, lengths: Sequence[int]) -> list[Readout]:
    logits = logits.float()  # (M, V)
    logprobs = logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)  # (M,)
    preds = logits.argmax(-1)  # (M,)
    return list(zip(logprobs.cpu().split(list(lengths)), preds.cpu().split(list(lengths)),
                    targets.cpu().split(list(lengths)), strict=True))


def _full_chunk(model: PreTrainedModel, seqs: Sequence[Sequence[int]], starts: Sequence[int],
                pad_id: int) -> list[Readout]:
    device = model.device
    ids, mask = pad_batch(seqs, pad_id, device)  # (B, T) each, right-padded
    lengths = [len(s) - st for s, st in zip(seqs, starts, strict=True)]
    rows = torch.repeat_interleave(torch.arange(len(seqs)), torch.tensor(lengths)).to(device)  # (M,)
    cols = torch.cat([torch.arange(st - 1, len(s) - 1) for s, st in zip(seqs, starts, strict=True)])
    cols = cols.to(device)  # (M,) positions whose logits predict the target tokens
    return _split(logits_at(model, ids, mask, rows, cols), ids[rows, cols + 1], lengths)


@torch.no_grad()
def readouts(model: PreTrainedModel, seqs: Sequence[Sequence[int]], starts: Sequence[int], pad_id: int,
             chunk: int) -> list[Readout]:
    """Read-out of tokens ``seq[start:]`` of every full sequence, ``chunk`` sequences per forward."""
    out: list[Readout] = []
    for lo in range(0, len(seqs), chunk):
        out.extend(_full_chunk(model, seqs[lo : lo + chunk], starts[lo : lo + chunk], pad_id))
    return out


def _shared_chunk(model: PreTrainedModel, prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]],
                  pad_id: int) -> list[Readout]:
    device = model.device
    distinct: dict[tuple[int, ...], int] = {}
    owner = torch.tensor([distinct.setdefault(tuple(p), len(distinct)) for p in prompts], device=device)  # (S,)
    ids, mask = left_pad(list(distinct), pad_id, device)  # (U, Tp)
    kw = cache_keyword(model)
    out = model.base_model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                           use_cache=True)
    stacked = out.last_hidden_state[:, -1][owner][:, None]  # (S, 1, D): predicts each first target token
    rest = [list(t[:-1]) for t in targets]  # target tokens fed as input (the last one is only predicted)
    if max(len(r) for r in rest) > 0:
        cache = getattr(out, kw)
        cache.reorder_cache(owner)  # one copy of its prompt's keys/values per target
        t_ids, t_mask = pad_batch(rest, pad_id, device)  # (S, W) right-padded
        positions = mask.sum(1)[owner, None] + torch.arange(t_ids.shape[1], device=device)  # (S, W)
        later = model.base_model(input_ids=t_ids, attention_mask=torch.cat([mask[owner], t_mask], 1),
                                 position_ids=positions, use_cache=True, **{kw: cache}).last_hidden_state
        stacked = torch.cat([stacked, later], 1)  # (S, 1 + W, D): column j predicts target token j
    lengths = [len(t) for t in targets]
    rows = torch.repeat_interleave(torch.arange(len(targets)), torch.tensor(lengths)).to(device)  # (M,)
    cols = torch.cat([torch.arange(n) for n in lengths]).to(device)  # (M,)
    hidden = stacked[rows, cols]  # (M, D)
    tgt = torch.tensor([t for ts in targets for t in ts], device=device)  # (M,)
    return _split(head(model, hidden), tgt, lengths)


@torch.no_grad()
def shared_prompt_readouts(model: PreTrainedModel, prompts: Sequence[Sequence[int]],
                           targets: Sequence[Sequence[int]], pad_id: int, chunk: int) -> list[Readout]:
    """Read-out of each ``targets[i]`` after ``prompts[i]``, running each distinct prompt once per chunk.

    Equal (to float rounding) to :func:`readouts` on ``prompts[i] + targets[i]``; ``chunk``
    targets per pair of forwards. Prompts must be non-empty and targets non-empty.
    """
    out: list[Readout] = []
    for lo in range(0, len(prompts), chunk):
        out.extend(_shared_chunk(model, prompts[lo : lo + chunk], targets[lo : lo + chunk], pad_id))
    return out

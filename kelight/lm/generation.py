"""Decoding with a KV cache, batched with left padding: one loop, two ways to choose a token.

* top-k sampling (:func:`generate`, :func:`sample_tokens`): fluency generations (ROME's ``generate_fast``)
  and the context-template prefixes of the locate-then-edit editors;
* greedy decoding up to an answer's natural end (:func:`greedy_answers`): the generated answers of the
  wild evaluation protocol (:mod:`kelight.evaluation.scoring`).

Natural end of an answer (:func:`answer_text`): the generated text, leading whitespace dropped, is cut
before its first line break or before the first ``.``, ``!``, ``?`` or ``;`` that is followed by whitespace
or ends the text (the end of the first sentence or clause; a ``.`` inside ``3.5`` or ``U.S`` does not end
it, the one after ``St`` in ``St. Louis`` does). Commas do not end an answer (``Paris, France`` stays
whole). A row also stops at a special token (its end of sequence, or a chat-turn marker) and after
``max_new_tokens`` tokens. Decoding stops per row as soon as its end is certain, i.e. once a line break,
or a terminator and the whitespace after it, has been generated.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kelight.lm.forward import head
from kelight.lm.hooks import row_weight_changes
from kelight.lm.readouts import cache_keyword, left_pad
from kelight.lm.tokens import pad_id
from kelight.types import EditInputError

# (B, V) logits -> (B,) next token ids; (B, T) ids so far and (B,) the token just appended -> (B,) row finished
Pick = Callable[[torch.Tensor], torch.Tensor]
Finished = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_ENDED = re.compile(r"[\n\r]|[.!?;](?=\s)")  # an end that more tokens cannot undo
_END = re.compile(r"[\n\r]|[.!?;](?=\s|$)")  # an end, counting a terminator that closes the text


def top_k_sample(logits: torch.Tensor, top_k: int, generator: torch.Generator) -> torch.Tensor:
    """One token per row of ``logits`` ``(B, V)``, drawn from the softmax over its ``top_k`` largest."""
    top = logits.topk(min(top_k, logits.size(-1)), dim=-1)  # (B, k)
    choice = torch.multinomial(top.values.softmax(-1), 1, generator=generator)  # (B, 1)
    return top.indices.gather(1, choice).squeeze(1)  # (B,)


def extend_tokens(
    model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, steps: int, pick: Pick, finished: Finished,
    fill_id: int, on_step: Callable[[], object] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Extend left-padded ``ids``/``mask`` ``(B, T)`` by up to ``steps`` tokens chosen by ``pick`` (KV cache).

    After each step ``finished(ids, new)`` says which rows are done; a done row's later slots hold
    ``fill_id`` with mask 0, and decoding stops when every row is done. ``on_step`` is called after each
    step (a progress bar's update).
    """
    cache_kw = cache_keyword(model)
    past, step = None, ids
    done = torch.zeros(ids.size(0), dtype=torch.bool, device=ids.device)
    for _ in range(steps):
        positions = (mask.cumsum(1) - 1).clamp(min=0)[:, -step.size(1) :]  # (B, t)
        out = model.base_model(input_ids=step, attention_mask=mask, position_ids=positions,
                               use_cache=True, **{cache_kw: past})
        past = getattr(out, cache_kw)
        nxt = pick(head(model, out.last_hidden_state[:, -1])).to(ids.device)  # (B,)
        nxt = nxt.masked_fill(done, fill_id)
        ids = torch.cat([ids, nxt[:, None]], dim=1)  # (B, T + 1)
        mask = torch.cat([mask, (~done).to(mask.dtype)[:, None]], dim=1)  # (B, T + 1)
        done |= finished(ids, nxt).to(done.device)
        if on_step is not None:
            on_step()
        if done.all():
            break
        step = nxt[:, None]  # (B, 1)
    return ids, mask


def sample_tokens(
    model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, steps: int, top_k: int,
    generator: torch.Generator, eos_id: int | None, fill_id: int, on_step: Callable[[], object] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Extend left-padded ``ids``/``mask`` ``(B, T)`` by up to ``steps`` sampled tokens (KV cache; ``on_step``
    as in :func:`extend_tokens`).

    Draws on ``generator``'s device (logits move there), so a CPU generator gives the same samples
    whatever device the model is on. A row that emits ``eos_id`` stops; later slots hold ``fill_id``
    with mask 0. ``eos_id=None`` never stops early.
    """
    def pick(logits: torch.Tensor) -> torch.Tensor:
        return top_k_sample(logits.float().to(generator.device), top_k, generator)

    def finished(_: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
        return nxt == eos_id if eos_id is not None else torch.zeros_like(nxt, dtype=torch.bool)

    return extend_tokens(model, ids, mask, steps, pick, finished, fill_id, on_step)


@torch.no_grad()
def generate(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: Sequence[str], max_new_tokens: int = 100,
    top_k: int = 5, seed: int = 0,
) -> list[str]:
    """Top-k sampled continuations (ROME's ``generate_fast``), batched with left padding.

    Deterministic given ``seed`` (a private ``torch.Generator``; the global RNG is untouched), but
    a prompt's sample depends on the batch it is drawn in. A sequence stops at EOS. Unlike ROME,
    whose ``max_out_len=100`` counts the prompt, ``max_new_tokens`` counts only new tokens.

    Returns:
        The decoded texts, prompt included (what ROME scores for fluency), special tokens dropped.
    """
    if top_k < 1:
        raise ValueError(f"expected top_k >= 1, got {top_k}")
    if max_new_tokens < 0:
        raise ValueError(f"expected max_new_tokens >= 0, got {max_new_tokens}")
    if not prompts:
        return []
    ids, mask = left_pad(_encode_prompts(tok, prompts), pad_id(tok), model.device)  # (B, T)
    generator = torch.Generator(device=model.device).manual_seed(seed)
    ids, mask = sample_tokens(model, ids, mask, max_new_tokens, top_k, generator, tok.eos_token_id, pad_id(tok))
    return [tok.decode(row[keep.bool()].tolist(), skip_special_tokens=True) for row, keep in zip(ids, mask,
                                                                                                 strict=True)]


def _encode_prompts(tok: PreTrainedTokenizerBase, prompts: Sequence[str]) -> list[list[int]]:
    seqs = [list(tok(p, add_special_tokens=True)["input_ids"]) for p in prompts]
    if not all(seqs):
        raise EditInputError(f"expected generation prompts that tokenise to tokens, got {list(prompts)!r}")
    return seqs


# ---- greedy answers ---------------------------------------------------------------------
def answer_text(continuation: str) -> str:
    """The answer in a generated continuation: leading whitespace dropped, cut before its natural end
    (see the module doc), surrounding whitespace stripped.

    Example:
        >>> answer_text(" Paris, France. It is the capital")
        'Paris, France'
        >>> answer_text(" 3.5 million people\\nlive there"), answer_text(" Rome.")
        ('3.5 million people', 'Rome')
    """
    text = continuation.lstrip()
    end = _END.search(text)
    return (text[: end.start()] if end else text).strip()


def answer_ended(continuation: str) -> bool:
    """Whether the continuation's answer has certainly ended (no later token can extend it)."""
    return _ENDED.search(continuation.lstrip()) is not None


def stop_ids(model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end an answer: the tokenizer's special tokens (EOS, chat-turn markers, ...) and the
    model's generation-config EOS ids."""
    ids = set(tok.all_special_ids)
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update([config_eos] if isinstance(config_eos, int) else config_eos or [])
    return sorted(ids)


def greedy_tokens(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, ids: torch.Tensor, mask: torch.Tensor, steps: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Extend left-padded ``ids``/``mask`` ``(B, T)`` greedily (argmax) until each row's answer has ended
    (:func:`answer_ended`, or a :func:`stop_ids` token) or ``steps`` tokens were generated."""
    width = ids.size(1)
    stops = torch.tensor(stop_ids(model, tok), device=ids.device)

    def finished(so_far: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
        done = torch.isin(nxt, stops)  # (B,)
        rows = [int(i) for i in (~done).nonzero().flatten()]
        texts = tok.batch_decode(so_far[rows, width:].tolist(), skip_special_tokens=True) if rows else []
        for row, text in zip(rows, texts, strict=True):
            done[row] = answer_ended(text)
        return done

    return extend_tokens(model, ids, mask, steps, lambda logits: logits.argmax(-1), finished, pad_id(tok))


@torch.no_grad()
def greedy_answers(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: Sequence[str], max_new_tokens: int = 32,
    batch_size: int = 64, changes: Sequence[Mapping[nn.Module, torch.Tensor]] = (),
    groups: Sequence[int] | None = None,
) -> list[str]:
    """Greedy answer to each prompt (:func:`answer_text` of its continuation), ``batch_size`` prompts per
    left-padded, KV-cached batch.

    Deterministic: the same prompts give the same answers. Prompts are batched in order of token length
    (less padding); a prompt's answer does not depend on its batch beyond float rounding.

    ``changes`` and ``groups``: prompt ``i`` is answered by the model with the weight changes
    ``changes[groups[i]]`` added on its row only (:func:`~kelight.lm.hooks.row_weight_changes`): the answers
    of many edited models in one batch, each equal to its own model's up to float rounding.

    Raises:
        ValueError: ``max_new_tokens`` or ``batch_size`` below 1.
        EditInputError: a prompt that tokenises to nothing.
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"expected max_new_tokens >= 1 and batch_size >= 1, got {max_new_tokens} and {batch_size}")
    if changes and (groups is None or len(groups) != len(prompts)):
        raise ValueError(f"expected a group per prompt with changes, got {0 if groups is None else len(groups)} "
                         f"groups for {len(prompts)} prompts")
    seqs = _encode_prompts(tok, prompts)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    answers: dict[int, str] = {}
    for lo in range(0, len(order), batch_size):
        chunk = order[lo : lo + batch_size]
        ids, mask = left_pad([seqs[i] for i in chunk], pad_id(tok), model.device)  # (B, T)
        width = ids.size(1)
        with row_weight_changes(changes, [groups[i] for i in chunk] if changes else []):
            ids, mask = greedy_tokens(model, tok, ids, mask, max_new_tokens)
        for i, row, keep in zip(chunk, ids[:, width:], mask[:, width:].bool(), strict=True):
            answers[i] = answer_text(tok.decode(row[keep].tolist(), skip_special_tokens=True))
    return [answers[i] for i in range(len(seqs))]

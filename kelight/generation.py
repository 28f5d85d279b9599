"""Top-k sampling with a KV cache, batched with left padding: fluency generations (ROME's
``generate_fast``) and the context-template prefixes of the locate-then-edit editors."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kelight.lm import head
from kelight.readouts import cache_keyword, left_pad
from kelight.tokens import pad_id
from kelight.types import EditInputError


def top_k_sample(logits: torch.Tensor, top_k: int, generator: torch.Generator) -> torch.Tensor:
    """One token per row of ``logits`` ``(B, V)``, drawn from the softmax over its ``top_k`` largest."""
    top = logits.topk(min(top_k, logits.size(-1)), dim=-1)  # (B, k)
    choice = torch.multinomial(top.values.softmax(-1), 1, generator=generator)  # (B, 1)
    return top.indices.gather(1, choice).squeeze(1)  # (B,)


def sample_tokens(
    model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, steps: int, top_k: int,
    generator: torch.Generator, eos_id: int | None, fill_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Extend left-padded ``ids``/``mask`` ``(B, T)`` by up to ``steps`` sampled tokens (KV cache).

    Draws on ``generator``'s device (logits move there), so a CPU generator gives the same samples
    whatever device the model is on. A row that emits ``eos_id`` stops; later slots hold ``fill_id``
    with mask 0. ``eos_id=None`` never stops early.
    """
    cache_kw = cache_keyword(model)
    past, step = None, ids
    done = torch.zeros(ids.size(0), dtype=torch.bool, device=ids.device)
    for _ in range(steps):
        positions = (mask.cumsum(1) - 1).clamp(min=0)[:, -step.size(1) :]  # (B, t)
        out = model.base_model(input_ids=step, attention_mask=mask, position_ids=positions,
                               use_cache=True, **{cache_kw: past})
        past = getattr(out, cache_kw)
        logits = head(model, out.last_hidden_state[:, -1]).float().to(generator.device)  # (B, V)
        nxt = top_k_sample(logits, top_k, generator).to(ids.device)  # (B,)
        nxt = nxt.masked_fill(done, fill_id)
        ids = torch.cat([ids, nxt[:, None]], dim=1)  # (B, T + 1)
        mask = torch.cat([mask, (~done).to(mask.dtype)[:, None]], dim=1)  # (B, T + 1)
        if eos_id is not None:
            done |= nxt == eos_id
        if done.all():
            break
        step = nxt[:, None]  # (B, 1)
    return ids, mask


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
    seqs = [list(tok(p, add_special_tokens=True)["input_ids"]) for p in prompts]
    if not all(seqs):
        raise EditInputError(f"expected generation prompts that tokenise to tokens, got {list(prompts)!r}")
    ids, mask = left_pad(seqs, pad_id(tok), model.device)  # (B, T)
    generator = torch.Generator(device=model.device).manual_seed(seed)
    ids, mask = sample_tokens(model, ids, mask, max_new_tokens, top_k, generator, tok.eos_token_id, pad_id(tok))
    return [tok.decode(row[keep.bool()].tolist(), skip_special_tokens=True) for row, keep in zip(ids, mask,
                                                                                                 strict=True)]

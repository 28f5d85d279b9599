"""Language-model read-outs that run the LM head only on the positions that are scored.

On CPU the LM head dominates evaluation when every position's logits are computed (49k-262k
vocabularies), so :func:`logits_at` applies it to the gathered hidden states alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import PreTrainedModel


def final_hidden(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states after the final norm, ``(B, T, D)``."""
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


def head(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """Logits for ``hidden`` ``(..., D)`` -> ``(..., V)``, with the model's logit soft-capping."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def logits_at(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
) -> torch.Tensor:
    """Logits at positions ``(rows[i], cols[i])`` only: ``(N, V)`` for ``N`` positions."""
    hidden = final_hidden(model, input_ids, attention_mask)  # (B, T, D)
    return head(model, hidden[rows, cols])  # (N, V)


@contextmanager
def attention_implementation(model: PreTrainedModel, name: str | None) -> Iterator[None]:
    """Temporarily switch the attention kernel (e.g. ``"eager"`` to get attention weights)."""
    before = model.config._attn_implementation
    if name is None or name == before:
        yield
        return
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(before)

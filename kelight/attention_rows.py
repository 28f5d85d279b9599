"""An attention kernel that returns only the attention rows a loss needs (SADR's query rows).

SADR reads one row of every head's attention matrix per prompt: the position that predicts the
first target token. Eager attention materialises all ``T × T`` weights of every layer to return
them; this kernel computes the attention output with SDPA and, for each batch row ``b``, the
weights of the single query position ``query_pos[b]``: ``(B, H, 1, T)`` per layer.

It is registered with transformers' attention and mask interfaces under :data:`KERNEL` (their
registries are keyed by name; registering again is harmless) and switched on per model with
:func:`query_row_attention`, which also tells each attention module its query positions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kelight.hooks import module_attributes
from kelight.lm import attention_implementation
from kelight.models.adapters import adapter_for

KERNEL = "kelight_query_rows"
_QUERY_POS = "_kelight_query_pos"  # attribute set on each attention module while inside the context


def _row_mask(attention_mask: torch.Tensor | None, rows: torch.Tensor, n_keys: int, n_queries: int) -> torch.Tensor:
    """Which keys each row's query may attend, ``(B, 1, T)``; ``None`` means plain causal (the
    queries being the last ``n_queries`` of the ``n_keys`` positions, as over a KV cache)."""
    if attention_mask is None:
        keys = torch.arange(n_keys, device=rows.device)
        return (keys[None, :] <= rows[:, None] + (n_keys - n_queries))[:, None]  # (B, 1, T)
    batch = torch.arange(rows.shape[0], device=rows.device)
    mask = attention_mask[batch, :, rows]  # (B, 1 or H, T)
    return mask if mask.dtype == torch.bool else mask == 0


def row_attention_forward(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0, **kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SDPA output ``(B, T, H, d)`` and the weights of row ``module._kelight_query_pos[b]`` ``(B, H, 1, T)``."""
    if kwargs.get("softcap") is not None:
        raise NotImplementedError(f"{KERNEL} does not implement attention logit soft-capping; use eager attention")
    sdpa_kwargs = {k: v for k, v in kwargs.items() if k != "output_attentions"}  # the rows are returned here
    out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                    **sdpa_kwargs)
    rows = getattr(module, _QUERY_POS, None)
    if rows is None or query.shape[2] == 1:
        return out, None
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    batch = torch.arange(query.shape[0], device=query.device)
    q = query[batch, :, rows]  # (B, H, d)
    k = repeat_kv(key, query.shape[1] // key.shape[1])  # (B, H, T, d)
    scores = torch.einsum("bhd,bhtd->bht", q.float(), k.float()) * scale  # (B, H, T)
    allowed = _row_mask(attention_mask, rows, key.shape[2], query.shape[2])
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    return out, scores.softmax(-1).to(query.dtype)[:, :, None]  # (B, H, 1, T)


def _register() -> None:
    AttentionInterface.register(KERNEL, row_attention_forward)
    AttentionMaskInterface.register(KERNEL, sdpa_mask)


@contextmanager
def query_row_attention(model: PreTrainedModel, query_pos: torch.Tensor) -> Iterator[None]:
    """While inside, attention weights are returned for row ``query_pos[b]`` of batch row ``b`` only.

    Args:
        model: the model (its attention modules come from its adapter).
        query_pos: ``(B,)`` query position of every batch row of the forwards run inside.
    """
    _register()
    modules = adapter_for(model).every_layer(model, "attn")
    with attention_implementation(model, KERNEL), module_attributes(modules, _QUERY_POS, [query_pos] * len(modules)):
        yield

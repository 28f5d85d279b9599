"""An attention kernel that returns only the attention rows a loss needs (SADR's query rows).

SADR reads one row of every head's attention matrix per prompt: the position that predicts the
first target token. Eager attention materialises all ``T × T`` weights of every layer to return
them; this kernel computes the attention output with SDPA and records, for each batch row ``b``,
the query at position ``query_pos[b]`` and the keys. :meth:`QueryRows.take` then turns the records
of all layers into their rows ``(L, B, H, T)`` with one batched product, mask and softmax, instead
of ~55 small operators per layer (forward + backward) — which is what a single request's step pays
on a GPU, where it is launch-bound (``benchmarks/op_count.py``).

It is registered with transformers' attention and mask interfaces under :data:`KERNEL` (their
registries are keyed by name; registering again is harmless) and switched on per model with
:func:`query_row_attention`, which gives each attention module the recorder.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kelight.lm.forward import attention_implementation
from kelight.lm.hooks import module_attributes
from kelight.models.adapters import adapter_for

KERNEL = "kelight_query_rows"
_RECORDER = "_kelight_query_rows"  # attribute set on each attention module while inside the context


def _row_mask(attention_mask: torch.Tensor | None, rows: torch.Tensor, n_keys: int, n_queries: int) -> torch.Tensor:
    """Which keys each row's query may attend, ``(B, 1, T)``; ``None`` means plain causal (the
    queries being the last ``n_queries`` of the ``n_keys`` positions, as over a KV cache)."""
    if attention_mask is None:
        keys = torch.arange(n_keys, device=rows.device)
        return (keys[None, :] <= rows[:, None] + (n_keys - n_queries))[:, None]  # (B, 1, T)
    batch = torch.arange(rows.shape[0], device=rows.device)
    mask = attention_mask[batch, :, rows]  # (B, 1 or H, T)
    return mask if mask.dtype == torch.bool else mask == 0


class QueryRows:
    """The query rows of one forward's attention layers, recorded layer by layer, computed at once.

    Args:
        query_pos: ``(B,)`` query position of every batch row.
    """

    def __init__(self, query_pos: torch.Tensor) -> None:
        self.query_pos = query_pos
        self.batch = torch.arange(query_pos.shape[0], device=query_pos.device)
        self._queries: list[torch.Tensor] = []  # (B, H, d) per layer
        self._keys: list[torch.Tensor] = []  # (B, H_kv, T, d) per layer
        self._allowed: list[torch.Tensor] = []  # (B, 1, T) per layer
        self._scales: list[float] = []
        self._masks: list[tuple] = []  # per distinct layer mask of this forward: (that mask, shape, row mask)

    def record(self, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
               scale: float) -> None:
        """Keep one layer's query rows and keys (``query`` ``(B, H, T_q, d)``, ``key`` ``(B, H_kv, T, d)``)."""
        shape = (key.shape[2], query.shape[2])  # keys, queries
        # layers share their mask tensor within a forward: one row mask per distinct (mask, shape);
        # found by identity, not id(), which torch.compile cannot carry across a graph
        allowed = next((rows for mask, at, rows in self._masks if mask is attention_mask and at == shape), None)
        if allowed is None:
            allowed = _row_mask(attention_mask, self.query_pos, *shape)
            self._masks.append((attention_mask, shape, allowed))
        self._queries.append(query[self.batch, :, self.query_pos])
        self._keys.append(key)
        self._allowed.append(allowed)
        self._scales.append(scale)

    def take(self) -> torch.Tensor | None:
        """Float32 attention rows ``(L, B, H, T)`` of the layers recorded since the last call, in
        layer order (``None`` if none ran); the records are cleared."""
        if not self._queries:
            return None
        queries, keys, allowed, scales = self._queries, self._keys, self._allowed, self._scales
        self._queries, self._keys, self._allowed, self._scales, self._masks = [], [], [], [], []
        if len({k.shape for k in keys}) > 1:
            raise RuntimeError(f"query rows need one key shape in every layer, got {sorted({k.shape for k in keys})}")
        q = torch.stack(queries).float()  # (L, B, H, d)
        k = torch.stack(keys).float()  # (L, B, H_kv, T, d)
        n_layers, n_rows, n_heads, dim = q.shape
        n_kv = k.shape[2]  # head h reads key head h // (H / H_kv), as transformers' repeat_kv
        scores = torch.einsum("lbkgd,lbktd->lbkgt", q.view(n_layers, n_rows, n_kv, n_heads // n_kv, dim), k)
        scale = torch.tensor(scales, device=q.device).view(-1, 1, 1, 1) if len(set(scales)) > 1 else scales[0]
        scores = scores.reshape(n_layers, n_rows, n_heads, -1) * scale  # (L, B, H, T)
        scores = scores.masked_fill(~torch.stack(allowed), torch.finfo(scores.dtype).min)
        return scores.softmax(-1)


def row_attention_forward(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0, **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """SDPA output ``(B, T, H, d)``; the query rows and keys go to the module's :class:`QueryRows`."""
    if kwargs.get("softcap") is not None:
        raise NotImplementedError(f"{KERNEL} does not implement attention logit soft-capping; use eager attention")
    sdpa_kwargs = {k: v for k, v in kwargs.items() if k != "output_attentions"}  # the rows are recorded here
    out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                    **sdpa_kwargs)
    recorder = getattr(module, _RECORDER, None)
    if recorder is not None and query.shape[2] > 1:
        recorder.record(query, key, attention_mask, scaling if scaling is not None else query.shape[-1] ** -0.5)
    return out, None


def _register() -> None:
    AttentionInterface.register(KERNEL, row_attention_forward)
    AttentionMaskInterface.register(KERNEL, sdpa_mask)


@contextmanager
def query_row_attention(model: PreTrainedModel, query_pos: torch.Tensor) -> Iterator[QueryRows]:
    """While inside, every forward records the attention row ``query_pos[b]`` of batch row ``b``;
    read each forward's rows with :meth:`QueryRows.take` on the yielded recorder.

    Args:
        model: the model (its attention modules come from its adapter).
        query_pos: ``(B,)`` query position of every batch row of the forwards run inside.
    """
    _register()
    modules = adapter_for(model).every_layer(model, "attn")
    recorder = QueryRows(query_pos)
    with attention_implementation(model, KERNEL), module_attributes(modules, _RECORDER, [recorder] * len(modules)):
        yield recorder

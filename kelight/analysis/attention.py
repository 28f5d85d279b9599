"""Attention weights of a model: read the last token's rows, record whole maps, replay stored ones.

Recording and replaying go through one attention function registered with transformers'
``AttentionInterface`` under the name ``"kelight_patch"``. It calls the family's own eager
attention (so masks, soft-capping and sliding windows behave as in ``"eager"``) and, for an
attention module that carries a replacement, recomputes the output from the stored weights:
``out = W_stored @ V`` (``V`` repeated over grouped-query heads), the eager layout ``(B, T, H, d)``.
The per-module state lives on the module while a context manager is active and is removed in
``finally``; the model's parameters are never touched.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch
from transformers import PreTrainedModel

from kelight.lm.forward import attention_implementation
from kelight.lm.hooks import module_attributes
from kelight.lm.tokens import pad_batch
from kelight.models.adapters import adapter_for
from kelight.objectives.sadr import query_rows

PATCH_IMPLEMENTATION = "kelight_patch"
_RECORD = "_kelight_attn_record"  # list the module appends its weights to
_REPLACE = "_kelight_attn_replace"  # (B, H, T, T) weights that replace the module's own


def _patchable_attention(module, query, key, value, attention_mask, **kwargs):
    eager = sys.modules[type(module).__module__].eager_attention_forward  # this family's eager attention
    out, weights = eager(module, query, key, value, attention_mask, **kwargs)
    replacement = getattr(module, _REPLACE, None)
    if replacement is not None:
        if replacement.shape != weights.shape:
            raise ValueError(
                f"stored attention weights {tuple(replacement.shape)} do not match this forward's "
                f"{tuple(weights.shape)}; replay on exactly the batch they were recorded on"
            )
        weights = replacement.to(value.dtype)  # (B, H, T, T)
        v = value.repeat_interleave(weights.shape[1] // value.shape[1], dim=1)  # (B, H, T, d), GQA groups
        out = (weights @ v).transpose(1, 2).contiguous()  # (B, T, H, d) as eager returns it
    record = getattr(module, _RECORD, None)
    if record is not None:
        record.append(weights.detach())
    return out, weights


def _register() -> None:
    """Register the attention (and its eager mask) once per process, on first use."""
    from transformers import AttentionInterface  # noqa: PLC0415
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface  # noqa: PLC0415

    if PATCH_IMPLEMENTATION not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionInterface.register(PATCH_IMPLEMENTATION, _patchable_attention)
        AttentionMaskInterface.register(PATCH_IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["eager"])


def attention_modules(model: PreTrainedModel) -> list[torch.nn.Module]:
    """The self-attention module of every layer, from the architecture adapter."""
    return adapter_for(model).every_layer(model, "attn")


@contextmanager
def record_attention(model: PreTrainedModel) -> Iterator[list[list[torch.Tensor]]]:
    """Record every layer's attention weights: ``records[layer]`` gets one ``(B, H, T, T)`` per forward."""
    _register()
    modules = attention_modules(model)
    records: list[list[torch.Tensor]] = [[] for _ in modules]
    with attention_implementation(model, PATCH_IMPLEMENTATION), module_attributes(modules, _RECORD, records):
        yield records


@contextmanager
def replace_attention(model: PreTrainedModel, weights: dict[int, torch.Tensor]) -> Iterator[None]:
    """Forwards inside use ``weights[layer]`` ``(B, H, T, T)`` as the attention of those layers."""
    _register()
    modules = attention_modules(model)
    chosen = [modules[layer] for layer in weights]
    with ExitStack() as stack:
        stack.enter_context(attention_implementation(model, PATCH_IMPLEMENTATION))
        stack.enter_context(module_attributes(chosen, _REPLACE, list(weights.values())))
        yield


@torch.no_grad()
def last_token_rows(model: PreTrainedModel, seqs: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """Attention of each sequence's last token over its keys, every layer: ``(L, P, H, T)``.

    Sequences are right-padded; padded key columns carry zero weight.
    """
    ids, mask = pad_batch(seqs, pad_id, model.device)  # (P, T) each
    query = torch.tensor([len(s) - 1 for s in seqs], device=model.device)  # (P,)
    with attention_implementation(model, "eager"):
        out = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False, output_attentions=True)
    return query_rows(out.attentions, torch.arange(len(seqs), device=model.device), query)  # (L, P, H, T)

"""Key collection: the input of the MLP output matrix at the subject's last token."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kelight.lm.hooks import trace
from kelight.lm.tokens import pad_batch, pad_id, subject_last_index
from kelight.models.adapters import ArchAdapter
from kelight.types import EditRequest


@torch.no_grad()
def subject_keys(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    adapter: ArchAdapter,
    layers: Sequence[int],
    texts: Sequence[str],
    subject: str,
) -> dict[int, torch.Tensor]:
    """Keys ``(len(texts), d_in)`` at the subject's last token of each text, for each layer."""
    ids = [list(tok(t)["input_ids"]) for t in texts]
    pos = torch.tensor([subject_last_index(tok, t, subject) for t in texts])
    device = next(model.parameters()).device
    input_ids, mask = pad_batch(ids, pad_id(tok), device)
    paths = [adapter.path("mlp_out", layer) for layer in sorted(layers)]
    with trace(model, paths, inputs=True, stop=True) as rec:
        model.base_model(input_ids=input_ids, attention_mask=mask, use_cache=False)
    rows = torch.arange(len(texts), device=device)
    return {layer: rec[adapter.path("mlp_out", layer)][rows, pos.to(device)].float() for layer in layers}


def mean_keys(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    adapter: ArchAdapter,
    layer: int,
    request: EditRequest,
    templates: Sequence[str],
) -> torch.Tensor:
    """k*: the key at ``layer`` averaged over the context-templated prompts, ``(d_in,)``."""
    return templated_keys(model, tok, adapter, layer, request, templates).mean(0)


def templated_keys(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    adapter: ArchAdapter,
    layer: int,
    request: EditRequest,
    templates: Sequence[str],
) -> torch.Tensor:
    """The key at ``layer`` for each context-templated prompt, ``(len(templates), d_in)``."""
    texts = [t.format(request.prompt) for t in templates]
    return subject_keys(model, tok, adapter, [layer], texts, request.subject)[layer]

"""Prompt prefixes that z cannot change: cut each rewriting prompt at its subject, cache the rest.

In a causal model nothing before the subject's last token (where z is added) depends on z, so the
prefix's keys and values are computed once per optimisation and every step runs only the suffix
(:attr:`kelight.editors.locate.zopt.ZConfig.cache_prefix`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from kelight.lm.readouts import cache_keyword, left_pad
from kelight.lm.tokens import pad_batch
from kelight.objectives.base import RewriteBatch


@dataclass
class PrefixSplit:
    """A batch cut at each row's subject: the prefix before it (unaffected by z) and the rest.

    Attributes:
        prefix_ids, prefix_mask: ``(B, P)`` tokens ``0 … s_b − 1`` of each row, left-padded
            (``P = max_b s_b``), run once to fill a KV cache.
        suffix: the rest of each row, right-padded ``(B, T')``, as a :class:`RewriteBatch` whose
            columns count from the subject (``subject_pos`` is 0) and whose ``key_offset`` is ``P``.
        positions: ``(B, T')`` position ids of the suffix tokens (``s_b + j``).
        mask: ``(B, P + T')`` attention mask over the cached prefix and the suffix.
    """

    prefix_ids: torch.Tensor
    prefix_mask: torch.Tensor
    suffix: RewriteBatch
    positions: torch.Tensor
    mask: torch.Tensor


def split_at_subject(batch: RewriteBatch, pad_id: int) -> PrefixSplit | None:
    """Cut every row of ``batch`` before its subject's last token (where z is added).

    In a causal model nothing before that token depends on z, so its keys and values can be
    computed once and each optimisation step runs only the rest. Returns ``None`` when no row
    has a prefix (nothing to save).
    """
    starts = batch.subject_pos.tolist()
    width = max(starts)
    if width == 0:
        return None
    device = batch.input_ids.device
    lengths = batch.attention_mask.sum(1).tolist()
    rows = [batch.input_ids[b, : lengths[b]].tolist() for b in range(len(starts))]
    prefix_ids, prefix_mask = left_pad([r[:s] for r, s in zip(rows, starts, strict=True)], pad_id, device)  # ends at P
    suffix_ids, suffix_mask = pad_batch([r[s:] for r, s in zip(rows, starts, strict=True)], pad_id, device)
    start = batch.subject_pos  # (B,)
    suffix = RewriteBatch(
        suffix_ids, suffix_mask, torch.zeros_like(start), batch.target_rows,
        batch.target_cols - start[batch.target_rows], batch.target_ids, batch.query_pos - start[: batch.n_rewrite],
        batch.essence_pos - start[batch.n_rewrite :], batch.n_rewrite, batch.n_requests, key_offset=width,
        n_relation=batch.n_relation,
    )
    positions = start[:, None] + torch.arange(suffix_ids.shape[1], device=device)  # (B, T')
    return PrefixSplit(prefix_ids, prefix_mask, suffix, positions, torch.cat([prefix_mask, suffix_mask], 1))


@dataclass
class PrefixCache:
    """Keys/values of the prompt prefixes (before each subject), computed once per optimisation."""

    split: PrefixSplit
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (B, H_kv, P, d) keys and values

    @classmethod
    @torch.no_grad()
    def build(cls, model: PreTrainedModel, split: PrefixSplit) -> PrefixCache | None:
        """The cache of ``split``'s prefixes, or ``None`` (the steps then run on the full prompts)
        where a layer keeps fewer keys than the prefix (a sliding window shorter than it) or the
        installed transformers has no per-layer cache (``Cache.layers``, transformers ≥ 4.56)."""
        mask = split.prefix_mask
        out = model.base_model(input_ids=split.prefix_ids, attention_mask=mask,
                               position_ids=(mask.cumsum(1) - 1).clamp(min=0), use_cache=True)
        cached = getattr(getattr(out, cache_keyword(model), None), "layers", None)
        if cached is None or any(layer.keys.shape[2] != mask.shape[1] for layer in cached):
            return None
        keep = mask.bool()[:, None, :, None]  # padding slots zeroed: masked later, and never NaN
        layers = [(torch.where(keep, layer.keys, 0.0), torch.where(keep, layer.values, 0.0)) for layer in cached]
        return cls(split, layers)

    def forward_kwargs(self, model: PreTrainedModel) -> dict:
        """Arguments of one forward of the suffix on a fresh copy of the cache."""
        cache = DynamicCache(ddp_cache_data=self.layers, config=model.config)
        return {"attention_mask": self.split.mask, "position_ids": self.split.positions, "use_cache": True,
                cache_keyword(model): cache}

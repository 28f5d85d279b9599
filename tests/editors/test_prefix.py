"""Prompt prefixes z cannot change: the cut at the subject and the KV cache of the prefixes."""

from __future__ import annotations

import torch

from kelight.editors.prefix import PrefixCache, split_at_subject
from kelight.editors.rewrite import build_rewrite_batch
from kelight.models.tiny import tiny_model
from kelight.types import EditRequest

REQUEST = EditRequest("The Eiffel Tower is located in", "Eiffel Tower", "Rome")
TEMPLATES = ["{}", "Yes. {}", "It was a long day. {}"]


def test_split_at_subject_layout():
    _, tok = tiny_model("llama")
    batch = build_rewrite_batch(tok, REQUEST, TEMPLATES, "cpu")
    split = split_at_subject(batch, pad_id=0)
    width = int(batch.subject_pos.max())
    assert split.prefix_ids.shape[1] == width and split.suffix.key_offset == width
    for b in range(batch.input_ids.shape[0]):
        s, n = int(batch.subject_pos[b]), int(batch.attention_mask[b].sum())
        assert split.prefix_ids[b, width - s :].tolist() == batch.input_ids[b, :s].tolist()  # right-aligned
        assert split.prefix_mask[b].tolist() == [0] * (width - s) + [1] * s
        assert split.suffix.input_ids[b, : n - s].tolist() == batch.input_ids[b, s:n].tolist()
        assert split.positions[b, 0] == s and int(split.suffix.subject_pos[b]) == 0
    # every target token is read at the same token as before
    before = batch.input_ids[batch.target_rows, batch.target_cols]
    after = split.suffix.input_ids[split.suffix.target_rows, split.suffix.target_cols]
    assert torch.equal(before, after)


def test_no_prefix_means_no_split():
    _, tok = tiny_model("llama")
    batch = build_rewrite_batch(tok, EditRequest("Eiffel Tower is in", "Eiffel Tower", "Rome"), ["{}"], "cpu")
    assert int(batch.subject_pos.max()) > 0  # the subject's last token is not the first token ...
    batch.subject_pos.zero_()  # ... but a subject at position 0 leaves nothing to cache
    assert split_at_subject(batch, pad_id=0) is None


def test_prefix_cache_zeroes_padding_and_refuses_a_short_window():
    model, tok = tiny_model("llama")
    split = split_at_subject(build_rewrite_batch(tok, REQUEST, TEMPLATES, "cpu"), pad_id=0)
    cache = PrefixCache.build(model, split)
    pad = ~split.prefix_mask.bool()
    assert pad.any() and len(cache.layers) == model.config.num_hidden_layers
    for keys, values in cache.layers:  # (B, H_kv, P, d): padding slots hold exact zeros, never NaN
        assert torch.isfinite(keys).all() and not keys.permute(0, 2, 1, 3)[pad].any()
        assert not values.permute(0, 2, 1, 3)[pad].any()
    short, tok = tiny_model("gemma3_text", sliding_window=2)  # keeps 2 keys < the longest prefix
    split = split_at_subject(build_rewrite_batch(tok, REQUEST, TEMPLATES, "cpu"), pad_id=0)
    assert split.prefix_ids.shape[1] > 2 and PrefixCache.build(short, split) is None

"""Shared-prompt read-outs (prompt once, targets on its KV cache) equal full-sequence read-outs."""

from __future__ import annotations

import pytest
import torch

from kelight.lm.readouts import readouts, shared_prompt_readouts

PROMPTS = [[5, 9, 12, 40], [5, 9, 12, 40], [7, 3], [7, 3], [8, 1, 2, 3, 4, 5, 6], [11]]
TARGETS = [[20, 21, 22], [30], [44, 45], [46], [50], [60, 61, 62, 63]]


def _check(model, prompts, targets, chunk):
    shared = shared_prompt_readouts(model, prompts, targets, pad_id=0, chunk=chunk)
    full = readouts(model, [p + t for p, t in zip(prompts, targets, strict=True)], [len(p) for p in prompts],
                    pad_id=0, chunk=64)
    assert len(shared) == len(full) == len(prompts)
    for (lp_s, pred_s, tgt_s), (lp_f, pred_f, tgt_f), t in zip(shared, full, targets, strict=True):
        assert tgt_s.tolist() == tgt_f.tolist() == t
        torch.testing.assert_close(lp_s, lp_f, rtol=1e-4, atol=1e-5)
        assert pred_s.tolist() == pred_f.tolist()


@pytest.mark.parametrize("chunk", [64, 3])
def test_shared_prompt_readouts_equal_full_sequences(tiny, chunk):
    model, _ = tiny
    _check(model, PROMPTS, TARGETS, chunk)


def test_single_token_targets_need_no_second_forward():
    from kelight.models.tiny import tiny_model

    model, _ = tiny_model("llama")
    _check(model, [[5, 9], [5, 9], [3, 4, 5]], [[7], [8], [9]], chunk=64)

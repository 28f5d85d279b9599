"""The query-row attention kernel: same rows as eager attention, same outputs, restored on exit."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kelight.editors.locate.zopt import ZConfig, optimise_z
from kelight.editors.rewrite import build_rewrite_batch
from kelight.lm.attention_rows import KERNEL, query_row_attention
from kelight.lm.forward import attention_implementation
from kelight.models.adapters import adapter_for
from kelight.objectives.sadr import SADR
from kelight.types import EditRequest


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 200, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # a right-padded row
    return ids, mask, torch.tensor([5, 6, 8])


def test_rows_equal_eager_rows_and_outputs_are_unchanged(tiny):
    model, _ = tiny
    ids, mask, rows = _inputs()
    with attention_implementation(model, "eager"):
        eager = model.base_model(input_ids=ids, attention_mask=mask, output_attentions=True)
    with query_row_attention(model, rows) as recorder:
        got = model.base_model(input_ids=ids, attention_mask=mask)
        got_rows = recorder.take()
        assert recorder.take() is None  # taken: the next forward starts afresh
    assert got_rows.shape == (len(eager.attentions), 3, eager.attentions[0].shape[1], 9)  # (L, B, H, T)
    batch = torch.arange(3)
    for full, row in zip(eager.attentions, got_rows, strict=True):
        torch.testing.assert_close(row, full[batch, :, rows], rtol=1e-5, atol=1e-6)
    keep = mask.bool()
    torch.testing.assert_close(got.last_hidden_state[keep], eager.last_hidden_state[keep], rtol=1e-4, atol=1e-5)


def test_kernel_and_module_state_are_restored(tiny):
    model, _ = tiny
    before = model.config._attn_implementation
    ids, mask, rows = _inputs()
    with pytest.raises(RuntimeError, match="boom"), query_row_attention(model, rows):
        assert model.config._attn_implementation == KERNEL
        raise RuntimeError("boom")
    assert model.config._attn_implementation == before
    attn = adapter_for(model).module(model, "attn", 0)
    assert not any(name.startswith("_kelight") for name in vars(attn))


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_sadr_with_row_kernel_equals_sadr_with_eager(family):
    from kelight.models.tiny import tiny_model

    model, tok = tiny_model(family)
    batch = build_rewrite_batch(tok, EditRequest("The Eiffel Tower is in", "Eiffel Tower", "Rome"),
                                ["{}", "Yes. {}"], "cpu")
    runs = []
    for rows_only in (False, True):
        sadr = SADR(5.0, 1)
        cfg = ZConfig(steps=5, early_stop_loss=0.0, attention_rows=rows_only)
        z = optimise_z(model, adapter_for(model).path("mlp_out", 0), batch, cfg, (sadr,), want_attn=True,
                       first_edited_block=0)
        runs.append((z, sadr))
    (z_eager, sadr_eager), (z_rows, sadr_rows) = runs
    assert z_rows.losses == pytest.approx(z_eager.losses, rel=1e-5, abs=1e-6)
    assert [m.tolist() for m in sadr_rows.selected] == [m.tolist() for m in sadr_eager.selected]
    assert sum(int(m.sum()) for m in sadr_rows.selected) > 0  # heads were restrained: the KL was compared
    assert dataclasses.replace(ZConfig(), attention_rows=False).attention_rows is False


def test_row_mask_without_a_mask_is_causal_over_cached_keys():
    from kelight.lm.attention_rows import _row_mask

    rows = torch.tensor([0, 2])  # query rows among 3 queries that follow 4 cached keys
    allowed = _row_mask(None, rows, n_keys=7, n_queries=3)  # (B, 1, T)
    assert allowed[:, 0].tolist() == [[True] * 5 + [False] * 2, [True] * 7]
    plain = _row_mask(None, rows, n_keys=3, n_queries=3)  # no cache: plain causal
    assert plain[:, 0].tolist() == [[True, False, False], [True, True, True]]


def test_rows_of_layers_with_different_key_lengths_are_refused():
    from kelight.lm.attention_rows import QueryRows

    recorder = QueryRows(torch.tensor([1, 2]))
    q = torch.randn(2, 4, 3, 8)  # (B, H, T_q, d)
    recorder.record(q, torch.randn(2, 2, 3, 8), None, 0.5)
    recorder.record(q, torch.randn(2, 2, 5, 8), None, 0.5)  # two cached keys more: rows cannot be stacked
    with pytest.raises(RuntimeError, match="one key shape in every layer"):
        recorder.take()
    assert recorder.take() is None  # the records were cleared


def test_rows_from_records_equal_a_hand_computed_gqa_softmax():
    from kelight.lm.attention_rows import QueryRows

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 3, 8, generator=g), torch.randn(1, 2, 3, 8, generator=g)  # 4 heads on 2 key heads
    recorder = QueryRows(torch.tensor([1]))
    recorder.record(q, k, None, 0.5)
    rows = recorder.take()  # (1, 1, 4, 3)
    for h in range(4):
        scores = (q[0, h, 1] @ k[0, h // 2].T) * 0.5
        expected = torch.cat([scores[:2].softmax(-1), torch.zeros(1)])  # causal: query 1 sees keys 0 and 1
        torch.testing.assert_close(rows[0, 0, h], expected)

"""Hooks are removed on exit, on early stop and on exceptions; replayed weight changes equal changed weights."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from kelight.editors.undo import UndoLog
from kelight.lm.hooks import add_at, edit_output, linear_weight_changes, map_tensors, row_weight_changes, trace
from kelight.models.tiny import tiny_model


def _n_hooks(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def test_trace_records_and_removes_hooks():
    model, tok = tiny_model("llama")
    ids = tok(["ab cd"], return_tensors="pt").input_ids
    with trace(model, ["model.layers.0.mlp.down_proj", "model.layers.1.mlp"], inputs=False) as rec:
        model(ids)
    assert rec["model.layers.0.mlp.down_proj"].shape == (1, ids.shape[1], 48)
    assert _n_hooks(model) == 0


def test_trace_stop_skips_later_layers_and_cleans_up():
    model, tok = tiny_model("llama")
    ids = tok(["ab cd"], return_tensors="pt").input_ids
    with trace(model, ["model.layers.0.mlp.down_proj"], inputs=True, stop=True) as rec, trace(
        model, ["model.layers.2"]
    ) as later:
        model(ids)
    assert rec["model.layers.0.mlp.down_proj"].shape[-1] == 96 and "model.layers.2" not in later
    assert _n_hooks(model) == 0


def test_edit_output_removed_after_exception():
    model, tok = tiny_model("gpt2")
    ids = tok(["ab"], return_tensors="pt").input_ids
    base = model(ids).logits
    delta = torch.ones(48)
    with pytest.raises(RuntimeError, match="boom"), edit_output(
        model, "transformer.h.1.mlp", add_at(torch.tensor([0]), torch.tensor([1]), delta)
    ):
        assert not torch.allclose(model(ids).logits, base)
        raise RuntimeError("boom")
    assert _n_hooks(model) == 0
    torch.testing.assert_close(model(ids).logits, base)


def test_map_tensors_reaches_nested_tensors_and_keeps_the_rest():
    hidden, extra = torch.ones(2, 3), torch.zeros(1)
    out = map_tensors((hidden, None, (extra, "cache")), torch.clone)
    assert out[1] is None and out[2][1] == "cache"
    assert torch.equal(out[0], hidden) and out[0].data_ptr() != hidden.data_ptr()  # a copy, not a view
    assert out[2][0].data_ptr() != extra.data_ptr()
    assert map_tensors(7, torch.clone) == 7


def _weights(model, n):
    """The first ``n`` Linear/Conv1D weights of the blocks (the head left out)."""
    return [m.weight for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, Conv1D)) and "head" not in name][:n]


def _changed(model, seed, weights):
    """The weight changes of a random edit of ``weights``, taken from the undo log and undone."""
    gen = torch.Generator().manual_seed(seed)
    undo = UndoLog()
    for w in weights:
        undo.remember(w)
        with torch.no_grad():
            w.add_(0.5 * torch.randn(w.shape, generator=gen))
    changes = linear_weight_changes(model, undo.changes())
    return undo, changes


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # nn.Linear, and GPT-2's transposed Conv1D
def test_row_weight_changes_give_each_row_its_own_changed_model(family):
    model, tok = tiny_model(family)
    ids = tok(["ab cd ef"] * 3, return_tensors="pt").input_ids
    a_undo, a = _changed(model, 1, _weights(model, 3))
    with torch.no_grad():
        logits_a = model(ids[:1]).logits
    a_undo.restore()
    b_undo, b = _changed(model, 2, _weights(model, 1))
    with torch.no_grad():
        logits_b = model(ids[:1]).logits
    b_undo.restore()
    with torch.no_grad():
        plain = model(ids[:1]).logits
        with row_weight_changes([a, b], rows=[1, 0, 2]):  # row 2: no group, the unchanged model
            replayed = model(ids).logits
    assert _n_hooks(model) == 0
    assert not torch.allclose(logits_a, plain, atol=1e-3) and not torch.allclose(logits_b, plain, atol=1e-3)
    torch.testing.assert_close(replayed[1:2], logits_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(replayed[0:1], logits_b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(replayed[2:3], plain, atol=0, rtol=0)


def test_row_weight_changes_removed_after_exception():
    model, tok = tiny_model("llama")
    undo, change = _changed(model, 1, _weights(model, 2))
    undo.restore()
    with pytest.raises(RuntimeError, match="boom"), row_weight_changes([change], rows=[0]):
        raise RuntimeError("boom")
    assert _n_hooks(model) == 0


def test_linear_weight_changes_refuse_what_only_the_changed_model_can_replay():
    model, _ = tiny_model("llama")
    undo = UndoLog()
    norm = model.model.layers[0].post_attention_layernorm.weight
    undo.add_(norm, torch.ones_like(norm))
    assert linear_weight_changes(model, undo.changes()) is None  # a norm's weight is not a linear map's
    undo.restore()
    assert linear_weight_changes(model, []) == {}

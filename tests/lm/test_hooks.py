"""Hooks are removed on exit, on early stop and on exceptions."""

import pytest
import torch

from kelight.lm.hooks import add_at, edit_output, map_tensors, trace
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

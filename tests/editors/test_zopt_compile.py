"""z optimisation under ``torch.compile``: the eager result, one compile for every prompt length."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from kelight.editors.context import build_rewrite_batch
from kelight.editors.zopt import ZConfig, optimise_z
from kelight.models.adapters import adapter_for
from kelight.models.tiny import tiny_model
from kelight.objectives.sadr import SADR
from kelight.types import EditInputError, EditRequest

TEMPLATES = ["{}", "Yes. {}", "It was a long day. {}"]
REQUESTS = [EditRequest("The Eiffel Tower is located in", "Eiffel Tower", "Rome"),
            EditRequest("Mount Fuji, the tallest mountain of the islands, is in", "Mount Fuji", "Peru")]


def test_compiled_steps_match_eager_and_new_lengths_do_not_recompile():
    model, tok = tiny_model("llama")
    path = adapter_for(model).path("mlp_out", 1)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [build_rewrite_batch(tok, r, TEMPLATES, "cpu") for r in REQUESTS]
    assert batches[0].input_ids.shape != batches[1].input_ids.shape
    graphs = [counters["stats"]["unique_graphs"]]
    for batch in batches:
        eager = optimise_z(model, path, batch, ZConfig(steps=5, early_stop_loss=0.0), first_edited_block=1)
        compiled = optimise_z(model, path, batch, ZConfig(steps=5, early_stop_loss=0.0, compile="default"),
                              first_edited_block=1)
        graphs.append(counters["stats"]["unique_graphs"])
        torch.testing.assert_close(compiled.delta, eager.delta, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(compiled.v_init, eager.v_init, rtol=1e-5, atol=1e-6)
        assert compiled.losses == pytest.approx(eager.losses, rel=1e-5)
        assert compiled.steps_run == eager.steps_run == 5
    assert graphs[1] > graphs[0]  # the first request compiled
    assert graphs[2] == graphs[1]  # the second request's lengths ran on the graphs of the first
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert type(model.base_model).__name__ == "LlamaModel"  # the model itself is not wrapped


def test_compile_refuses_terms_that_read_attention():
    model, tok = tiny_model("llama")
    batch = build_rewrite_batch(tok, REQUESTS[0], TEMPLATES, "cpu")
    with pytest.raises(EditInputError, match="compile='default' cannot run .*SADR.*Set compile to 'off'"):
        optimise_z(model, adapter_for(model).path("mlp_out", 1), batch, ZConfig(compile="default"),
                   (SADR(0.1, 2),), want_attn=True, first_edited_block=1)


def test_compile_must_be_off_or_a_torch_compile_mode():
    with pytest.raises(EditInputError, match="compile to be one of 'off', 'default', .*got 'cudagraphs'"):
        ZConfig(compile="cudagraphs")

"""z optimisation under ``torch.compile``: the eager result, one compile for every prompt length."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from kelight.editors.locate.zopt import ZConfig, optimise_z
from kelight.editors.prefix import split_at_subject
from kelight.editors.rewrite import build_rewrite_batch
from kelight.models.adapters import adapter_for
from kelight.models.tiny import tiny_model
from kelight.objectives.sadr import SADR
from kelight.types import EditInputError, EditRequest

TEMPLATES = ["{}", "Yes. {}", "It was a long day. {}"]
REQUESTS = [EditRequest("The Eiffel Tower is located in", "Eiffel Tower", "Rome"),
            EditRequest("Mount Fuji, the tallest mountain of the islands, is in", "Mount Fuji", "Peru")]
# its cached prefix and its steps' suffix have the same length (22 tokens): torch's duck sizing would give
# the two one symbol, and every later request whose lengths differ would compile again
COINCIDENT = EditRequest("Lyon is located in", "Lyon", "Germany")


# ROME's site at layer 1 (block 0 replayed after step 0), and at layer 0 with SADR's query rows in the
# graph (on this 3-layer model SADR moves δ only when it sees layers 1 and 2); GPT-J (parallel attention
# and MLP, partial rotary) is the second GPU shape of docs/gpu_runbook.md
@pytest.mark.parametrize(("family", "layer", "gamma"), [("llama", 1, 0.0), ("llama", 0, 50.0), ("gptj", 1, 50.0)])
def test_compiled_steps_match_eager_and_new_lengths_do_not_recompile(family, layer, gamma):
    model, tok = tiny_model(family)
    path = adapter_for(model).path("mlp_out", layer)
    terms = (SADR(gamma, layer + 1),) if gamma else ()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [build_rewrite_batch(tok, r, TEMPLATES, "cpu") for r in (COINCIDENT, REQUESTS[1])]
    assert batches[0].input_ids.shape != batches[1].input_ids.shape
    first = split_at_subject(batches[0], tok.pad_token_id)
    assert first.prefix_ids.shape[1] == first.suffix.input_ids.shape[1]  # the coincidence
    graphs = [counters["stats"]["unique_graphs"]]
    for batch in batches:
        eager, compiled = (optimise_z(model, path, batch, ZConfig(steps=5, early_stop_loss=0.0, compile=mode),
                                      terms, want_attn=bool(terms), first_edited_block=layer)
                            for mode in ("off", "default"))
        graphs.append(counters["stats"]["unique_graphs"])
        torch.testing.assert_close(compiled.delta, eager.delta, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(compiled.v_init, eager.v_init, rtol=1e-5, atol=1e-6)
        assert compiled.losses == pytest.approx(eager.losses, rel=1e-5)
        assert compiled.steps_run == eager.steps_run == 5
    assert graphs[1] > graphs[0]  # the first request compiled
    assert graphs[2] == graphs[1]  # the second request's lengths ran on the graphs of the first
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert type(model.base_model).__name__ == {"llama": "LlamaModel", "gptj": "GPTJModel"}[family]  # not wrapped


def test_sadr_terms_change_the_compiled_result():
    """The SADR term is live in the test above (γ = 50 moves δ), so its equality is not vacuous."""
    model, tok = tiny_model("llama")
    batch = build_rewrite_batch(tok, REQUESTS[0], TEMPLATES, "cpu")
    path = adapter_for(model).path("mlp_out", 0)
    plain, sadr = (optimise_z(model, path, batch, ZConfig(steps=5, early_stop_loss=0.0), terms, want_attn=bool(terms))
                   for terms in ((), (SADR(50.0, 1),)))
    assert not torch.allclose(plain.delta, sadr.delta, rtol=1e-3, atol=1e-4)


def test_compile_refuses_eager_attention_weights():
    model, tok = tiny_model("llama")
    batch = build_rewrite_batch(tok, REQUESTS[0], TEMPLATES, "cpu")
    with pytest.raises(EditInputError, match="compile='default' needs attention_rows on .*SADR.*or compile 'off'"):
        optimise_z(model, adapter_for(model).path("mlp_out", 1), batch,
                   ZConfig(compile="default", attention_rows=False), (SADR(0.1, 2),), want_attn=True,
                   first_edited_block=1)


def test_compile_must_be_off_or_a_torch_compile_mode():
    with pytest.raises(EditInputError, match="compile to be one of 'off', 'default', .*got 'cudagraphs'"):
        ZConfig(compile="cudagraphs")


def test_compiled_steps_with_the_relation_term_match_eager():
    """Relation rows (more, shorter rows after the essence row) and SADR's query rows under compile."""
    model, tok = tiny_model("llama")
    path = adapter_for(model).path("mlp_out", 0)
    batch = build_rewrite_batch(tok, REQUESTS[0], TEMPLATES, "cpu")
    eager, compiled = (optimise_z(model, path, batch, ZConfig(steps=4, early_stop_loss=0.0, compile=mode,
                                                                relation_kl_factor=20.0, relation_prompts=3),
                                  (SADR(50.0, 1),), want_attn=True) for mode in ("off", "default"))
    torch.testing.assert_close(compiled.delta, eager.delta, rtol=1e-4, atol=1e-5)
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-5)

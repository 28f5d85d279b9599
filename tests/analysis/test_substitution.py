"""Contaminating substitution: zero effect for the clean model's own outputs, a cell by hand."""

import pytest
import torch

from kelight.analysis.common import edited, layer_window, no_edit, probabilities
from kelight.analysis.substitution import module_paths, run_substitution, substitution_map
from kelight.lm.hooks import edit_output, trace

from .conftest import EDIT_LAYER, assert_unchanged, snapshot


def test_window_is_centred_and_clipped():
    assert layer_window(5, 4, 30) == [3, 4, 5, 6]
    assert layer_window(0, 6, 30) == [0, 1, 2, 3, 4, 5]
    assert layer_window(29, 6, 30) == [24, 25, 26, 27, 28, 29]
    with pytest.raises(ValueError, match="at least 1"):
        layer_window(0, 0, 3)


def test_own_outputs_have_zero_effect(model_tok, cases):
    model, tok = model_tok
    result = substitution_map(model, tok, cases[0], no_edit, window=2)
    n_tokens = len(result["tokens"])
    for kind in ("attn", "mlp", "block"):
        for target in ("true", "edit"):
            effect = result["effect"][kind][target]
            assert effect.shape == (n_tokens, 3)
            torch.testing.assert_close(effect, torch.zeros_like(effect), rtol=0, atol=1e-6)


def test_edit_effects_match_a_single_cell_by_hand(model_tok, cases, edit, tmp_path):
    model, tok = model_tok
    case = cases[0]
    before = snapshot(model)
    result = run_substitution(model, tok, case, edit, tmp_path, window=1, task="distracted_neighbor")
    assert_unchanged(model, before)
    assert (tmp_path / "substitution.png").stat().st_size > 0
    effect = result["effect"]
    # below the edited MLP nothing differs: layer 0 of every kind, and the attention of the edit layer
    for kind in ("attn", "mlp", "block"):
        torch.testing.assert_close(effect[kind]["true"][:, 0], torch.zeros(len(result["tokens"])), atol=1e-6, rtol=0)
    torch.testing.assert_close(effect["attn"]["edit"][:, EDIT_LAYER], torch.zeros(len(result["tokens"])), atol=1e-6,
                               rtol=0)
    assert effect["mlp"]["edit"][:, EDIT_LAYER].abs().max() > 1e-6  # the edited MLP itself contaminates
    # one cell recomputed independently: the edited MLP output at token t copied into a clean run
    probe, t = case.probes["distracted_neighbor"][0], 5
    path = module_paths(model, "mlp")[EDIT_LAYER]
    with edited(model, tok, case.request, edit), trace(model, [path]) as rec:
        probabilities(model, tok, [probe])
    recorded = rec[path]  # (2, T, D)

    def put(out):
        out = out.clone()
        out[:, t] = recorded[:, t]
        return out

    clean_true, clean_edit = probabilities(model, tok, [probe])
    with edit_output(model, path, put):
        p_true, p_edit = probabilities(model, tok, [probe])
    assert float(effect["mlp"]["true"][t, EDIT_LAYER]) == pytest.approx(float(p_true - clean_true), abs=1e-6)
    assert float(effect["mlp"]["edit"][t, EDIT_LAYER]) == pytest.approx(float(p_edit - clean_edit), abs=1e-6)


def test_a_case_without_the_task_is_refused(model_tok, cases):
    model, tok = model_tok
    with pytest.raises(ValueError, match="no 'relation' prompts"):
        substitution_map(model, tok, cases[0], no_edit, task="relation")


def test_a_prompt_index_outside_the_task_is_refused_with_the_range(model_tok, cases):
    model, tok = model_tok
    n = len(cases[0].probes["distracted_neighbor"])
    expected = rf"has {n} 'distracted_neighbor' prompts; expected a prompt index in 0\.\.{n - 1}"
    with pytest.raises(ValueError, match=expected):
        substitution_map(model, tok, cases[0], no_edit, prompt_index=n, window=1, kinds=["attn"])

"""SADR head-selection statistics from ``SADR.selected``."""

import pytest
import torch

from kelight.analysis.heads import run_heads, sadr_term, selection_fractions
from kelight.editors.rome import RomeEditor, RomeHParams
from kelight.objectives.sadr import SADR

from .conftest import EDIT_LAYER, assert_unchanged, snapshot


def test_fractions_divide_counts_by_the_prompts():
    sadr = SADR(0.1, first_layer=2)
    sadr.vanilla = torch.zeros(1, 4, 2, 7)  # (L', P=4, H, T)
    sadr.selected = [torch.tensor([[0, 4]]), torch.tensor([[2, 1]])]  # per step (L', H) counts
    torch.testing.assert_close(selection_fractions(sadr), torch.tensor([[[0.0, 1.0]], [[0.5, 0.25]]]))


def test_editor_without_sadr_is_refused():
    with pytest.raises(ValueError, match="sadr_gamma > 0"):
        sadr_term(RomeEditor(RomeHParams(layer=1)))


def test_head_statistics_of_tiny_rome_sadr(model_tok, cases, rome, edit, tmp_path):
    model, tok = model_tok
    before = snapshot(model)
    result = run_heads(model, tok, cases, edit, sadr_term(rome), tmp_path)
    assert_unchanged(model, before)
    n_layers_after = model.config.num_hidden_layers - EDIT_LAYER - 1
    per_step = torch.as_tensor(result["per_step_layer"])
    assert result["first_layer"] == EDIT_LAYER + 1 and result["n_cases"] == 3
    assert per_step.shape[1] == n_layers_after and 1 <= per_step.shape[0] <= 4
    per_head = torch.as_tensor(result["per_layer_head"])
    assert per_head.shape == (n_layers_after, model.config.num_attention_heads)
    assert torch.all((per_head >= 0) & (per_head <= 1))
    assert (tmp_path / "heads.png").stat().st_size > 0


def test_no_cases_is_refused(model_tok, rome, edit):
    model, tok = model_tok
    with pytest.raises(ValueError, match="expected at least one case"):
        run_heads(model, tok, [], edit, sadr_term(rome), "unused")

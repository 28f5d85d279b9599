"""Attention-weight patching: vanilla weights on the unedited model change nothing."""

import pytest

from kelight.analysis.common import no_edit
from kelight.analysis.patching import attention_patching, run_patching

from .conftest import assert_unchanged, snapshot


def test_patching_with_identical_vanilla_weights_changes_nothing(model_tok, cases):
    model, tok = model_tok
    result = attention_patching(model, tok, cases, no_edit, window=2)
    assert result["starts"] == [0, 1]
    assert set(result["tasks"]) == {"neighbor", "distracted_neighbor", "relation"}
    for data in result["tasks"].values():
        for key in ("true", "edit"):
            assert data[f"edited_{key}"] == pytest.approx(data[f"vanilla_{key}"], rel=1e-6)
            assert data[f"patched_{key}"] == pytest.approx([data[f"vanilla_{key}"]] * 2, rel=1e-5)


def test_patching_all_layers_after_the_edit(model_tok, cases, edit, tmp_path):
    """Window over every layer: attention is the vanilla one everywhere; weights restored afterwards."""
    model, tok = model_tok
    before = snapshot(model)
    result = run_patching(model, tok, cases, edit, tmp_path, window=3, tasks=["distracted_neighbor"])
    assert_unchanged(model, before)
    data = result["tasks"]["distracted_neighbor"]
    assert data["n_prompts"] == sum(len(c.probes["distracted_neighbor"]) for c in cases)
    assert len(data["patched_true"]) == 1 and data["patched_true"][0] != pytest.approx(data["edited_true"], rel=1e-9)
    assert (tmp_path / "patching.json").exists() and (tmp_path / "patching.png").stat().st_size > 0


def test_window_larger_than_the_model_is_refused(model_tok, cases):
    model, tok = model_tok
    with pytest.raises(ValueError, match="window of 1..3"):
        attention_patching(model, tok, cases, no_edit, window=4)


def test_tasks_no_case_has_are_refused_without_editing(model_tok, cases):
    """cases[0] has no relation prompts: nothing to patch, so it is not edited, and with no task left the
    analysis says which tasks were asked for instead of writing an empty figure."""
    model, tok = model_tok
    edits = []

    def counting_edit(m, t, request):
        edits.append(request)
        return no_edit(m, t, request)

    with pytest.raises(ValueError, match=r"none of the 1 cases has a prompt of the tasks \['relation'\]"):
        attention_patching(model, tok, cases[:1], counting_edit, tasks=["relation"], window=2)
    assert edits == []

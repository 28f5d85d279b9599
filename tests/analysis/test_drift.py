"""Attention-drift factors (paper Figure 4 / Table 2) on hand-made rows and on a tiny edited model."""

import math

import pytest
import torch

from kelight.analysis.common import no_edit
from kelight.analysis.drift import attention_drift, attention_kl, drift_factors, run_drift
from kelight.objectives.sadr import EPS

from .conftest import assert_unchanged, snapshot


def _rows(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, 4, 5, generator=g).softmax(-1)  # (L, P, H, T)


def test_kl_is_the_sum_over_layers_and_heads_per_prompt():
    vanilla, edited = _rows(0), _rows(1)
    expected = [
        sum(float((vanilla[ly, p, h] * ((vanilla[ly, p, h] + EPS) / (edited[ly, p, h] + EPS)).log()).sum())
            for ly in range(2) for h in range(4))
        for p in range(3)
    ]
    torch.testing.assert_close(attention_kl(vanilla, edited), torch.tensor(expected), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(attention_kl(vanilla, vanilla), torch.zeros(3), rtol=0, atol=1e-7)


def test_subject_drift_max_and_sum_by_hand():
    vanilla, edited = _rows(2), _rows(3)
    subject = torch.tensor([1, 4, 0])  # (P,)
    factors = drift_factors(vanilla, edited, subject)
    for p in range(3):
        s = int(subject[p])
        diff = [[float(edited[ly, p, h, s] - vanilla[ly, p, h, s]) for h in range(4)] for ly in range(2)]
        assert float(factors["max_drift"][p]) == pytest.approx(sum(max(row) for row in diff), abs=1e-6)
        assert float(factors["sum_drift"][p]) == pytest.approx(sum(sum(row) for row in diff), abs=1e-6)


def test_no_edit_has_no_drift(model_tok, cases):
    model, tok = model_tok
    result = attention_drift(model, tok, cases, no_edit)
    assert set(result["tasks"]) == {"distracted_neighbor", "relation"}
    for task in result["tasks"].values():
        for row in task["cases"]:
            assert row["kl"] == pytest.approx(0, abs=1e-6) and row["max_drift"] == pytest.approx(0, abs=1e-7)
            assert row["p_edit"] == pytest.approx(row["p_edit_vanilla"], rel=1e-5)
        assert math.isnan(task["correlation"]["kl"]["r"])  # constant factor: undefined


def test_edit_drifts_restores_weights_and_writes_outputs(model_tok, cases, edit, tmp_path):
    model, tok = model_tok
    before = snapshot(model)
    result = run_drift(model, tok, cases, edit, tmp_path, title="tiny", layers=[2])
    assert_unchanged(model, before)
    rows = result["tasks"]["distracted_neighbor"]["cases"]
    assert [r["id"] for r in rows] == [c.case_id for c in cases]
    assert all(r["kl"] > 0 for r in rows)  # the edit at layer 1 moves layer 2's attention
    corr = result["tasks"]["distracted_neighbor"]["correlation"]["kl"]
    assert corr["n"] == 3 and -1 <= corr["r"] <= 1 and 0 <= corr["p"] <= 1
    assert (tmp_path / "drift.json").exists() and (tmp_path / "drift.png").stat().st_size > 0


def test_layers_outside_the_model_are_refused_with_the_range(model_tok, cases):
    model, tok = model_tok
    with pytest.raises(ValueError, match=r"expected distinct layers in 0\.\.2, got \[0, 7\]"):
        attention_drift(model, tok, cases, no_edit, layers=[0, 7])
    with pytest.raises(ValueError, match="distinct layers"):
        attention_drift(model, tok, cases, no_edit, layers=[2, 2])  # would count layer 2 twice


def test_tasks_without_the_subject_in_context_are_refused_before_plotting(model_tok, cases, tmp_path):
    """Plain neighbourhood prompts never contain the edited subject: nothing to measure, say so."""
    model, tok = model_tok
    with pytest.raises(ValueError, match="contains its edited subject.*distracted_neighbor"):
        run_drift(model, tok, cases, no_edit, tmp_path, tasks=["neighbor"])

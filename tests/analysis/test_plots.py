"""Every panel of every analysis figure has both axes labelled (colour bars: their quantity)."""

import pytest
import torch

import kelight.analysis.path_importance
import kelight.analysis.plots
from kelight.analysis.drift import FACTORS, plot_drift
from kelight.analysis.heads import plot_heads
from kelight.analysis.patching import plot_patching
from kelight.analysis.path_importance import save_path_importance
from kelight.analysis.substitution import plot_substitution
from kelight.analysis.tradeoff import plot_tradeoff
from kelight.editors.pac.deltas import PathSelection


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions save (checked before they are closed)."""
    saved = []
    real = kelight.analysis.plots.save

    def save(fig, path, title=""):
        saved.append(fig)
        fig.canvas.draw()  # the colour bars' labels exist once drawn
        return real(fig, path, title)

    monkeypatch.setattr(kelight.analysis.plots, "save", save)
    monkeypatch.setattr(kelight.analysis.path_importance, "save", save)
    return saved


def _results() -> dict:
    rows = [{f: float(i) for f in FACTORS} | {"p_edit": 0.1 * i} for i in range(3)]
    corr = {f: {"r": 0.5, "p": 0.1, "n": 3} for f in FACTORS}
    patched = {f"{w}_{k}": 0.2 for w in ("vanilla", "edited") for k in ("true", "edit")}
    return {
        "drift": {"tasks": {"relation": {"cases": rows, "correlation": corr}}},
        "substitution": {"effect": {"attn": {"true": torch.zeros(4, 3), "edit": torch.ones(4, 3)}},
                         "tokens": ["a", "b", "c", "d"], "p_clean": {"true": 0.1, "edit": 0.2},
                         "p_edited": {"true": 0.05, "edit": 0.3}, "window": 1, "task": "relation",
                         "prompt": "abcd", "o_true": "x", "o_edit": "y"},
        "patching": {"window": 2, "starts": [0, 1], "tasks": {"relation": {
            **patched, "patched_true": [0.1, 0.2], "patched_edit": [0.3, 0.2], "n_prompts": 4}}},
        "heads": {"first_layer": 2, "n_cases": 1, "per_step_layer": torch.rand(3, 2),
                  "per_layer_head": torch.rand(2, 6)},
        "tradeoff": {"trials": [{"state": "finished", "params": {"model.editor.sadr_gamma": g},
                                 "metrics": {"EM": 90.0, "PM": 60.0 + g, "RM": 10.0, "DNM": 20.0}}
                                for g in (0.01, 0.1)]},
    }


PLOTS = {"drift": plot_drift, "substitution": plot_substitution, "patching": plot_patching, "heads": plot_heads,
         "tradeoff": plot_tradeoff}


@pytest.mark.parametrize("name", [*PLOTS, "path_importance"])
def test_every_panel_has_labelled_axes(figures, tmp_path, name):
    if name == "path_importance":
        scores = torch.rand(3, 8)
        pos = scores.argsort(1, descending=True)
        selection = PathSelection(pos[:, :2], pos[:, -1:], pos[:, :2], pos[:, -1:], scores, scores)
        save_path_importance(tmp_path, [selection])
    else:
        PLOTS[name](_results()[name], tmp_path / f"{name}.png")
    (fig,) = figures
    for ax in fig.axes:
        if ax.get_label() == "<colorbar>":
            assert ax.get_ylabel(), f"{name}: a colour bar without its quantity"
            continue
        assert ax.get_xlabel() and ax.get_ylabel(), f"{name}: panel {ax.get_title()!r} has an unlabelled axis"


def test_save_returns_the_file_it_wrote(tmp_path):
    from kelight.analysis.plots import figure, save

    fig, _ = figure(1, 1)
    assert save(fig, tmp_path / "out") == tmp_path / "out.png" and (tmp_path / "out.png").is_file()

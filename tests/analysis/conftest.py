"""Shared fixtures of the analysis tests: a tiny llama, a ROME(+SADR) edit on it, demo cases."""

from __future__ import annotations

import pytest
import torch

from kelight.analysis.common import editor_edit
from kelight.data import builtin_cases
from kelight.editors.rome import RomeEditor, RomeHParams
from kelight.models.tiny import tiny_model

EDIT_LAYER = 1


@pytest.fixture(scope="module")
def model_tok():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def cases():
    demo = builtin_cases()
    return [demo[0], demo[2], demo[4]]  # distracted-neighbour prompts in all three, relation prompts in 2 and 4


@pytest.fixture(scope="module")
def rome(model_tok):
    """A set-up ROME+SADR editor at layer 1 (C = I, 4 steps) on the tiny llama."""
    model, tok = model_tok
    hp = RomeHParams(layer=EDIT_LAYER, steps=4, context_templates=((3, 1),), mom2_adjustment=False, sadr_gamma=0.1)
    editor = RomeEditor(hp)  # SADR from the layer after the edit layer
    assert [term.first_layer for term in editor.extra_losses] == [EDIT_LAYER + 1]
    editor.setup(model, tok)
    return editor


@pytest.fixture(scope="module")
def edit(rome):
    return editor_edit(rome)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    for name, value in before.items():
        assert torch.equal(after[name], value), f"{name} changed"

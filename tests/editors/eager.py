"""The reference for the editors that train weights: SADR reading eager ``T × T`` attention."""

from collections.abc import Callable

import pytest
import torch

from kelight.editors.steps import forward_logprobs
from kelight.lm.forward import attention_implementation
from kelight.models.tiny import tiny_model
from kelight.objectives.base import StepState
from kelight.objectives.sadr import SADR


def eager_step_forward(model, batch, step, want_rows):
    """:func:`kelight.editors.steps.step_forward` with eager attention weights in ``outputs.attentions``."""
    with attention_implementation(model, "eager" if want_rows else None):
        tgt, _, outputs = forward_logprobs(model, batch, want_attn=want_rows)
    return tgt, StepState(step, batch, outputs)


def assert_rows_equal_eager(monkeypatch, editor_module, family: str, edit: Callable) -> None:
    """Run ``edit(model, tok, sadr) -> losses`` with the row kernel, then with ``editor_module``'s
    forward swapped for the eager reference: same vanilla rows, head masks and losses."""
    runs = []
    for forward in (None, eager_step_forward):
        if forward is not None:
            monkeypatch.setattr(editor_module, "step_forward", forward)
        model, tok = tiny_model(family)
        sadr = SADR(gamma=5.0, first_layer=1)
        losses = edit(model, tok, sadr)
        runs.append((losses, sadr.vanilla, [m.tolist() for m in sadr.selected]))
    (rows_losses, rows_vanilla, rows_masks), (eager_losses, eager_vanilla, eager_masks) = runs
    torch.testing.assert_close(rows_vanilla, eager_vanilla, rtol=1e-5, atol=1e-6)
    assert rows_masks == eager_masks
    assert sum(sum(map(sum, m)) for m in rows_masks) > 0  # heads were restrained: the KL was compared
    assert rows_losses == pytest.approx(eager_losses, rel=1e-5, abs=1e-6)

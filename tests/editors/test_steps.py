"""The step plumbing every editor shares: extra terms added per request and the finite-loss check."""

from __future__ import annotations

import pytest
import torch

from kelight.editors.steps import EditOptimizationError, finish_loss
from kelight.objectives.base import StepState


def _state(step: int = 3) -> StepState:
    return StepState(step=step, batch=None, outputs=None)  # type: ignore[arg-type]


def test_terms_add_per_request_or_summed_into_a_scalar():
    term = lambda state: torch.tensor([1.0, 2.0])  # noqa: E731  (R,) per request
    torch.testing.assert_close(finish_loss(torch.tensor([0.5, 0.25]), (term,), _state(), lr=0.5),
                               torch.tensor([1.5, 2.25]))
    torch.testing.assert_close(finish_loss(torch.tensor(0.5), (term, term), _state(), lr=0.5), torch.tensor(6.5))


def test_non_finite_loss_names_the_step_the_requests_and_the_fix():
    nan = lambda state: torch.tensor([0.0, float("nan")])  # noqa: E731
    with pytest.raises(EditOptimizationError, match=r"z optimisation diverged at step 3 for request\(s\) \[1\] "
                       r".*lower lr \(now 0.5\) or use float32; the model weights were not changed"):
        finish_loss(torch.tensor([0.1, 0.2]), (nan,), _state(), lr=0.5)
    with pytest.raises(EditOptimizationError, match=r"^FT diverged at step 7 \(loss inf\)"):
        finish_loss(torch.tensor(float("inf")), (), _state(7), lr=1e-3, what="FT")

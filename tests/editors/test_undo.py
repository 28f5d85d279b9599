"""The undo log: bit-exact restore, refused non-finite deltas, restore callbacks, absorbing a change."""

import pytest
import torch

from kelight.editors.undo import UndoLog


def test_undo_log_restores_bit_exact_after_many_updates():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 6), requires_grad=False)
    q = torch.nn.Parameter(torch.randn(6, 4), requires_grad=False)  # Conv1D-style (in, out)
    p0, q0 = p.clone(), q.clone()
    undo = UndoLog()
    for _ in range(5):
        undo.add_(p, torch.randn(4, 6, dtype=torch.float64) * 1e-3)
        undo.add_(q, torch.randn(4, 6, dtype=torch.float64), transposed=True)
    assert not torch.equal(p, p0) and len(undo) == 2
    undo.restore()
    assert torch.equal(p, p0) and torch.equal(q, q0) and len(undo) == 0


def test_undo_log_refuses_non_finite_delta():
    p = torch.nn.Parameter(torch.zeros(2, 2), requires_grad=False)
    undo = UndoLog()
    with pytest.raises(FloatingPointError, match="NaN/inf"):
        undo.add_(p, torch.tensor([[float("nan"), 0.0], [0.0, 0.0]]))
    assert torch.equal(p, torch.zeros(2, 2))


def test_undo_log_runs_restore_callbacks_once():
    p = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    calls = []
    undo = UndoLog()
    undo.add_(p, torch.ones(2))
    undo.on_restore(lambda: calls.append(1))
    forget = calls.clear
    undo.on_restore(forget)
    undo.on_restore(forget)  # registered again: still called once
    calls.append(0)
    undo.restore()
    assert calls == [] and torch.equal(p, torch.zeros(2))
    undo.restore()  # callbacks are forgotten after they ran
    assert calls == []


def test_undo_log_absorb_keeps_the_oldest_original_and_the_callbacks():
    p = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    q = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    calls = []
    session, change = UndoLog(), UndoLog()
    session.add_(p, torch.ones(2))  # p: 0 → 1 in the session
    change.add_(p, torch.ones(2))  # p: 1 → 2 and q: 0 → 3 in a later change
    change.add_(q, torch.full((2,), 3.0))
    change.on_restore(lambda: calls.append("forget"))
    session.absorb(change)
    assert len(change) == 0 and len(session) == 2
    change.restore()  # emptied: touches nothing
    assert torch.equal(p, torch.full((2,), 2.0)) and calls == []
    session.restore()
    assert torch.equal(p, torch.zeros(2)) and torch.equal(q, torch.zeros(2)) and calls == ["forget"]


def test_undo_log_change_norm_is_the_frobenius_norm_of_every_change():
    a, b = torch.nn.Parameter(torch.ones(2, 3)), torch.nn.Parameter(torch.zeros(4))
    undo = UndoLog()
    assert undo.change_norm() == 0
    undo.add_(a, torch.full((2, 3), 2.0))
    undo.add_(b, torch.tensor([0.0, 3.0, 0.0, 4.0]))
    undo.add_(a, -torch.ones(2, 3))  # the net change of a counts, not each write
    torch.testing.assert_close(undo.change_norm(), torch.tensor((6 * 1.0 + 25.0) ** 0.5))
    undo.restore()
    assert undo.change_norm() == 0

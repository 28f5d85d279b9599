"""Closed-form weight updates shared by ROME, MEMIT and PMET, and the exact undo log.

Shapes use the linear convention ``W: (d_out, d_in)`` (value dim × key dim); adapters give a
view of Conv1D weights in that convention, so no caller transposes by guesswork.
"""

from __future__ import annotations

import torch
from torch import nn


def rank_one_update(
    weight: torch.Tensor,
    k_star: torch.Tensor,
    v_star: torch.Tensor,
    mom2: torch.Tensor | None,
    left_key: torch.Tensor | None = None,
) -> torch.Tensor:
    """ROME's update ``ΔW = (v* − W k)(C⁻¹k̄)ᵀ / ((C⁻¹k̄)ᵀ k)`` (computed in float64).

    With ``left_key=None`` (k̄ = k = k*) it is the minimum-change solution of ``min ‖Ŵ K − W K‖``
    subject to ``Ŵ k* = v*`` when ``C = K Kᵀ / n`` (ROME eq. 2; R-ROME uses this form). ROME's
    reference takes the direction from the template-averaged key k̄ and inserts at the plain
    prompt's key k; either way ``Ŵ k = v*`` exactly. ``mom2=None`` uses ``C = I``.

    Args:
        weight: ``(d_out, d_in)``.
        k_star: ``(d_in,)`` key at which ``v_star`` is stored.
        v_star: ``(d_out,)`` value to store.
        mom2: ``(d_in, d_in)`` second moment of keys, or ``None``.
        left_key: ``(d_in,)`` key that sets the update direction (default: ``k_star``).

    Returns:
        ``ΔW`` of shape ``(d_out, d_in)``, float64 on ``weight``'s device.
    """
    w, k, v = weight.double(), k_star.double(), v_star.double()
    k_dir = k if left_key is None else left_key.double()
    u = torch.linalg.solve(mom2.double(), k_dir) if mom2 is not None else k_dir  # (d_in,)
    denom = u @ k
    if not torch.isfinite(denom) or denom.abs() < torch.finfo(torch.float64).tiny:
        raise FloatingPointError("ROME update is singular: (C⁻¹k*)ᵀk* is zero or not finite")
    return torch.outer(v - w @ k, u) / denom


def least_squares_update(
    keys: torch.Tensor, residuals: torch.Tensor, mom2: torch.Tensor, mom2_weight: float
) -> torch.Tensor:
    """MEMIT's batch update ``Δ = R Kᵀ (λ C + K Kᵀ)⁻¹`` (MEMIT eq. 14, float64).

    Args:
        keys: ``(d_in, n)`` keys ``K`` of the edited subjects.
        residuals: ``(d_out, n)`` residuals ``R`` to write at those keys.
        mom2: ``(d_in, d_in)`` second moment ``C`` of keys.
        mom2_weight: ``λ`` weighing the preserved keys against the new ones.
    """
    k, r = keys.double(), residuals.double()
    a = mom2_weight * mom2.double() + k @ k.T  # (d_in, d_in), symmetric positive definite
    return torch.linalg.solve(a, k @ r.T).T  # (d_out, d_in) = R Kᵀ A⁻¹ since A is symmetric


class UndoLog:
    """Remembers each parameter's original values on first change; ``restore`` is bit-exact.

    Deltas are not subtracted back (floating point would not round-trip): the originals of the
    touched parameters are kept and copied back.
    """

    def __init__(self) -> None:
        self._originals: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._originals)

    def remember(self, param: torch.Tensor) -> None:
        if id(param) not in self._originals:
            self._originals[id(param)] = (param, param.detach().clone())

    @torch.no_grad()
    def add_(self, param: torch.Tensor, delta: torch.Tensor, transposed: bool = False) -> None:
        """``param += delta`` (``delta`` in linear convention; ``transposed`` for Conv1D)."""
        if not torch.isfinite(delta).all():
            raise FloatingPointError("refusing to apply a weight update with NaN/inf entries")
        self.remember(param)
        view = param.T if transposed else param
        view.add_(delta.to(device=param.device, dtype=param.dtype))

    @torch.no_grad()
    def restore(self) -> None:
        """Copy every remembered parameter back to its original value and forget them."""
        for param, original in self._originals.values():
            param.copy_(original)
        self._originals.clear()

"""Closed-form weight updates of the locate-then-edit editors (ROME, MEMIT, PMET, AlphaEdit).

Shapes use the linear convention ``W: (d_out, d_in)`` (value dim × key dim); adapters give a
view of Conv1D weights in that convention, so no caller transposes by guesswork.
"""

from __future__ import annotations

import torch


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


def nullspace_projector(mom2: torch.Tensor, threshold: float) -> tuple[torch.Tensor, int]:
    """AlphaEdit's projector ``P = Û Ûᵀ`` onto the eigenvectors of ``C`` with eigenvalue below ``threshold``.

    ``C = E[k kᵀ]`` of the preserved keys; an update ``Δ`` with ``Δ P = Δ`` leaves ``Δ k ≈ 0`` for every
    key the corpus produces (their energy outside ``P``'s range is below ``threshold``). Float64.

    Returns:
        ``(P, n)``: the ``(d, d)`` symmetric projector and its rank ``n`` (the null-space dimension).
    """
    c = mom2.double()
    eigvals, eigvecs = torch.linalg.eigh((c + c.T) / 2)  # symmetrised: C is symmetric up to rounding
    basis = eigvecs[:, eigvals < threshold]  # (d, n)
    return basis @ basis.T, basis.shape[1]


def nullspace_update(
    keys: torch.Tensor, residuals: torch.Tensor, projector: torch.Tensor, prior_gram: torch.Tensor | None,
    l2: float,
) -> torch.Tensor:
    """AlphaEdit's update ``Δ = R Kᵀ P ((K Kᵀ + K_p K_pᵀ) P + α I)⁻¹`` (Fang et al. 2025, float64).

    It is ``Δ' P`` for the ``Δ'`` minimising ``‖Δ'P K − R‖² + ‖Δ'P K_p‖² + α‖Δ'P‖²``, so ``Δ (I − P) = 0``
    exactly: the preserved keys (outside ``P``'s range) are not moved, and earlier edits' keys ``K_p``
    are kept as they were written. With ``P = I`` and no earlier edits it is
    :func:`least_squares_update` with ``α I`` in place of ``λ C``.

    Args:
        keys: ``(d_in, n)`` keys ``K`` of the edited subjects.
        residuals: ``(d_out, n)`` residuals ``R`` to write at those keys.
        projector: ``(d_in, d_in)`` null-space projector ``P`` (:func:`nullspace_projector`).
        prior_gram: ``(d_in, d_in)`` ``K_p K_pᵀ`` of the keys edited before on these weights, or ``None``.
        l2: ``α`` (> 0), the weight of the update's own norm.
    """
    k, r, p = keys.double(), residuals.double(), projector.double()
    gram = k @ k.T if prior_gram is None else k @ k.T + prior_gram.double()
    a = p @ gram + l2 * torch.eye(p.shape[0], dtype=torch.float64, device=p.device)  # = ((K Kᵀ + K_p K_pᵀ) P + α I)ᵀ
    # Δ = Δ P exactly in theory; multiplying by P again keeps Δ (I − P) at rounding level even when a
    # small α makes the solve ill-conditioned in the preserved directions
    return torch.linalg.solve(a, p @ k @ r.T).T @ p  # (d_out, d_in)

"""Lifelong normalisation (UltraEdit, Gu et al. 2025; StableEdit, Ma et al. 2026): running moments of the
editing features ``z = [k ; g]`` kept across edit turns, and the pseudo values they turn gradients into.

``k`` is the input of an edited MLP output matrix at one token (the paper's hidden state ``h``), ``g`` the
loss gradient at that matrix's output there (the paper's ``∇y``). Every turn's features update the
moments exactly (Chan et al.'s parallel algorithm), so after any number of turns they equal the mean
and variance of every feature seen since the last reset::

    N' = N + n,   δ = z̄ − μ,   μ' = μ + δ n / N',   S' = S + Σᵢ (zᵢ − z̄)² + δ² N n / N'
    σ = √(S' / (N' − 1)),   ẑ = (z − μ') / (σ + ε) = [k̂ ; ĝ]

(``z̄`` the turn's mean, squares elementwise, ``ε`` the statistics dtype's machine epsilon). With full
whitening (StableEdit) the gradient part is whitened by the covariance instead of its diagonal,
``ĝ = Σ̂^{-1/2} (g − μ_g)`` with ``Σ̂ = C / (N − d_out − 1)`` and ``C = Σ (g − μ_g)(g − μ_g)ᵀ`` updated as
``S`` is (``C' = C + Σᵢ (gᵢ − ḡ)(gᵢ − ḡ)ᵀ + δ_g δ_gᵀ N n / N'``), once ``N > d_out + 1`` (before that, the
diagonal). The pseudo value of a feature is the output change of one normalised gradient step on the
matrix, ``v = −η ‖k̂‖² ĝ``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LifelongStats:
    """Running moments of the features ``z = [k ; g]`` of every turn since the last reset (immutable:
    :meth:`updated` returns new moments, so a failed turn leaves these as they were).

    Attributes:
        d_in: key dimension (the first ``d_in`` entries of ``z`` are the key).
        count: ``N``, features seen.
        mean: ``μ``, ``(d_in + d_out,)``.
        m2: ``S``, the summed squared deviations from ``μ``, ``(d_in + d_out,)``.
        grad_comoment: ``C``, the gradients' summed outer deviations ``(d_out, d_out)``; ``None``
            unless full whitening is on.
    """

    d_in: int
    count: int
    mean: torch.Tensor
    m2: torch.Tensor
    grad_comoment: torch.Tensor | None = None

    @classmethod
    def empty(cls, d_in: int, d_out: int, dtype: torch.dtype, device: torch.device | str,
              whiten: bool) -> LifelongStats:
        """No feature seen yet."""
        zeros = torch.zeros(d_in + d_out, dtype=dtype, device=device)
        comoment = torch.zeros(d_out, d_out, dtype=dtype, device=device) if whiten else None
        return cls(d_in, 0, zeros, zeros.clone(), comoment)

    def updated(self, z: torch.Tensor) -> LifelongStats:
        """The moments after also seeing the ``n`` rows of ``z`` ``(n, d_in + d_out)`` (cast to this dtype)."""
        z = z.to(self.mean.dtype)
        n = z.shape[0]
        total = self.count + n
        batch_mean = z.mean(0)  # (D,)
        centred = z - batch_mean  # (n, D)
        delta = batch_mean - self.mean  # (D,)
        weight = self.count * n / total
        mean = self.mean + delta * (n / total)
        m2 = self.m2 + centred.square().sum(0) + delta.square() * weight
        comoment = None
        if self.grad_comoment is not None:
            grads, d_grad = centred[:, self.d_in:], delta[self.d_in:]  # (n, d_out), (d_out,)
            comoment = self.grad_comoment + grads.T @ grads + torch.outer(d_grad, d_grad) * weight
        return LifelongStats(self.d_in, total, mean, m2, comoment)

    def std(self) -> torch.Tensor:
        """``σ = √(S / (N − 1))`` ``(d_in + d_out,)``; zero while ``N ≤ 1``."""
        if self.count <= 1:
            return torch.zeros_like(self.m2)
        return (self.m2 / (self.count - 1)).clamp(min=0).sqrt()

    def is_finite(self) -> bool:
        parts = [self.mean, self.m2] + ([self.grad_comoment] if self.grad_comoment is not None else [])
        return all(bool(torch.isfinite(p).all()) for p in parts)

    def grad_whitener(self, floor: float) -> torch.Tensor | None:
        """``Σ̂^{-1/2}`` ``(d_out, d_out)`` of the gradients (StableEdit's full whitening), eigenvalues of
        ``Σ̂`` clamped below at ``floor`` × their mean; ``None`` without whitening, while
        ``N ≤ d_out + 1`` (too few features for the covariance) or when every gradient was equal."""
        if self.grad_comoment is None:
            return None
        d_out = self.grad_comoment.shape[0]
        if self.count <= d_out + 1:
            return None
        cov = self.grad_comoment / (self.count - d_out - 1)
        eigvals, eigvecs = torch.linalg.eigh((cov + cov.T) / 2)  # symmetrised: C is symmetric up to rounding
        scale = eigvals.mean()
        if not scale > 0:
            return None
        eigvals = eigvals.clamp(min=floor * scale)
        return (eigvecs * eigvals.rsqrt()) @ eigvecs.T  # U diag(λ^{-1/2}) Uᵀ


def pseudo_values(stats: LifelongStats, keys: torch.Tensor, grads: torch.Tensor, lr: float,
                  whitener: torch.Tensor | None = None) -> torch.Tensor:
    """``v = −η ‖k̂‖² ĝ`` for each feature, ``(n, d_out)``, in the statistics' dtype.

    Args:
        stats: the moments to normalise with (already updated with these features).
        keys: ``(n, d_in)`` keys ``k``.
        grads: ``(n, d_out)`` output gradients ``g``.
        lr: ``η``.
        whitener: ``Σ̂^{-1/2}`` for full whitening (:meth:`LifelongStats.grad_whitener`); ``None``: the
            diagonal ``σ``.
    """
    d_in, dtype = stats.d_in, stats.mean.dtype
    keys, grads = keys.to(dtype), grads.to(dtype)
    std, eps = stats.std(), torch.finfo(dtype).eps
    k_hat = (keys - stats.mean[:d_in]) / (std[:d_in] + eps)  # (n, d_in)
    centred = grads - stats.mean[d_in:]  # (n, d_out)
    g_hat = centred @ whitener if whitener is not None else centred / (std[d_in:] + eps)  # whitener symmetric
    return -lr * k_hat.square().sum(1, keepdim=True) * g_hat

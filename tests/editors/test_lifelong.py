"""Lifelong normalisation: the running moments equal the plain moments of every feature seen, and the pseudo
values follow ``v = −η ‖k̂‖² ĝ`` (diagonal or fully whitened)."""

from __future__ import annotations

import pytest
import torch

from kelight.editors.lifelong import LifelongStats, pseudo_values

D_IN, D_OUT = 5, 3


def _turns(sizes=(4, 1, 7), seed=0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, D_IN + D_OUT, generator=gen, dtype=torch.float64) * 3 + 1 for n in sizes]


@pytest.mark.parametrize("whiten", [False, True])
def test_moments_after_each_turn_equal_the_moments_of_everything_seen(whiten):
    stats = LifelongStats.empty(D_IN, D_OUT, torch.float64, "cpu", whiten)
    seen = []
    for z in _turns():  # a one-feature turn in the middle: no NaN (the reference's unbiased batch variance)
        stats = stats.updated(z)
        seen.append(z)
        every = torch.cat(seen)  # (N, D)
        assert stats.count == every.shape[0]
        torch.testing.assert_close(stats.mean, every.mean(0))
        torch.testing.assert_close(stats.std(), every.std(0))  # unbiased, as the reference's σ
        if whiten:
            grads = every[:, D_IN:]
            torch.testing.assert_close(stats.grad_comoment, torch.cov(grads.T) * (every.shape[0] - 1))
        else:
            assert stats.grad_comoment is None


def test_update_returns_new_moments_and_leaves_the_old_ones():
    empty = LifelongStats.empty(D_IN, D_OUT, torch.float64, "cpu", whiten=True)
    after = empty.updated(_turns()[0])
    assert empty.count == 0 and not empty.mean.any() and not empty.m2.any() and not empty.grad_comoment.any()
    assert after.count == 4


def test_std_is_zero_until_two_features():
    stats = LifelongStats.empty(D_IN, D_OUT, torch.float64, "cpu", whiten=False)
    assert not stats.std().any()
    assert not stats.updated(_turns((1,))[0]).std().any()


def test_float32_moments_are_cast_to_their_dtype():
    stats = LifelongStats.empty(D_IN, D_OUT, torch.float32, "cpu", whiten=False).updated(_turns()[0])
    assert stats.mean.dtype == stats.m2.dtype == torch.float32


def test_diagonal_pseudo_values_by_hand():
    z = torch.cat(_turns())
    stats = LifelongStats.empty(D_IN, D_OUT, torch.float64, "cpu", whiten=False).updated(z)
    keys, grads = z[:, :D_IN], z[:, D_IN:]
    eps = torch.finfo(torch.float64).eps
    mu, sigma = z.mean(0), z.std(0)
    k_hat, g_hat = ((z - mu) / (sigma + eps)).split([D_IN, D_OUT], dim=1)
    expected = -0.01 * (k_hat ** 2).sum(1, keepdim=True) * g_hat
    torch.testing.assert_close(pseudo_values(stats, keys, grads, lr=0.01), expected)
    assert stats.grad_whitener(1e-6) is None  # no C kept: the diagonal


def test_whitening_uses_the_covariance_once_there_are_enough_features():
    z = torch.cat(_turns((30, 20)))
    grads = z[:, D_IN:] @ torch.tensor([[2.0, 0.5, 0.0], [0.0, 1.0, 0.3], [0.0, 0.0, 0.1]], dtype=torch.float64)
    z = torch.cat([z[:, :D_IN], grads], dim=1)  # correlated gradients
    stats = LifelongStats.empty(D_IN, D_OUT, torch.float64, "cpu", whiten=True).updated(z)
    whitener = stats.grad_whitener(1e-9)
    cov = torch.cov(grads.T) * (len(z) - 1) / (len(z) - D_OUT - 1)  # StableEdit's C / (N − d − 1)
    torch.testing.assert_close(whitener @ cov @ whitener, torch.eye(D_OUT, dtype=torch.float64))
    k_hat = (z[:, :D_IN] - z[:, :D_IN].mean(0)) / (z[:, :D_IN].std(0) + torch.finfo(torch.float64).eps)
    expected = -0.5 * (k_hat ** 2).sum(1, keepdim=True) * ((grads - grads.mean(0)) @ whitener)
    torch.testing.assert_close(pseudo_values(stats, z[:, :D_IN], grads, lr=0.5, whitener=whitener), expected)
    few = LifelongStats.empty(D_IN, D_OUT, torch.float64, "cpu", whiten=True).updated(z[: D_OUT + 1])
    assert few.grad_whitener(1e-9) is None  # N ≤ d_out + 1: the diagonal


def test_whitening_floor_bounds_the_gain_of_a_flat_direction():
    z = torch.cat(_turns((40,)))
    z[:, -1] = 1e-12 * z[:, -2]  # one gradient direction with (almost) no variance
    stats = LifelongStats.empty(D_IN, D_OUT, torch.float64, "cpu", whiten=True).updated(z)
    gains = torch.linalg.eigvalsh(stats.grad_whitener(1e-2))
    cov_eigs = torch.linalg.eigvalsh(stats.grad_comoment / (stats.count - D_OUT - 1))
    assert gains.max() <= (1e-2 * cov_eigs.mean()).rsqrt() * (1 + 1e-9)

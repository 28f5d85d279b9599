"""Closed-form updates of the locate-then-edit editors against brute-force solutions."""

import numpy as np
import pytest
import torch

from kelight.editors.locate.solve import least_squares_update, nullspace_projector, nullspace_update, rank_one_update


def _problem(seed=0, d_out=5, d_in=7, n=40):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(d_out, d_in))
    keys = rng.normal(size=(d_in, n))  # preserved keys K0
    k_star = rng.normal(size=d_in)
    v_star = rng.normal(size=d_out)
    return w, keys, k_star, v_star


def _low_rank_moment(seed=0, d=8, rank=5):
    """A second moment with ``d - rank`` zero eigenvalues (a known null space) and its range basis."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(d, d)))[0]
    eig = np.concatenate([rng.uniform(1.0, 3.0, size=rank), np.zeros(d - rank)])
    return torch.from_numpy(basis @ np.diag(eig) @ basis.T), basis[:, :rank], basis[:, rank:]


def test_rank_one_update_equals_constrained_least_squares():
    w, keys, k_star, v_star = _problem()
    c = keys @ keys.T / keys.shape[1]
    delta = rank_one_update(*(torch.from_numpy(x) for x in (w, k_star, v_star, c))).numpy()
    # Brute force, row by row: min ||(ŵ - w) K0||² s.t. ŵ·k* = v*_i, solved as a KKT system.
    d_in = w.shape[1]
    kkt = np.zeros((d_in + 1, d_in + 1))
    kkt[:d_in, :d_in] = 2 * keys @ keys.T
    kkt[:d_in, d_in] = kkt[d_in, :d_in] = k_star
    for i in range(w.shape[0]):
        rhs = np.zeros(d_in + 1)
        rhs[d_in] = v_star[i] - w[i] @ k_star
        np.testing.assert_allclose(delta[i], np.linalg.solve(kkt, rhs)[:d_in], rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose((w + delta) @ k_star, v_star, rtol=1e-10)


def test_rank_one_update_with_separate_direction_key_hits_the_target():
    w, keys, k_star, v_star = _problem(4)
    c = keys @ keys.T / keys.shape[1]
    k_dir = k_star + 0.3 * np.random.default_rng(5).normal(size=k_star.shape)
    delta = rank_one_update(*(torch.from_numpy(x) for x in (w, k_star, v_star, c)), left_key=torch.from_numpy(k_dir))
    np.testing.assert_allclose((w + delta.numpy()) @ k_star, v_star, rtol=1e-10)
    u = np.linalg.solve(c, k_dir)  # every row of ΔW is parallel to C⁻¹k̄
    np.testing.assert_allclose(delta.numpy(), np.outer(v_star - w @ k_star, u) / (u @ k_star), rtol=1e-9)


def test_rank_one_update_identity_covariance_is_minimum_norm():
    w, _, k_star, v_star = _problem(1)
    delta = rank_one_update(*(torch.from_numpy(x) for x in (w, k_star, v_star)), None).numpy()
    expected = np.outer(v_star - w @ k_star, k_star) / (k_star @ k_star)
    np.testing.assert_allclose(delta, expected, rtol=1e-12)


def test_rank_one_update_rejects_zero_key():
    with pytest.raises(FloatingPointError, match="singular"):
        rank_one_update(torch.ones(2, 3), torch.zeros(3), torch.ones(2), None)


def test_least_squares_update_equals_lstsq():
    w, keys, _, _ = _problem(2)
    rng = np.random.default_rng(3)
    k_new = rng.normal(size=(w.shape[1], 3))
    resid = rng.normal(size=(w.shape[0], 3))
    c = keys @ keys.T / keys.shape[1]
    lam = 4.0
    delta = least_squares_update(torch.from_numpy(k_new), torch.from_numpy(resid), torch.from_numpy(c), lam).numpy()
    # min λ||Δ L||² + ||Δ K − R||² with C = L Lᵀ, as one stacked least-squares problem.
    chol = np.linalg.cholesky(c)
    a = np.concatenate([np.sqrt(lam) * chol, k_new], axis=1).T  # (d_in + n, d_in)
    b = np.concatenate([np.zeros((w.shape[0], chol.shape[1])), resid], axis=1).T
    expected = np.linalg.lstsq(a, b, rcond=None)[0].T
    np.testing.assert_allclose(delta, expected, rtol=1e-8, atol=1e-10)


def test_nullspace_projector_spans_the_small_eigenvalues():
    c, range_basis, null_basis = _low_rank_moment()
    p, rank = nullspace_projector(c, 1e-6)
    assert rank == 3
    torch.testing.assert_close(p, p.T)
    torch.testing.assert_close(p @ p, p)
    torch.testing.assert_close(p, torch.from_numpy(null_basis @ null_basis.T), rtol=0, atol=1e-12)
    assert float((p @ torch.from_numpy(range_basis)).abs().max()) < 1e-12  # preserved directions removed
    assert nullspace_projector(c, 1e-12)[1] == 3 and nullspace_projector(c, 10.0)[1] == 8


def test_nullspace_update_leaves_preserved_keys_and_writes_null_space_keys():
    c, range_basis, null_basis = _low_rank_moment(1)
    p, _ = nullspace_projector(c, 1e-6)
    rng = np.random.default_rng(2)
    keys = torch.from_numpy(null_basis @ rng.normal(size=(3, 2)))  # two new keys inside the null space
    resid = torch.from_numpy(rng.normal(size=(4, 2)))
    delta = nullspace_update(keys, resid, p, None, 1e-9)
    assert delta.shape == (4, 8) and delta.dtype == torch.float64
    assert float((delta @ torch.from_numpy(range_basis)).abs().max()) < 1e-12  # Δ K0 = 0
    torch.testing.assert_close(delta @ keys, resid, rtol=1e-6, atol=1e-6)  # α → 0: written exactly
    # a key with a preserved component: only its null-space part is written
    mixed = keys + torch.from_numpy(range_basis @ rng.normal(size=(5, 2)))
    torch.testing.assert_close(nullspace_update(mixed, resid, p, None, 1e-9) @ torch.from_numpy(range_basis),
                               torch.zeros(4, 5, dtype=torch.float64), rtol=0, atol=1e-9)


def test_nullspace_update_with_identity_projector_is_ridge_least_squares():
    rng = np.random.default_rng(4)
    keys, resid = torch.from_numpy(rng.normal(size=(6, 3))), torch.from_numpy(rng.normal(size=(5, 3)))
    eye = torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(nullspace_update(keys, resid, eye, None, 2.5),
                               least_squares_update(keys, resid, eye, 2.5), rtol=1e-10, atol=1e-12)
    prior = torch.from_numpy(rng.normal(size=(6, 4)))
    gram = prior @ prior.T  # earlier edits' keys weigh in as λC = K_p K_pᵀ + α I would
    torch.testing.assert_close(nullspace_update(keys, resid, eye, gram, 2.5),
                               least_squares_update(keys, resid, gram + 2.5 * eye, 1.0), rtol=1e-9, atol=1e-12)


def test_nullspace_update_minimises_alphaedits_objective():
    """Δ = Δ'P for the Δ' minimising ‖Δ'PK − R‖² + ‖Δ'P K_p‖² + α‖Δ'P‖² (brute force over Δ' = X Pᵀ)."""
    c, _, null_basis = _low_rank_moment(5, d=7, rank=3)
    p, _ = nullspace_projector(c, 1e-6)
    rng = np.random.default_rng(6)
    keys, resid, prior = (torch.from_numpy(rng.normal(size=s)) for s in ((7, 2), (3, 2), (7, 3)))
    alpha = 0.7
    delta = nullspace_update(keys, resid, p, prior @ prior.T, alpha).numpy()
    u = null_basis  # Δ'P = Y Uᵀ with Y (d_out, 4): a least-squares problem in Y
    a = np.concatenate([u.T @ keys.numpy(), u.T @ prior.numpy(), np.sqrt(alpha) * np.eye(u.shape[1])], axis=1).T
    b = np.concatenate([resid.numpy(), np.zeros((3, 3)), np.zeros((3, u.shape[1]))], axis=1).T
    y = np.linalg.lstsq(a, b, rcond=None)[0].T
    np.testing.assert_allclose(delta, y @ u.T, rtol=1e-8, atol=1e-10)

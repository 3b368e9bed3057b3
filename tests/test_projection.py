"""Projector maths against numpy: idempotent, symmetric, recomposition, edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nerve_interp.projection import (
    effective_rank_count,
    energy_k,
    make_projection,
    random_basis,
    subspace_indices,
    variance_fraction,
)


@pytest.fixture(scope="module")
def point():
    rng = np.random.default_rng(0)
    d = 12
    x = rng.standard_normal((800, d)) @ rng.standard_normal((d, d)) + 5.0
    cov = np.cov(x, rowvar=False)
    lam, u = np.linalg.eigh(cov)
    return x, lam[::-1].copy(), u[:, ::-1].copy(), x.mean(0)


def dense_p(proj):
    u = proj.basis.numpy()
    return u @ u.T


@pytest.mark.parametrize("subspace", ["top", "tail", "random", slice(3, 7)])
def test_projector_idempotent_symmetric_and_recomposes(point, subspace):
    x, lam, u, mu = point
    keep, frac = make_projection(lam, u, mu, subspace=subspace, k=4, mode="keep", seed=1)
    remove, _ = make_projection(lam, u, mu, subspace=subspace, k=4, mode="remove", seed=1)
    p = dense_p(keep)
    np.testing.assert_allclose(p @ p, p, atol=1e-12)
    np.testing.assert_allclose(p, p.T, atol=1e-12)
    assert np.trace(p) == pytest.approx(4)
    xt = torch.from_numpy(x)
    np.testing.assert_allclose(keep(xt).numpy(), mu + (x - mu) @ p, atol=1e-10)
    np.testing.assert_allclose((keep(xt) + remove(xt)).numpy() - mu, x, atol=1e-10)
    k0, _ = make_projection(lam, u, mu, subspace=subspace, k=4, mode="keep", center=False,
                            seed=1)
    r0, _ = make_projection(lam, u, mu, subspace=subspace, k=4, mode="remove", center=False,
                            seed=1)
    np.testing.assert_allclose((k0(xt) + r0(xt)).numpy(), x, atol=1e-10)
    # variance fraction: share of the sample variance inside the subspace
    xc = x - mu
    assert frac == pytest.approx(np.sum((xc @ p) ** 2) / np.sum(xc**2), rel=1e-9)


def test_extremes(point):
    x, lam, u, mu = point
    xt = torch.from_numpy(x)
    d = lam.size
    keep_all, frac = make_projection(lam, u, mu, k=d, mode="keep")
    assert frac == pytest.approx(1.0)
    np.testing.assert_allclose(keep_all(xt).numpy(), x, atol=1e-10)
    remove_none, _ = make_projection(lam, u, mu, k=0, mode="remove")
    np.testing.assert_array_equal(remove_none(xt).numpy(), x)
    remove_all, _ = make_projection(lam, u, mu, k=d, mode="remove")
    np.testing.assert_allclose(remove_all(xt).numpy(), np.broadcast_to(mu, x.shape), atol=1e-10)
    keep_none, _ = make_projection(lam, u, mu, k=0, mode="keep")
    np.testing.assert_array_equal(keep_none(xt).numpy(), np.broadcast_to(mu, x.shape))


def test_tail_skips_zero_variance_directions():
    lam = np.array([5.0, 3.0, 1.0, 1e-18, 0.0])
    assert effective_rank_count(lam) == 3
    assert subspace_indices(lam, "tail", 2).tolist() == [1, 2]
    with pytest.raises(ValueError, match=r"k == 4, must be in \[0, 3\]"):
        subspace_indices(lam, "tail", 4)


def test_random_basis_is_orthonormal_and_uniform():
    b = random_basis(10, 3, seed=5)
    np.testing.assert_allclose(b.T @ b, np.eye(3), atol=1e-12)
    np.testing.assert_array_equal(b, random_basis(10, 3, seed=5))
    # E[P] = (k/D) I for a Haar subspace
    mean_p = np.mean([(lambda q: q @ q.T)(random_basis(6, 2, s)) for s in range(3000)], axis=0)
    np.testing.assert_allclose(mean_p, np.eye(6) * 2 / 6, atol=0.02)


def test_energy_k_and_variance_fraction():
    lam = np.array([4.0, 3.0, 2.0, 1.0])
    assert energy_k(lam, 0.4) == 1 and energy_k(lam, 0.41) == 2 and energy_k(lam, 1.0) == 4
    assert energy_k(lam, 0.1, "tail") == 1 and energy_k(lam, 0.3, "tail") == 2
    assert variance_fraction(lam, None, np.array([0, 1])) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="fraction == 0"):
        energy_k(lam, 0)


def test_bad_arguments(point):
    _, lam, u, mu = point
    with pytest.raises(ValueError, match=r"k == 13, must be in \[0, 12\].*layers.1.ffn.post"):
        make_projection(lam, u, mu, k=13, context=" at layers.1.ffn.post")
    with pytest.raises(ValueError, match="mode='drop'"):
        make_projection(lam, u, mu, k=1, mode="drop")
    with pytest.raises(ValueError, match="subspace='middle'"):
        make_projection(lam, u, mu, subspace="middle", k=1)


@pytest.mark.parametrize("k", [0, 1, 3, 8])
def test_random_matched_holds_the_top_k_variance(point, k):
    """random_matched: the smallest prefix of a seeded Haar basis of R^D whose sample
    variance share reaches the top-k's, checked against a numpy reference on the data."""
    x, lam, u, mu = point
    d = lam.size
    proj, frac = make_projection(lam, u, mu, subspace="random_matched", k=k, mode="remove",
                                 seed=2)
    xc = x - mu
    target = float(np.sum((xc @ u[:, :k]) ** 2) / np.sum(xc**2))  # top-k share, from the data
    # reference: QR of the same seeded Gaussian matrix, sign-fixed, then the shortest prefix
    g = np.random.default_rng(2).standard_normal((d, d))
    q, r = np.linalg.qr(g)
    q = q * np.sign(np.diag(r))
    shares = np.array([np.sum((xc @ q[:, :m]) ** 2) / np.sum(xc**2) for m in range(d + 1)])
    m = int(np.argmax(shares >= target - 1e-12))
    assert proj.basis.shape == (d, m)
    np.testing.assert_allclose(proj.basis.numpy(), q[:, :m], atol=1e-12)
    assert frac == pytest.approx(shares[m], rel=1e-9, abs=1e-12)
    assert frac >= target - 1e-12
    if m:
        assert shares[m - 1] < target  # no shorter prefix would do
    if 0 < k < d:
        assert m > k  # random directions hold less variance than top ones: more are needed


def test_random_matched_known_answer_on_a_flat_spectrum():
    """With a flat spectrum every direction holds 1/D: m equals k exactly."""
    from nerve_interp.projection import matched_random_basis

    d = 12
    lam = np.ones(d)
    for k in (0, 1, 5, 12):
        b = matched_random_basis(lam, np.eye(d), k / d, seed=0)
        assert b.shape == (d, k)
    with pytest.raises(ValueError, match="fraction"):
        matched_random_basis(lam, np.eye(d), 1.5)

"""Spectrum: fp64 eigendecomposition, clipping of round-off negatives, warnings."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from nerve_interp.errors import NegativeEigenvalueWarning, NotFittedError, RankDeficientWarning
from nerve_interp.spectrum import spectrum_from_covariance


def test_eigen_pairs_descending_and_reconstruct():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((500, 6)) @ rng.standard_normal((6, 6))
    cov = np.cov(x, rowvar=False)
    s = spectrum_from_covariance(cov, x.mean(0), 500, eigenvectors=True)
    assert np.all(np.diff(s.eigenvalues) <= 0)
    U = s.eigenvectors
    np.testing.assert_allclose(U @ np.diag(s.eigenvalues) @ U.T, cov, atol=1e-10)
    np.testing.assert_allclose(s.eigenvalues, np.sort(np.linalg.eigvalsh(cov))[::-1], rtol=1e-10)


def test_rank_deficient_warns_and_negative_clipping_recorded():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 20))
    with pytest.warns(RankDeficientWarning, match="N = 5 tokens <= D = 20"):
        s = spectrum_from_covariance(np.cov(x, rowvar=False), x.mean(0), 5)
    assert s.eigenvalues.min() >= 0 and s.rank_deficient
    assert (s.eigenvalues > 1e-10 * s.eigenvalues[0]).sum() == 4


def test_few_tokens_per_dimension_warn_with_the_white_noise_floor():
    """N/D < 10 (N > D): a FiniteSampleWarning (not the rank-deficient subclass) quoting the
    Marchenko-Pastur floor; N/D >= 10 is silent; filters on either class keep working."""
    from nerve_interp.errors import FiniteSampleWarning

    assert issubclass(RankDeficientWarning, FiniteSampleWarning)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((80, 20))  # N/D = 4
    with pytest.warns(FiniteSampleWarning,
                      match=r"N/D = 4 < 10 \(N = 80 tokens, D = 20\) at s:.*At N/D = 4 white "
                            r"noise .* gives PR 0\.80·D, soft rank 0\.88·D, EEE 0\.28") as rec:
        spectrum_from_covariance(np.cov(x, rowvar=False), x.mean(0), 80, name="s")
    assert [w.category for w in rec] == [FiniteSampleWarning]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spectrum_from_covariance(np.eye(20), np.zeros(20), 200)  # N/D = 10: silent
        warnings.simplefilter("ignore", FiniteSampleWarning)  # ignores the subclass too
        spectrum_from_covariance(np.eye(20), np.zeros(20), 5)


def test_large_negative_eigenvalue_warns():
    cov = np.diag([1.0, 0.5, -0.1])
    with pytest.warns(NegativeEigenvalueWarning, match="most negative -1.000e-01"):
        s = spectrum_from_covariance(cov, np.zeros(3), 100)
    assert s.n_negative == 1 and s.min_eigenvalue == pytest.approx(-0.1)
    assert s.eigenvalues[-1] == 0.0


def test_roundoff_negative_is_silent():
    cov = np.diag([1.0, 0.5, -1e-17])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = spectrum_from_covariance(cov, np.zeros(3), 100)
    assert s.n_negative == 1


def test_missing_eigenvectors_error_says_how():
    s = spectrum_from_covariance(np.eye(3), np.zeros(3), 10)
    with pytest.raises(NotFittedError, match="eigenvectors=True"):
        s.require_eigenvectors()


def test_pipeline_eigenvalues_equal_sklearn_pca():
    """Accumulator + fp64 eigh == scikit-learn PCA's explained_variance_ (unbiased)."""
    import torch
    from sklearn.decomposition import PCA

    from nerve_interp.covariance import CovarianceAccumulator

    rng = np.random.default_rng(3)
    x = rng.standard_normal((2000, 16)) @ rng.standard_normal((16, 16)) + 300.0
    acc = CovarianceAccumulator("t", precision="fp64")
    for chunk in np.array_split(x, 9):
        acc.update(torch.from_numpy(chunk))
    s = spectrum_from_covariance(acc.covariance_, acc.mean_, acc.n_samples_seen_,
                                 eigenvectors=True)
    pca = PCA().fit(x)
    np.testing.assert_allclose(s.eigenvalues, pca.explained_variance_, rtol=1e-9)
    # same principal axes up to sign
    dots = np.abs(np.sum(s.eigenvectors.T * pca.components_, axis=1))
    np.testing.assert_allclose(dots, 1.0, atol=1e-8)


def test_non_finite_covariance_is_refused_not_decomposed():
    """torch's (MKL's) eigvalsh returned finite values for this NaN matrix (±1.41, on an AMD
    EPYC): that must be an error, not a spectrum."""
    cov = torch.eye(3, dtype=torch.float64)
    cov[0, 1] = cov[1, 0] = float("nan")
    for bad in (cov, cov.numpy(), torch.diag(torch.tensor([1.0, float("inf"), 2.0]))):
        with pytest.raises(ValueError, match=r"covariance of L3\.post has \d NaN/inf entries"):
            spectrum_from_covariance(bad, np.zeros(3), 100, name="L3.post")

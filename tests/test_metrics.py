"""Metrics against SPEC.md's check values, independent references and invariances."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import scipy.spatial.distance
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from nerve_interp import metrics as M

CHECKS = [  # SPEC.md §3: λ, SE, PR, EEE, soft_rank
    ([4, 3, 2, 1], 1.279854, 3.333333, 0.25, 3.596115),
    ([1, 1, 1, 1], 1.386294, 4.0, 0.0, 4.0),
    ([1, 0, 0, 0], 0.0, 1.0, 0.75, 1.0),
]


@pytest.mark.parametrize("lam,se,pr,eee,sr", CHECKS)
def test_spec_check_values(lam, se, pr, eee, sr):
    assert M.spectral_entropy(lam) == pytest.approx(se, abs=1e-6)
    assert M.participation_ratio(lam) == pytest.approx(pr, abs=1e-6)
    assert M.hard_rank(lam) == pytest.approx(pr, abs=1e-6)
    assert M.eee(lam) == pytest.approx(eee, abs=1e-6)
    assert M.soft_rank(lam) == pytest.approx(sr, abs=1e-6)


def test_js_check_values():
    assert M.js_divergence([4, 3, 2, 1], [1, 1, 1, 1]) == pytest.approx(0.027866, abs=1e-6)
    assert M.js_divergence([1, 0, 0, 0], [1, 1, 1, 1]) == pytest.approx(0.380396, abs=1e-6)
    assert M.js_divergence([5, 2, 1], [5, 2, 1]) == 0.0


def test_known_answers_flat_spike_power_law():
    d = 512
    flat = np.ones(d)
    assert M.participation_ratio(flat) == pytest.approx(d)
    assert M.spectral_entropy(flat) == pytest.approx(math.log(d))
    assert M.eee(flat) == pytest.approx(0.0, abs=1e-12)
    assert M.spectral_concentration(flat) == pytest.approx(math.ceil(d / 100) / d)
    spike = np.zeros(d)
    spike[7] = 3.0
    assert M.participation_ratio(spike) == pytest.approx(1.0)
    assert M.eee(spike) == pytest.approx((d - 1) / d)
    assert M.sui(spike) == pytest.approx(0.0, abs=1e-12)
    # power law λ_i = i^-α: PR = ζ-like sums, computed here in closed form by direct sums
    alpha = 1.5
    i = np.arange(1, d + 1, dtype=float)
    lam = i ** -alpha
    assert M.participation_ratio(lam) == pytest.approx(lam.sum() ** 2 / (lam**2).sum())
    p = lam / lam.sum()
    assert M.spectral_entropy(lam) == pytest.approx(-(p * np.log(p)).sum())


def test_against_scipy_and_sklearn():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((400, 12)) @ rng.standard_normal((12, 12)) + 50.0
    from sklearn.decomposition import PCA

    lam = PCA().fit(X).explained_variance_
    lam_np = np.sort(np.linalg.eigvalsh(np.cov(X, rowvar=False)))[::-1]
    # two fp64 routes (SVD of centred X vs eigh of the covariance): eigenvalues agree to
    # round-off of the largest one, ~1e-16·λ_1 per operation (the smallest here is 1e-4·λ_1,
    # so a relative bound on it is at the mercy of the BLAS build)
    np.testing.assert_allclose(lam, lam_np, rtol=1e-10, atol=1e-12 * lam_np[0])
    p = lam / lam.sum()
    assert M.spectral_entropy(lam) == pytest.approx(scipy.stats.entropy(p))
    q = rng.random(12)
    qs = np.sort(q / q.sum())[::-1]
    ref = scipy.spatial.distance.jensenshannon(p, qs) ** 2  # natural log by default
    assert M.js_divergence(lam, q) == pytest.approx(ref, rel=1e-10)
    # zero padding of the shorter spectrum
    ref_pad = scipy.spatial.distance.jensenshannon(np.r_[[0.5, 0.5], np.zeros(10)], p) ** 2
    assert M.js_divergence([1, 1], lam) == pytest.approx(ref_pad, rel=1e-10)


def test_compute_metrics_matches_functions_and_ranges():
    lam = np.linspace(10, 0.1, 300) ** 2
    m = M.compute_metrics(lam)
    assert tuple(m) == M.METRIC_NAMES
    assert m["soft_rank"] == pytest.approx(M.soft_rank(lam))
    assert m["sui"] == pytest.approx(M.sui(lam))
    assert m["hard_rank_utilization"] == pytest.approx(M.participation_ratio(lam) / 300)
    assert 0 <= m["eee"] < 1 and 1 <= m["participation_ratio"] <= 300


def test_reinjection_signs():
    r = M.reinjection([10, 1, 0.1, 0.01], [1, 1, 1, 0.5])
    assert r["pr_gain"] > 1 and r["delta_spectral_entropy"] > 0 and r["delta_eee"] < 0
    assert r["soft_rank_gain"] == pytest.approx(math.exp(r["delta_spectral_entropy"]))
    assert tuple(r) == M.REINJECTION_NAMES


@pytest.mark.parametrize("bad,msg", [
    ([], "empty"), ([[1, 2]], "1-D"), ([1, np.nan], "non-finite"), ([1, -0.5], "negative"),
    ([0, 0, 0], "sums to 0"),
])
def test_bad_spectra_raise(bad, msg):
    with pytest.raises(ValueError, match=msg):
        M.participation_ratio(bad)


def test_tiny_roundoff_negatives_are_zero():
    assert M.participation_ratio([1.0, -1e-15]) == pytest.approx(1.0)


def test_concentration_k_checked():
    with pytest.raises(ValueError, match="k == 5"):
        M.spectral_concentration([1, 1, 1], k=5)
    with pytest.raises(ValueError, match="k == 0"):
        M.spectral_concentration([1, 1, 1], k=0)


def test_metrics_module_is_pure():
    import subprocess

    code = ("import nerve_interp.metrics, sys; "
            "print('nnsight' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


spectra = arrays(np.float64, st.integers(2, 40),
                 elements=st.floats(0, 1e6, allow_nan=False, allow_subnormal=False))


@settings(max_examples=60, deadline=None)
@given(spectra, st.floats(1e-3, 1e3), st.randoms(use_true_random=False))
def test_invariances(lam, scale, rnd):
    if lam.sum() <= 1e-12 * max(lam.max(), 1):
        return
    perm = np.array(lam)
    rnd.shuffle(perm)
    for f in (M.spectral_entropy, M.participation_ratio, M.eee, M.soft_rank,
              M.spectral_concentration, M.sui):
        v = f(lam)
        # order-free and scale-free, up to float64 round-off of tiny p_i ln p_i terms
        assert f(perm) == pytest.approx(v, rel=1e-6, abs=1e-12)
        assert f(lam * scale) == pytest.approx(v, rel=1e-6, abs=1e-12)
    d = lam.size
    assert 1 - 1e-9 <= M.participation_ratio(lam) <= d + 1e-9
    assert -1e-12 <= M.spectral_entropy(lam) <= math.log(d) + 1e-9
    assert 0 <= M.eee(lam) < 1
    assert 0 <= M.js_divergence(lam, perm) <= 1e-12 + 0  # same multiset, same rank order
    assert M.soft_rank(lam) >= M.participation_ratio(lam) - 1e-6  # Rényi ranks decrease in α

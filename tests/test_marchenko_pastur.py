"""White noise as the finite-sample floor: Marchenko–Pastur values against simulated white
noise (numpy), the MP moments, and N/D beside every metric."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_tiny, random_batch

import nerve_interp as ni
from nerve_interp import metrics
from nerve_interp.marchenko_pastur import marchenko_pastur_eigenvalues, white_noise_metrics


def simulated(ratio: float, d: int = 300, reps: int = 3) -> dict[str, float]:
    """Mean PR / D, soft rank / D and EEE of white-noise sample covariances (numpy)."""
    rng = np.random.default_rng(int(ratio * 100))
    n, out = int(ratio * d), {"pr": [], "sr": [], "eee": []}
    for _ in range(reps):
        lam = np.linalg.eigvalsh(np.cov(rng.standard_normal((n, d)), rowvar=False)).clip(0)
        out["pr"].append(metrics.participation_ratio(lam) / d)
        out["sr"].append(metrics.soft_rank(lam) / d)
        out["eee"].append(metrics.eee(lam))
    return {k: float(np.mean(v)) for k, v in out.items()}


@pytest.mark.parametrize("ratio", [1, 4, 16])
def test_white_noise_matches_marchenko_pastur(ratio):
    """The issue's known answer: PR and soft rank of white noise at N/D in {1, 4, 16}
    equal the MP values within 2 %; EEE (true value 0) to 0.01."""
    d = 300
    mp, sim = white_noise_metrics(ratio * d, d), simulated(ratio, d)
    assert sim["pr"] == pytest.approx(mp["participation_ratio_fraction"], rel=0.02)
    assert sim["sr"] == pytest.approx(mp["soft_rank_fraction"], rel=0.02)
    assert sim["eee"] == pytest.approx(mp["eee"], abs=0.01)
    assert mp["eee"] > 0.1  # white noise is far from "no excess" at these N/D


def test_marchenko_pastur_moments_and_support():
    """Known answers: mean 1, second moment 1 + γ, support [(1 − √γ)², (1 + √γ)²]; for
    N < D a share 1 − N/D of exact zeros."""
    for n, d in [(8000, 1000), (1000, 1000), (4000, 1000)]:
        g = d / n
        lam = marchenko_pastur_eigenvalues(n, d)
        assert lam.shape == (d,) and np.all(np.diff(lam) <= 0)
        assert lam.mean() == pytest.approx(1.0, abs=2e-3)
        assert (lam ** 2).mean() == pytest.approx(1 + g, rel=5e-3)
        assert (1 - g ** 0.5) ** 2 - 1e-9 <= lam[-1] and lam[0] <= (1 + g ** 0.5) ** 2
    lam = marchenko_pastur_eigenvalues(500, 1000)
    assert (lam == 0).mean() == pytest.approx(0.5, abs=2e-3)
    assert lam.mean() == pytest.approx(1.0, abs=2e-3)
    m = white_noise_metrics(8 * 1536, 1536)  # the numbers at N/D = 8
    assert m["soft_rank_fraction"] == pytest.approx(0.94, abs=0.005)
    assert m["eee"] == pytest.approx(0.20, abs=0.01)
    with pytest.raises(ValueError, match="n_samples must be an int >= 1"):
        white_noise_metrics(0, 10)


@pytest.mark.filterwarnings("ignore::nerve_interp.errors.FiniteSampleWarning")
def test_every_table_says_n_and_n_over_d():
    res = ni.collect_spectra(make_tiny("gpt2"), [random_batch(seed=s) for s in range(2)],
                             progress=False, layers=[0])
    m, r = res.metrics(), res.reinjection()
    n = res.metadata["n_tokens"]
    assert (m["n_tokens"] == n).all() and np.allclose(m["n_over_d"], n / m["dim"])
    assert (r["n_tokens"] == n).all() and np.allclose(r["n_over_d"], n / 128)


def test_rank_deficient_warning_gives_the_white_noise_floor():
    with pytest.warns(ni.errors.RankDeficientWarning,
                      match=r"At N/D = 0\.\d+ white noise .* gives PR 0\.\d\d·D, soft rank"):
        ni.collect_spectra(make_tiny("gpt2"), [random_batch()], progress=False, layers=[0])

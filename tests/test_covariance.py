"""CovarianceAccumulator against numpy.cov in float64, merges in any order, save/resume."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from nerve_interp.covariance import CovarianceAccumulator
from nerve_interp.errors import CaptureError, NotFittedError, ResultsFileError


def heavy_tailed(n=3000, d=24, offset=1e3, seed=0):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d)) / np.sqrt(d)
    x = rng.standard_t(df=3, size=(n, d)) @ mix  # heavy tails
    return x + offset * (1 + rng.random(d))      # large, uneven mean offset


def rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("gram_dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_matches_numpy_cov_with_offset(gram_dtype, tol):
    x = heavy_tailed()
    acc = CovarianceAccumulator("t", gram_dtype=gram_dtype)
    for chunk in np.array_split(x, 7):
        acc.update(torch.from_numpy(chunk))
    ref = np.cov(x, rowvar=False)
    assert acc.n_samples_seen_ == len(x)
    assert rel_err(acc.covariance_.numpy(), ref) <= tol
    np.testing.assert_allclose(acc.mean_.numpy(), x.mean(0), rtol=1e-12)


def test_float32_input_with_offset_keeps_tail():
    """fp32 activations with a mean offset: centring per batch keeps small eigenvalues."""
    x = heavy_tailed(offset=1e2).astype(np.float32)
    acc = CovarianceAccumulator("t")
    for chunk in np.array_split(x, 5):
        acc.update(torch.from_numpy(chunk))
    ref = np.linalg.eigvalsh(np.cov(x.astype(np.float64), rowvar=False))
    got = np.linalg.eigvalsh(acc.covariance_.numpy())
    np.testing.assert_allclose(got, ref, rtol=1e-9)


def test_merge_order_invariant():
    x = heavy_tailed(n=900, d=10)
    parts = np.array_split(x, 4)
    accs = [CovarianceAccumulator(f"p{i}").update(torch.from_numpy(p))
            for i, p in enumerate(parts)]
    ref = np.cov(x, rowvar=False)
    results = []
    for order in itertools.permutations(range(4)):
        total = CovarianceAccumulator("total")
        for i in order:
            total.merge(accs[i])
        results.append(total.covariance_.numpy())
    # tree merge ((0+1)+(2+3))
    left = CovarianceAccumulator("l").merge(accs[0]).merge(accs[1])
    right = CovarianceAccumulator("r").merge(accs[2]).merge(accs[3])
    results.append(left.merge(right).covariance_.numpy())
    for r in results:
        assert rel_err(r, ref) <= 1e-10
        assert rel_err(r, results[0]) <= 1e-12
    assert accs[0].n_samples_seen_ == len(parts[0])  # merge does not modify its argument


def test_state_dict_resume_equals_uninterrupted():
    x = heavy_tailed(n=600, d=8)
    full = CovarianceAccumulator("f")
    for c in np.array_split(x, 6):
        full.update(torch.from_numpy(c))
    first = CovarianceAccumulator("a")
    for c in np.array_split(x, 6)[:3]:
        first.update(torch.from_numpy(c))
    resumed = CovarianceAccumulator("b").load_state_dict(first.state_dict())
    for c in np.array_split(x, 6)[3:]:
        resumed.update(torch.from_numpy(c))
    assert resumed.n_samples_seen_ == full.n_samples_seen_
    assert rel_err(resumed.covariance_.numpy(), full.covariance_.numpy()) <= 1e-12


def test_errors():
    acc = CovarianceAccumulator("layers.2.ffn.pre")
    with pytest.raises(NotFittedError, match="layers.2.ffn.pre has seen 0 tokens"):
        _ = acc.covariance_
    with pytest.raises(ValueError, match=r"must be 2-D \[N, D\]"):
        acc.update(torch.zeros(2, 3, 4))
    bad = torch.ones(5, 3)
    bad[2, 1] = float("nan")
    with pytest.raises(CaptureError, match="1 of 5 tokens have NaN/inf"):
        acc.update(bad)
    acc.update(torch.randn(4, 3))
    with pytest.raises(CaptureError, match="same D"):
        acc.update(torch.randn(4, 5))
    with pytest.raises(ResultsFileError, match="lacks"):
        CovarianceAccumulator("x").load_state_dict({"n": torch.tensor(3)})
    with pytest.raises(ValueError, match="16-bit"):
        CovarianceAccumulator("x", gram_dtype=torch.bfloat16)
    assert acc.update(torch.zeros(0, 3)).n_samples_seen_ == 4  # empty batch is a no-op

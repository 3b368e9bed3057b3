"""Eigenvalues through numpy's or torch's LAPACK (``nerve_interp._lapack``): the two agree, the
environment switch, and the process-wide BLAS thread count held and given back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_info

import nerve_interp as ni
from nerve_interp import _lapack
from nerve_interp._inflight import map_in_flight


def _blas_threads() -> set[int]:
    """Thread counts of numpy's own BLAS (the wheels' OpenBLAS lives in ``numpy.libs``; a
    BLAS loaded after ``_lapack`` first looked, e.g. SciPy's, is not the one it calls)."""
    blas = [i for i in threadpool_info() if i["user_api"] == "blas"]
    ours = [i for i in blas if "numpy" in i["filepath"]] or blas
    return {i["num_threads"] for i in ours}


def _heavy_tailed_cov(d: int = 300, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * d, d, generator=g, dtype=torch.float64)
    x *= torch.logspace(0, -4, d, dtype=torch.float64)  # λ from 1 to 1e-8
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    x = x @ q.T  # not diagonal
    xc = x - x.mean(0)
    return xc.T @ xc / (x.shape[0] - 1)


def test_numpy_and_torch_lapack_agree_on_a_heavy_tailed_covariance(monkeypatch):
    cov = _heavy_tailed_cov()
    monkeypatch.setenv(_lapack.ENV, "numpy")
    a = _lapack.eigvalsh(cov)
    monkeypatch.setenv(_lapack.ENV, "torch")
    b = _lapack.eigvalsh(cov)
    assert a.dtype == b.dtype == torch.float64 and a.shape == (300,)
    assert bool((a[1:] >= a[:-1]).all())  # ascending, like torch.linalg.eigvalsh
    lam1 = float(b[-1])
    # OpenBLAS's and MKL's dsyevd: two implementations, within float64 round-off of λ₁
    assert float((a - b).abs().max()) < 1e-12 * lam1
    assert not torch.equal(a, cov.diagonal().sort().values)  # not read off the diagonal


def test_known_answer_and_only_the_lower_triangle_is_read():
    d = torch.tensor([5.0, 1.0, 3.0, 1e-9], dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64,
                                       generator=torch.Generator().manual_seed(1)))
    cov = q @ torch.diag(d) @ q.T
    cov = torch.tril(cov) + torch.triu(torch.full((4, 4), 7.0, dtype=torch.float64), 1)
    got = _lapack.eigvalsh(cov)
    np.testing.assert_allclose(got.numpy(), np.sort(d.numpy()), rtol=0, atol=1e-13)


def test_the_backend_is_checked(monkeypatch):
    monkeypatch.setenv(_lapack.ENV, "mkl")
    with pytest.raises(ValueError, match="NERVE_INTERP_LAPACK='mkl' must be 'auto', 'numpy' "
                                         "or 'torch'"):
        _lapack.eigvalsh(torch.eye(3, dtype=torch.float64))
    monkeypatch.setenv(_lapack.ENV, " Torch ")
    assert _lapack.backend(100) == "torch"
    monkeypatch.setenv(_lapack.ENV, "numpy")
    assert _lapack.backend(100_000) == "numpy"
    with pytest.raises(ValueError, match="float64 CPU matrix"):
        _lapack.eigvalsh(torch.eye(3))


def test_auto_takes_numpy_while_the_matrix_fits_in_the_last_level_cache(monkeypatch):
    for env in ("auto", ""):
        monkeypatch.setenv(_lapack.ENV, env)
        monkeypatch.setitem(_lapack._STATE, "llc", 32 << 20)  # 32 MiB
        assert _lapack.backend(1536) == "numpy"   # 18.9 MB
        assert _lapack.backend(2048) == "numpy"   # 8·2048² = 32 MiB exactly
        assert _lapack.backend(2049) == "torch"
        assert _lapack.backend(None) == "torch"
        monkeypatch.setitem(_lapack._STATE, "llc", None)  # no sysfs (macOS, Windows)
        assert _lapack.backend(64) == "torch"
    monkeypatch.delitem(_lapack._STATE, "llc")
    llc = _lapack.last_level_cache_bytes()
    assert llc is None or llc >= 1 << 16


def test_torch_backend_calls_torch(monkeypatch):
    calls = []
    real = torch.linalg.eigvalsh
    monkeypatch.setattr(torch.linalg, "eigvalsh", lambda a: calls.append(1) or real(a))
    monkeypatch.setenv(_lapack.ENV, "torch")
    ni.spectrum_from_covariance(torch.eye(3, dtype=torch.float64), np.zeros(3), 100, warn=False)
    assert calls == [1]
    monkeypatch.setenv(_lapack.ENV, "numpy")
    ni.spectrum_from_covariance(torch.eye(3, dtype=torch.float64), np.zeros(3), 100, warn=False)
    assert calls == [1]
    monkeypatch.setenv(_lapack.ENV, "auto")
    monkeypatch.setitem(_lapack._STATE, "llc", 8 * 9)  # a 3 × 3 float64 matrix fits
    ni.spectrum_from_covariance(torch.eye(3, dtype=torch.float64), np.zeros(3), 100, warn=False)
    assert calls == [1]
    monkeypatch.setitem(_lapack._STATE, "llc", 8 * 9 - 1)  # it does not
    ni.spectrum_from_covariance(torch.eye(3, dtype=torch.float64), np.zeros(3), 100, warn=False)
    assert calls == [1, 1]


def test_blas_threads_are_held_and_given_back():
    before = _blas_threads()
    with _lapack.blas_threads(1):
        assert _blas_threads() == {1}
        _lapack.eigvalsh(_heavy_tailed_cov(50))  # inside a hold it does not move the count
        assert _blas_threads() == {1}
    assert _blas_threads() == before
    with pytest.raises(ValueError, match="n >= 1"):
        with _lapack.blas_threads(0):
            pass


def test_workers_hold_the_blas_at_their_share():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        before = _blas_threads()
        seen = list(map_in_flight(lambda _: _blas_threads(), range(4), workers=2))
        assert seen == [{1}] * 4
        assert _blas_threads() == before
    finally:
        torch.set_num_threads(threads)


def test_the_cache_size_is_read_from_sysfs_and_odd_entries_are_skipped(monkeypatch, tmp_path):
    for name, text in (("index0", "48K"), ("index2", "1024K"), ("index3", "32768K"),
                       ("index4", "lots")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "size").write_text(text + "\n")
    (tmp_path / "index5" / "size").mkdir(parents=True)  # unreadable as a file
    real = _lapack.Path
    monkeypatch.setattr(_lapack, "Path", lambda p: real(tmp_path) if "cache" in str(p) else real(p))
    monkeypatch.delitem(_lapack._STATE, "llc", raising=False)
    assert _lapack.last_level_cache_bytes() == 32 << 20
    monkeypatch.setattr(_lapack, "Path", lambda p: real(tmp_path / "none"))
    monkeypatch.delitem(_lapack._STATE, "llc")
    assert _lapack.last_level_cache_bytes() is None
    monkeypatch.delitem(_lapack._STATE, "llc")  # the next call reads the real machine again

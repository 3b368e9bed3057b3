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


@pytest.mark.parametrize("precision", ["fp64", "auto"])
def test_float32_input_with_offset_keeps_tail(precision):
    """fp32 activations with a mean offset (condition number 7.6e5): centring per batch keeps
    the small eigenvalues, to float64 round-off in "fp64" and, in the default float32 Gram,
    within a float32 unit round-off of λ₁ (Weyl: |Δλ_i| ≤ ‖ΔΣ‖₂; 0.1 of it on an AMD EPYC:
    1e-4 to 4e-3 of the smallest eigenvalue depending on the CPU's BLAS), where an uncentred
    float32 Gram (the null) is off by a factor of ~100 on the smallest."""
    x = heavy_tailed(offset=1e2).astype(np.float32)
    acc = CovarianceAccumulator("t", precision=precision)
    for chunk in np.array_split(x, 5):
        acc.update(torch.from_numpy(chunk))
    ref = np.linalg.eigvalsh(np.cov(x.astype(np.float64), rowvar=False))
    got = np.linalg.eigvalsh(acc.covariance_.numpy())
    if precision == "fp64":
        np.testing.assert_allclose(got, ref, rtol=1e-9)
    else:
        np.testing.assert_allclose(got, ref, rtol=0, atol=2.0**-23 * ref[-1])
    xt = torch.from_numpy(x)
    mean = xt.double().mean(0)
    uncentred = ((xt.T @ xt).double() - len(x) * torch.outer(mean, mean)) / (len(x) - 1)
    err_null = np.max(np.abs(np.linalg.eigvalsh(uncentred.numpy()) - ref) / ref)
    assert np.max(np.abs(got - ref) / ref) < 1e-3 * err_null


def test_merge_order_invariant():
    x = heavy_tailed(n=900, d=10)
    parts = np.array_split(x, 4)
    accs = [CovarianceAccumulator(f"p{i}", precision="fp64").update(torch.from_numpy(p))
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
    for prec in ("fp64", "fp32", "bf16-split"):  # +inf, -inf, both in one column (sum NaN)
        for values in ([float("inf")], [float("-inf")], [float("inf"), float("-inf")]):
            bad = torch.ones(6, 3, dtype=torch.bfloat16 if prec == "bf16-split" else None)
            bad[: len(values), 2] = torch.tensor(values)
            ok = CovarianceAccumulator("t", precision=prec).update(torch.randn(4, 3))
            with pytest.raises(CaptureError, match=f"{len(values)} of 6 tokens have NaN/inf"):
                ok.update(bad)
            assert ok.n_samples_seen_ == 4  # the bad batch was not folded in
    huge = torch.full((4, 2), 1e308, dtype=torch.float64)
    with pytest.raises(CaptureError, match="overflow"):
        CovarianceAccumulator("t").update(huge)
    acc.update(torch.randn(4, 3))
    with pytest.raises(CaptureError, match="same D"):
        acc.update(torch.randn(4, 5))
    with pytest.raises(ResultsFileError, match="lacks"):
        CovarianceAccumulator("x").load_state_dict({"n": torch.tensor(3)})
    with pytest.raises(ValueError, match="16-bit"):
        CovarianceAccumulator("x", gram_dtype=torch.bfloat16)
    assert acc.update(torch.zeros(0, 3)).n_samples_seen_ == 4  # empty batch is a no-op


# ------------------------------------------------------------------ precision modes
def bf16_heavy_tailed(n=4096, d=96, decades=5, offset=0.5, seed=0):
    """bf16-valued rows: t(4) tails, eigenvalues over `decades` decades, mean offset."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    lam = np.logspace(0, -decades, d)
    z = rng.standard_t(df=4, size=(n, d)) / np.sqrt(2.0)
    x = (z * np.sqrt(lam)) @ q.T + offset
    return torch.from_numpy(x).to(torch.bfloat16)


def eig_rel_err(cov, x):
    """Relative eigenvalue errors (descending) against numpy fp64 on the same bf16 values."""
    ref = np.linalg.eigvalsh(np.cov(x.double().numpy(), rowvar=False))[::-1]
    got = np.linalg.eigvalsh(np.asarray(cov, dtype=np.float64))[::-1]
    return np.abs(got - ref) / ref


def fold_split(x, *, include_lo_lo, float64_diagonal=True, chunk=512):
    """The bf16-split update written out by hand, with or without lo'lo and the float64
    diagonal (numpy fp64 fold)."""
    from nerve_interp.covariance import bf16_split, bf16_split_scatter

    n, m2, mean = 0, np.zeros((x.shape[1],) * 2), np.zeros(x.shape[1])
    for c in x.split(chunk):
        mb = c.double().mean(0)
        hi, lo = bf16_split(c.float() - mb.to(torch.bfloat16).float())
        g = bf16_split_scatter(hi, lo, include_lo_lo=include_lo_lo).double().numpy()
        d = (hi.double() + lo.double()).numpy()
        if float64_diagonal:
            np.fill_diagonal(g, np.einsum("nd,nd->d", d, d))
        r = d.sum(0)
        nb = len(c)
        delta = mb.numpy() - mean
        m2 += g - np.outer(r, r) / nb + np.outer(delta, delta) * n * nb / (n + nb)
        mean += delta * nb / (n + nb)
        n += nb
    return m2 / (n - 1)


@pytest.mark.parametrize("seed", [0, 3])
def test_bf16_split_matches_fp64_on_heavy_tailed_bf16(seed):
    """Measured (d=96, 5 decades, offset 0.5, 8 batches): worst tail-decile relative error
    6e-5..1.2e-4 for bf16-split, 2e-4..4e-4 for fp32, over seeds 0-4; bounds leave ~8x room."""
    x = bf16_heavy_tailed(seed=seed)
    errs = {}
    for prec in ("fp64", "fp32", "bf16-split"):
        acc = CovarianceAccumulator("t", precision=prec)
        for c in x.split(512):
            acc.update(c)
        assert acc.precision_ == prec and acc.n_samples_seen_ == len(x)
        np.testing.assert_allclose(acc.mean_.numpy(), x.double().numpy().mean(0), rtol=1e-12,
                                   atol=1e-15)
        errs[prec] = eig_rel_err(acc.covariance_.numpy(), x)
    k = x.shape[1] // 10
    assert errs["fp64"].max() <= 1e-9
    assert errs["bf16-split"][-k:].max() <= 1e-3          # tail decile
    assert errs["bf16-split"][:k].max() <= 1e-6           # top decile
    assert np.median(errs["bf16-split"]) <= 1e-5
    assert errs["bf16-split"][-k:].max() <= 3 * errs["fp32"][-k:].max()  # fp32-level


def test_bf16_split_needs_lo_lo():
    """Dropping lo'lo is what makes the split worth three products. Measured (seeds 0-3, 512
    rows per update): tail-decile error 2.5e-5..4.6e-5 with it, 6.6e-4..1.2e-3 without it
    (float64 diagonal kept), 1.5e-2..1.8e-2 without it and with a float32 diagonal."""
    x = bf16_heavy_tailed(seed=1)
    k = x.shape[1] // 10
    acc = CovarianceAccumulator("t", precision="bf16-split")
    for c in x.split(512):
        acc.update(c)
    full = eig_rel_err(fold_split(x, include_lo_lo=True), x)[-k:].max()
    lean = eig_rel_err(fold_split(x, include_lo_lo=False), x)[-k:].max()
    leaner = eig_rel_err(fold_split(x, include_lo_lo=False, float64_diagonal=False), x)
    ours = eig_rel_err(acc.covariance_.numpy(), x)[-k:].max()
    assert abs(full - ours) <= 0.05 * ours  # the hand-written fold is the accumulator's maths
    assert lean >= 3e-4 and lean >= 8 * full
    assert leaner[-k:].max() >= 5e-3 and leaner[-k:].max() >= 100 * full


def dense_bf16(n=8192, d=256, seed=0):
    """Tutorial 8's data: torch t(4) rows, 5 decades, dense rotation, mean offset 0.5, bf16."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    scales = torch.logspace(0, -5, d, dtype=torch.float64) ** 0.5
    rot = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    z = torch.distributions.StudentT(4.0).sample((n, d)).double()
    return ((z * scales) @ rot.T + 0.5).bfloat16()


def test_exact_diagonal_is_the_float64_column_sums_of_squares():
    """Why the diagonal is summed in float64 (known answer: the diagonal of a Gram matrix is
    the column sums of squares). Squares of short significands share their low bits, so a
    float32 GEMM *may* round their partial sums with a bias (one Intel MKL: mean diagonal
    error -1.3e-4 on the hi part of a 2048-row batch; an AMD AVX-512 MKL: none). How a BLAS
    rounds is not ours to assert; what we guarantee is that exact_diagonal and every
    accumulator mode give the float64 sums whatever the BLAS does."""
    from nerve_interp.covariance import bf16_split, exact_diagonal

    x = dense_bf16()[:2048]
    mb = x.double().mean(0)
    hi, _ = bf16_split(x.float() - mb.to(torch.bfloat16).float())
    exact = (hi.double() ** 2).sum(0)
    np.testing.assert_allclose(exact_diagonal(hi.float()).numpy(), exact.numpy(), rtol=1e-15)
    for prec in ("fp32", "bf16-split"):
        acc = CovarianceAccumulator("t", precision=prec)
        acc.update(x)
        # fp32 centres in float32 (round-off ~3e-9); the split's x - s is exact in float32
        np.testing.assert_allclose(acc.covariance_.diagonal().numpy(),
                                   x.double().var(0).numpy(),
                                   rtol=1e-9 if prec == "bf16-split" else 1e-7)


@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_split_dense_covariance_long_updates(seed):
    """Tutorial 8's setting (dense covariance, 2048 rows per update). Measured, seeds 0/1:
    tail-decile error bf16-split 3.2e-5/5.3e-5, fp32 1.4e-4/1.3e-4; before the float64
    diagonal it was 3.0e-3/2.9e-3 (split) and 1.8e-4/2.6e-4 (fp32)."""
    x = dense_bf16(seed=seed)
    k = x.shape[1] // 10
    errs = {}
    for prec in ("fp32", "bf16-split"):
        acc = CovarianceAccumulator("t", precision=prec)
        for c in x.split(2048):
            acc.update(c)
        errs[prec] = eig_rel_err(acc.covariance_.numpy(), x)[-k:].max()
        # per-coordinate variances: for the split, x − s is exact in float32 except for a
        # few tiny x far below s (measured 1e-11); fp32 has its centring round-off (3e-9)
        np.testing.assert_allclose(acc.covariance_.diagonal().numpy(),
                                   x.double().var(0).numpy(),
                                   rtol=1e-9 if prec == "bf16-split" else 1e-7)
    assert errs["bf16-split"] <= 1e-3
    assert errs["bf16-split"] <= errs["fp32"]


def test_bf16_split_is_exact_for_bf16_inputs():
    """x and the shift are bf16, so d = x - s and its hi + lo split are exact (known answer)."""
    from nerve_interp.covariance import bf16_split

    x = bf16_heavy_tailed(n=256, d=16)
    s = x.double().mean(0).to(torch.bfloat16)
    d = x.float() - s.float()
    hi, lo = bf16_split(d)
    assert hi.dtype == lo.dtype == torch.bfloat16
    exact = x.double() - s.double()
    assert torch.equal(hi.double() + lo.double(), exact)
    assert int((lo != 0).sum()) > 0  # the low part carries real bits


def test_bf16_split_merge_and_float64_input():
    """Split accumulators merge exactly with fp64 ones; float64 inputs are kept to ~2^-17."""
    x = torch.from_numpy(heavy_tailed(n=1200, d=12, offset=3.0))
    a = CovarianceAccumulator("a", precision="bf16-split").update(x[:500])
    b = CovarianceAccumulator("b", precision="fp64").update(x[500:])
    ref = np.cov(x.numpy(), rowvar=False)
    assert rel_err(a.merge(b).covariance_.numpy(), ref) <= 1e-4
    assert a.n_samples_seen_ == 1200


def test_precision_auto_and_gram_dtype_synonym():
    from nerve_interp.covariance import default_precision, resolve_precision

    acc = CovarianceAccumulator("t")
    assert acc.precision == "auto" and acc.precision_ is None
    acc.update(torch.randn(5, 3))
    assert acc.precision_ == "fp32" and acc.gram_dtype == torch.float32  # the default
    assert default_precision("cuda") == "fp32" and default_precision("cpu") == "fp32"
    assert CovarianceAccumulator("t", gram_dtype=torch.float32).precision == "fp32"
    assert CovarianceAccumulator("t", precision="bf16-split").gram_dtype == torch.float32
    assert resolve_precision("auto", "cuda:0") == "fp32"
    assert resolve_precision("fp32", "cuda:0") == "fp32"
    with pytest.raises(ValueError, match="disagree"):
        CovarianceAccumulator("t", precision="fp64", gram_dtype=torch.float32)
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        CovarianceAccumulator("t", precision="fp8")
    assert "precision='fp32'" in repr(acc)


@pytest.mark.parametrize("bad", ["bf16", "fp16", "tf32", "BF16"])
def test_unsafe_precisions_are_refused(bad):
    with pytest.raises(ValueError, match=r"refused.*bf16-split"):
        CovarianceAccumulator("layers.0.ffn.pre", precision=bad)
    with pytest.raises(ValueError, match="16-bit"):
        CovarianceAccumulator("x", gram_dtype=torch.float16)


def test_update_forbids_tf32_and_restores_settings(monkeypatch):
    """Inside the Gram products TF32 / reduced bf16 reductions are off; after, as before."""
    import nerve_interp.covariance as cov

    mm = torch.backends.cuda.matmul
    before = (mm.fp32_precision, mm.allow_bf16_reduced_precision_reduction,
              torch.backends.mkldnn.matmul.fp32_precision)
    seen = []
    real = cov.bf16_split_scatter

    def spy(*a, **kw):
        seen.append((mm.fp32_precision, mm.allow_bf16_reduced_precision_reduction,
                     torch.backends.mkldnn.matmul.fp32_precision))
        return real(*a, **kw)

    monkeypatch.setattr(cov, "bf16_split_scatter", spy)
    try:
        mm.fp32_precision = "tf32"
        mm.allow_bf16_reduced_precision_reduction = True
        CovarianceAccumulator("t", precision="bf16-split").update(torch.randn(8, 4))
        assert seen == [("ieee", False, "ieee")]
        assert mm.fp32_precision == "tf32" and mm.allow_bf16_reduced_precision_reduction
        with pytest.raises(RuntimeError), cov.full_precision_matmul():
            raise RuntimeError("restored even when the body fails")
        assert mm.fp32_precision == "tf32"
    finally:
        mm.fp32_precision, mm.allow_bf16_reduced_precision_reduction = before[:2]
        torch.backends.mkldnn.matmul.fp32_precision = before[2]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_split_on_cuda_matches_cpu_reference():
    """On a GPU, bf16-split on tensor cores, with fp32-level accuracy (TF32 is on)."""
    x = bf16_heavy_tailed(n=8192, d=256)
    mm = torch.backends.cuda.matmul
    before = mm.fp32_precision
    try:
        mm.fp32_precision = "tf32"  # what users often set; the accumulator must not obey
        acc = CovarianceAccumulator("t", precision="bf16-split")
        for c in x.cuda().split(1024):
            acc.update(c)
        assert acc.precision_ == "bf16-split" and acc.scatter_.is_cuda
        assert mm.fp32_precision == "tf32"
    finally:
        mm.fp32_precision = before
    k = x.shape[1] // 10
    assert eig_rel_err(acc.covariance_.cpu().numpy(), x)[-k:].max() <= 1e-3
    # the tensor-core products equal the CPU emulation up to fp32 summation order
    from nerve_interp.covariance import bf16_split, bf16_split_scatter

    hi, lo = bf16_split(x[:1024].float() - x[:1024].double().mean(0).bfloat16().float())
    cpu = bf16_split_scatter(hi, lo).double()
    gpu = bf16_split_scatter(hi.cuda(), lo.cuda()).double().cpu()
    assert float((gpu - cpu).abs().max() / cpu.abs().max()) <= 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows", [2048, 16384])
def test_bf16_split_on_cuda_dense_covariance(rows):
    """The GPU fast mode's accuracy target (issue 8: tail decile <= 1e-3 of fp64) on tensor
    cores, dense covariance, long updates; fp32 on CUDA cores alongside. Run with -s to see
    the numbers."""
    x = dense_bf16(n=32768, d=1024)
    k = x.shape[1] // 10
    errs = {}
    for prec in ("fp32", "bf16-split"):
        acc = CovarianceAccumulator("t", precision=prec)
        for c in x.cuda().split(rows):
            acc.update(c)
        errs[prec] = eig_rel_err(acc.covariance_.cpu().numpy(), x)
        print(f"\n{rows} rows/update {prec}: tail-decile {errs[prec][-k:].max():.2e}, "
              f"median {np.median(errs[prec]):.2e}")
    assert errs["fp32"][-k:].max() <= 1e-3
    assert errs["bf16-split"][-k:].max() <= 1e-3


# ------------------------------------------------------------------ symmetric (panel) Gram
@pytest.mark.parametrize("onednn", ["1", "0"])
def test_upper_gram_helpers_match_the_full_product(onednn, monkeypatch):
    """add_upper_gram + fill_lower give xcᵀxc (float64: to round-off; float32 panels widened
    into float64, through oneDNN or torch.mm); upper_matvec is S·v of the symmetric S;
    low-rank updates touch the upper block triangle (or all of it)."""
    monkeypatch.setenv("NERVE_INTERP_ONEDNN", onednn)
    from nerve_interp.covariance import (
        add_upper_gram,
        add_upper_low_rank,
        fill_lower,
        panels,
        upper_matvec,
    )

    assert panels(300, 128) == [(0, 128), (128, 256), (256, 300)]
    g = torch.Generator().manual_seed(0)
    xc = torch.randn(50, 300, generator=g, dtype=torch.float64)
    full = xc.T @ xc
    for dtype, tol in ((torch.float64, 1e-13), (torch.float32, 1e-6)):
        m2 = torch.zeros(300, 300, dtype=torch.float64)
        diag = add_upper_gram(m2, xc.to(dtype))
        assert diag.dtype == torch.float64
        assert rel_err(diag.double().numpy(), full.diagonal().numpy()) < tol
        assert not any(m2[j:, i:j].any() for i, j in panels(300))  # nothing below
        v = torch.randn(300, generator=g, dtype=torch.float64)
        assert rel_err(upper_matvec(m2, v).numpy(), (full @ v).numpy()) < tol
        fill_lower(m2)
        assert rel_err(m2.numpy(), full.numpy()) < tol
    u, w = torch.randn(300, 2, dtype=torch.float64), torch.randn(300, 2, dtype=torch.float64)
    for upper in (True, False):
        m2 = torch.zeros(300, 300, dtype=torch.float64)
        add_upper_low_rank(m2, u, w, upper=upper)
        assert torch.allclose(m2[:128], (u @ w.T)[:128], rtol=1e-14, atol=1e-14)
        assert bool(m2[200:, :100].any()) is not upper


@pytest.mark.parametrize("precision,tol", [("fp64", 1e-10), ("fp32", 1e-5), ("bf16-split", 1e-4)])
def test_wide_points_match_numpy_through_merges_and_state(precision, tol):
    """D = 300 > PANEL_WIDTH (the CPU forms only the upper block triangle per update): the
    covariance, the moments' M2·δ, a merge of two such accumulators and a saved state are
    those of the full matrix."""
    from nerve_interp.moments import NormMoments

    x = heavy_tailed(n=2400, d=300, offset=10.0, seed=3)
    ref = np.cov(x, rowvar=False)
    parts = []
    for rows in (x[:1000], x[1000:]):
        acc, mom = CovarianceAccumulator("t", precision=precision), NormMoments("t")
        for chunk in np.array_split(rows, 3):
            chunk = torch.from_numpy(chunk)
            mom.update(chunk, acc)
            acc.update(chunk)
        parts.append((acc, mom))
    acc, mom = parts[0]
    xc = x[:1000] - x[:1000].mean(0)
    assert mom.fourth_ == pytest.approx(float(((xc ** 2).sum(1) ** 2).sum()), rel=1e-6)
    total = CovarianceAccumulator("total").merge(parts[0][0]).merge(parts[1][0])
    cov = total.covariance_.numpy()
    assert rel_err(cov, ref) <= tol
    state = parts[1][0].state_dict()["scatter"].numpy()
    assert rel_err(state / 1399, np.cov(x[1000:], rowvar=False)) <= tol


def test_float64_rows_are_centred_before_the_float32_gram():
    """float64 rows far from 0 (offset 1e3, unit variance) under the default float32 Gram:
    centred in float64 first, so the covariance keeps float32's accuracy (1.3e-8 of its
    largest entry here); rounding the rows to float32 first (the null) errs by 3e-6."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((400, 6)) + 1e3
    ref = np.cov(x, rowvar=False)
    acc = CovarianceAccumulator("t").update(torch.from_numpy(x[:150])).update(
        torch.from_numpy(x[150:]))
    assert acc.precision_ == "fp32" and rel_err(acc.covariance_.numpy(), ref) < 2e-7
    rounded = np.cov(x.astype(np.float32).astype(np.float64), rowvar=False)
    assert rel_err(rounded, ref) > 1e-6


@pytest.mark.parametrize("precision", ["fp64", "fp32", "bf16-split"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_update_never_modifies_its_input(precision, dtype):
    """Centring works on a copy: the caller's activations come back bit for bit, whatever
    the input dtype and precision (float64 rows widen to float64 without a copy, so an
    in-place shift would otherwise write into them)."""
    x = (torch.randn(50, 7, dtype=torch.float64) + 3.0).to(dtype)
    before = x.clone()
    CovarianceAccumulator("t", precision=precision).update(x)
    assert torch.equal(x, before)


def _sink_batches(seed: int = 0, d: int = 64, n: int = 400, k: int = 4):
    """Batches of float32 rows with a spectrum over 4 decades and, first in each, one
    attention-sink-like row of norm 3000 (500x the others', as SmolLM2's layer-11 post)."""
    rng = np.random.default_rng(seed)
    rot = np.linalg.qr(rng.standard_normal((d, d)))[0]
    sink = rng.standard_normal(d)
    sink *= 3000 / np.linalg.norm(sink)
    out = []
    for _ in range(k):
        x = (rng.standard_normal((n, d)) * np.logspace(0, -2, d)) @ rot + 0.5
        x[0] = sink + rng.standard_normal(d)
        out.append(x.astype(np.float32))
    return out


@pytest.mark.parametrize("split", [True, False])
def test_massive_rows_enter_in_float64_so_removing_them_keeps_the_tail(split, monkeypatch):
    """A float32 product's round-off is relative to the rows it sums: with a massive row in
    it, taking that row out again (remove_rows, as without_outliers does) leaves the error in
    a covariance 10^4x smaller. The massive rows go through a float64 product instead, so the
    rest keeps float32's usual tail accuracy; without the split the tail is lost."""
    from nerve_interp import covariance
    from nerve_interp.diagnostics import remove_rows
    from nerve_interp.moments import NormMoments

    if not split:
        monkeypatch.setattr(covariance, "massive_rows", lambda n2: n2[:0].long())

    batches = _sink_batches()
    acc, mom = CovarianceAccumulator("sink", precision="fp32"), NormMoments("sink")
    for b in batches:
        acc.update(torch.from_numpy(b), moments=mom)
    every = np.concatenate(batches).astype(np.float64)  # all rows: the same to float32 level
    np.testing.assert_allclose(acc.covariance_.numpy(), np.cov(every, rowvar=False),
                               rtol=1e-5, atol=1e-6 * np.abs(every).max() ** 2 / len(every))
    fourth = ((np.linalg.norm(every - every.mean(0), axis=1)) ** 4).sum()
    assert mom.fourth_ == pytest.approx(fourth, rel=1e-10)
    massive = torch.from_numpy(np.stack([b[0] for b in batches]))
    n_a, _, m2_a = remove_rows(acc.n_samples_seen_, acc.mean_, acc.scatter_, massive)
    rest = np.concatenate([b[1:] for b in batches]).astype(np.float64)
    ref = np.linalg.eigvalsh(np.cov(rest, rowvar=False))
    got = np.linalg.eigvalsh((m2_a / (n_a - 1)).numpy())
    tail = np.abs(got[:6] - ref[:6]) / ref[:6]  # the smallest decile
    if split:  # measured 4.0e-5 (the others centred on their own mean; 1.3e-3 on the batch's)
        assert tail.max() < 1e-3
    else:  # measured 2.4, the smallest eigenvalues negative
        assert tail.max() > 0.5

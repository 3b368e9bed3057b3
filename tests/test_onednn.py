"""The float32 Gram panels through oneDNN (nerve_interp._onednn) and their use in
add_upper_gram: products within float32's bound, at most ONEDNN_ROWS rows per float32 sum,
IEEE float32 even when the user allows bf16 products, and torch.mm when oneDNN is off."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nerve_interp import _onednn
from nerve_interp import covariance as cov

U32 = 2.0**-24  # float32 unit round-off


def gamma(k: int) -> float:
    """Higham's γ_k = k·u / (1 − k·u): |fl(aᵀb) − aᵀb| ≤ γ_k |a|ᵀ|b| for any float32 dot
    product of length k, whatever the order of its sums (with or without FMA)."""
    return k * U32 / (1 - k * U32)


needs_onednn = pytest.mark.skipif(not _onednn.available(),
                                  reason="this torch has no oneDNN float32 product")


@pytest.fixture
def fresh_probe(monkeypatch):
    monkeypatch.setattr(_onednn, "_PROBE", {})


@needs_onednn
def test_rows_times_rows_is_within_float32_bound_of_float64():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(37, 300, generator=g) + 3.0
    b = torch.randn(53, 300, generator=g) - 1.0
    out = _onednn.rows_times_rows(a, b)
    assert out.dtype == torch.float32 and out.shape == (37, 53)
    exact = a.double() @ b.double().T
    bound = gamma(300) * (a.double().abs() @ b.double().abs().T)
    assert bool(((out.double() - exact).abs() <= bound).all())
    # and it is not a float64 product in disguise: float32 round-off is there
    assert float((out.double() - exact).abs().max()) > 0


@needs_onednn
def test_rows_times_rows_refuses_a_transposed_view():
    a = torch.randn(8, 16)
    with pytest.raises(ValueError, match="contiguous"):
        _onednn.rows_times_rows(a.T, a.T)


def test_environment_switch_turns_it_off(monkeypatch, fresh_probe):
    monkeypatch.setenv(_onednn.ENV, "0")
    assert _onednn.available() is False
    assert not cov._uses_onednn(torch.zeros(2, 2))


def test_a_torch_without_the_operator_falls_back_to_torch_mm(monkeypatch, fresh_probe):
    monkeypatch.delenv(_onednn.ENV, raising=False)
    monkeypatch.setattr(_onednn, "_linear", lambda: None)
    assert _onednn.available() is False
    g = torch.Generator().manual_seed(1)
    xc = torch.randn(40, 200, generator=g)
    m2 = torch.zeros(200, 200, dtype=torch.float64)
    cov.add_upper_gram(m2, xc)
    cov.fill_lower(m2)
    exact = xc.double().T @ xc.double()
    assert bool(((m2 - exact).abs() <= gamma(40) * (xc.double().abs().T @ xc.double().abs()))
                .all())


def test_a_probe_that_gets_a_wrong_product_turns_it_off(monkeypatch, fresh_probe):
    """A product off by more than float32 round-off (as a bf16 or TF32 one would be) is not
    used."""
    monkeypatch.delenv(_onednn.ENV, raising=False)
    monkeypatch.setattr(_onednn, "_linear",
                        lambda: lambda a, b, *rest: (a.bfloat16() @ b.bfloat16().T).float())
    assert _onednn.available() is False


@needs_onednn
def test_each_float32_sum_has_at_most_onednn_rows_rows(monkeypatch):
    """add_upper_gram multiplies blocks of ONEDNN_ROWS rows (the last padded with zeros to
    a multiple of ONEDNN_PAD, so products have a few shapes and oneDNN caches a few
    primitives per panel, not one per batch size) and adds their products in float32: each
    entry is a float32 sum of at most ONEDNN_ROWS + 3 terms, so within γ_(ONEDNN_ROWS+3)
    (one chain over the 900 rows may be off by up to γ_900); every panel sees every row
    once."""
    calls: list[tuple[int, int, int]] = []
    real = _onednn.rows_times_rows

    def spy(a, b):
        calls.append((int(a.shape[0]), int(b.shape[0]), int(a.shape[1])))
        return real(a, b)

    monkeypatch.setattr(_onednn, "rows_times_rows", spy)
    n, d = 900, 300
    g = torch.Generator().manual_seed(2)
    xc = torch.randn(n, d, generator=g)
    m2 = torch.zeros(d, d, dtype=torch.float64)
    diag = cov.add_upper_gram(m2, xc)
    rows = [k for *_, k in calls]
    blocks = -(-n // cov.ONEDNN_ROWS)
    last = n - (blocks - 1) * cov.ONEDNN_ROWS  # 132 rows, padded to 192
    assert set(rows) == {cov.ONEDNN_ROWS, -(-last // cov.ONEDNN_PAD) * cov.ONEDNN_PAD}
    assert all(k % cov.ONEDNN_PAD == 0 and k <= cov.ONEDNN_ROWS for k in rows)
    assert len(rows) == blocks * len(cov.panels(d))
    cov.fill_lower(m2)
    exact = xc.double().T @ xc.double()
    bound = gamma(cov.ONEDNN_ROWS + 3) * (xc.double().abs().T @ xc.double().abs())
    assert bool(((m2 - exact).abs() <= bound).all())
    assert float((diag - exact.diagonal()).abs().max()) <= float(bound.diagonal().max())


@needs_onednn
def test_a_user_allowing_bf16_products_does_not_reach_the_gram():
    """torch.backends.mkldnn.matmul.fp32_precision = "bf16" may let oneDNN round float32
    products to bf16 (~1e-3; torch 2.13's _linear_pointwise did not on an AMD EPYC);
    add_upper_gram forbids it while it runs and restores it."""
    mm = getattr(torch.backends.mkldnn, "matmul", None)
    if mm is None or not hasattr(mm, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision switch")
    g = torch.Generator().manual_seed(3)
    xc = torch.randn(200, 160, generator=g) + 0.5
    exact = xc.double().T @ xc.double()
    bound = gamma(200) * (xc.double().abs().T @ xc.double().abs())
    saved = mm.fp32_precision
    try:
        mm.fp32_precision = "bf16"
        m2 = torch.zeros(160, 160, dtype=torch.float64)
        cov.add_upper_gram(m2, xc)
        assert mm.fp32_precision == "bf16"  # restored
    finally:
        mm.fp32_precision = saved
    cov.fill_lower(m2)
    assert bool(((m2 - exact).abs() <= bound).all())


def test_no_rows_add_only_the_low_rank_term():
    """A batch of 0 rows (which the oneDNN blocks cannot split) adds nothing but ``u vᵀ``."""
    m2 = torch.zeros(200, 200, dtype=torch.float64)
    u = torch.ones(200, 1, dtype=torch.float64)
    diag = cov.add_upper_gram(m2, torch.zeros(0, 200), low_rank=(u, u))
    cov.fill_lower(m2)
    assert bool((m2 == 1).all()) and bool((diag == 0).all())


@pytest.mark.parametrize("path", ["onednn", "torch.mm", "float64"])
def test_before_gives_the_old_scatter_times_v(monkeypatch, path):
    """``before=(v, out)`` adds ``S v`` of the symmetric ``S`` that ``m2``'s upper block
    triangle held before the call (numpy's product, float64 round-off), whichever way the
    panels are multiplied; the lower blocks, stale, are not read."""
    if path == "onednn" and not _onednn.available():
        pytest.skip("this torch has no oneDNN float32 product")
    if path == "torch.mm":
        monkeypatch.setattr(cov, "_uses_onednn", lambda xc: False)
    g = torch.Generator().manual_seed(5)
    d = 300
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    s = a @ a.T
    m2 = s.clone()
    m2[torch.ones(d, d, dtype=torch.bool).tril(-cov.PANEL_WIDTH)] = float("nan")  # stale
    v = torch.randn(d, generator=g, dtype=torch.float64)
    out = torch.ones(d, dtype=torch.float64)
    xc = torch.randn(333, d, generator=g)
    cov.add_upper_gram(m2, xc.double() if path == "float64" else xc, before=(v, out))
    want = 1.0 + s.numpy() @ v.numpy()
    assert np.abs(out.numpy() - want).max() <= 1e-12 * np.abs(want).max()

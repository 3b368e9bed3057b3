"""Per-thread scratch buffers (nerve_interp._scratch) and their use by the covariance
update: reused, private to a thread, bounded, and never leaking one update's rows into the
next."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from nerve_interp import _scratch
from nerve_interp import covariance as cov
from nerve_interp.covariance import CovarianceAccumulator


def test_a_buffer_is_reused_and_grows_only_when_asked_for_more():
    _scratch.release()
    a = _scratch.scratch("t", (4, 8), torch.float32, "cpu")
    b = _scratch.scratch("t", (2, 8), torch.float32, "cpu")
    assert a.data_ptr() == b.data_ptr() and b.shape == (2, 8) and b.is_contiguous()
    c = _scratch.scratch("t", (40, 8), torch.float32, "cpu")
    assert c.shape == (40, 8)
    other = _scratch.scratch("u", (2, 8), torch.float32, "cpu")
    assert other.data_ptr() != c.data_ptr()  # another name, another buffer
    wide = _scratch.scratch("t", (2, 8), torch.float64, "cpu")
    assert wide.dtype == torch.float64
    _scratch.release()


def test_large_requests_get_a_fresh_tensor(monkeypatch):
    monkeypatch.setattr(_scratch, "MAX_BYTES", 1024)
    _scratch.release()
    a = _scratch.scratch("t", (64, 8), torch.float32, "cpu")  # 2 KB > 1 KB
    b = _scratch.scratch("t", (64, 8), torch.float32, "cpu")
    assert a.data_ptr() != b.data_ptr()


def test_each_thread_has_its_own_buffers():
    _scratch.release()
    mine = _scratch.scratch("t", (16,), torch.float32, "cpu").data_ptr()
    seen = []
    t = threading.Thread(target=lambda: seen.append(
        _scratch.scratch("t", (16,), torch.float32, "cpu").data_ptr()))
    t.start()
    t.join()
    assert seen and seen[0] != mine


def test_alternating_accumulators_do_not_see_each_others_rows():
    """Two points updated in turn share the scratch buffers: a batch of 700 rows (three
    oneDNN blocks) leaves rows where the next point's 300-row batch has padding. Each
    covariance is still numpy's, within float32 round-off."""
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(700, 200, generator=g) * 5 + 3, torch.randn(300, 200, generator=g)]
    accs = [CovarianceAccumulator(f"p{i}", precision="fp32") for i in range(2)]
    for _ in range(2):
        for acc, x in zip(accs, xs, strict=True):
            acc.update(x)
    for acc, x in zip(accs, xs, strict=True):
        ref = np.cov(torch.cat([x, x]).double().numpy(), rowvar=False)
        got = acc.covariance_.numpy()
        assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def test_centre_rows_writes_into_out_and_checks_it():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 12, generator=g) + 4
    out = torch.full((50, 12), float("nan"))
    got = cov.centre_rows(x, out=out)
    assert got.xc.data_ptr() == out.data_ptr()
    assert torch.equal(got.xc, cov.centre_rows(x).xc)
    with pytest.raises(ValueError, match=r"float32 of shape \(50, 12\)"):
        cov.centre_rows(x, out=torch.empty(50, 12, dtype=torch.float64))


def test_a_capture_uses_the_buffers_and_gives_them_back(monkeypatch):
    """collect_spectra's updates take their buffers from the pool, and the pool is empty
    once the stream is done (what the finish and the user need is not in it)."""
    import nerve_interp as ni
    from nerve_interp.models import make_lm

    names = []
    real = _scratch.scratch

    def spy(name, *args, **kwargs):
        names.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(cov, "scratch", spy)
    model = make_lm("tiny", vocab_size=256)
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 256, (4, 32), generator=g) for _ in range(2)]
    ni.collect_spectra(model, data, progress=False)
    assert "centred" in names
    assert not getattr(_scratch._LOCAL, "pool", {})

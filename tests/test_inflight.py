"""Eigendecompositions in flight (``nerve_interp._inflight``): order, threads, bounded memory,
errors, the environment switch, and a capture's finish the same with 1 or 2 workers."""

from __future__ import annotations

import threading
import time
import warnings

import numpy as np
import pytest
import torch
from conftest import make_tiny, random_batch
from test_diagnostics import lookup_data

import nerve_interp as ni
from nerve_interp._inflight import ENV, default_workers, map_in_flight
from nerve_interp.errors import OutlierTokenWarning


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _threads_seen_by_a_new_thread() -> int:
    seen = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    return seen[0]


def test_results_come_in_input_order_from_worker_threads(two_threads):
    def slow_first(i):  # the first item finishes last
        time.sleep(0.05 if i == 0 else 0.0)
        return i, threading.get_ident(), torch.get_num_threads()

    out = list(map_in_flight(slow_first, range(7), workers=2))
    assert [i for i, _, _ in out] == list(range(7))
    assert threading.get_ident() not in {t for _, t, _ in out}
    assert {n for _, _, n in out} == {1}  # each worker on 2 // 2 threads
    # the caller's count, and the one new threads start with, are given back
    assert torch.get_num_threads() == 2
    assert _threads_seen_by_a_new_thread() == 2


def test_one_worker_is_map_in_the_calling_thread(two_threads):
    out = list(map_in_flight(lambda i: (i * i, threading.get_ident(), torch.get_num_threads()),
                             range(4), workers=1))
    assert out == [(i * i, threading.get_ident(), 2) for i in range(4)]


def test_items_are_drawn_lazily_with_at_most_workers_pending(two_threads):
    drawn, done = [0], [0]

    def items():
        for i in range(20):
            drawn[0] += 1
            assert drawn[0] - done[0] <= 2, "more than 2 items pending"
            yield i

    for _ in map_in_flight(lambda i: i, items(), workers=2):
        done[0] += 1
    assert done[0] == drawn[0] == 20


def test_an_error_in_a_worker_is_raised_at_its_item_and_stops_the_rest(two_threads):
    started = []

    def fn(i):
        started.append(i)
        if i == 3:
            raise ValueError("covariance of point 3 has 1 NaN/inf entries")
        return i

    got = []
    with pytest.raises(ValueError, match="point 3"):
        for r in map_in_flight(fn, range(50), workers=2):
            got.append(r)
    assert got == [0, 1, 2] and max(started) <= 4
    assert torch.get_num_threads() == 2 and _threads_seen_by_a_new_thread() == 2


def test_the_environment_sets_the_workers(monkeypatch, two_threads):
    monkeypatch.delenv(ENV, raising=False)
    assert default_workers() == 2
    monkeypatch.setenv(ENV, "1")
    assert default_workers() == 1
    monkeypatch.setenv(ENV, "3")
    assert default_workers() == 3
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(ENV, bad)
        with pytest.raises(ValueError, match=f"{ENV}='{bad}' must be a positive integer"):
            default_workers()
    with pytest.raises(ValueError, match="workers must be >= 1"):
        list(map_in_flight(abs, [1], workers=0))


def test_one_thread_means_one_worker(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert default_workers() == 1
    finally:
        torch.set_num_threads(before)


def test_a_capture_finishes_the_same_with_one_or_two_workers(monkeypatch, two_threads):
    """Every spectrum, the spectra without outlier tokens and their fourth moments: the
    same with two decompositions in flight as one at a time (different thread counts round
    differently, so to round-off, not bitwise), and equal to numpy's."""
    model, sites, batches, _, _ = lookup_data()
    runs = {}
    for workers in ("1", "2"):
        monkeypatch.setenv(ENV, workers)
        with pytest.warns(OutlierTokenWarning):
            runs[workers] = ni.collect_spectra(model, batches, sites=sites, progress=False)
    one, two = runs["1"], runs["2"]
    assert dict(one.items()).keys() == dict(two.items()).keys() and len(dict(one.items())) >= 2
    for res_one, res_two in ((one, two), (one.without_outliers(), two.without_outliers())):
        for key, s1 in res_one.items():
            s2 = res_two.spectrum(*key)
            lam1 = float(s1.eigenvalues[0])
            assert np.max(np.abs(s1.eigenvalues - s2.eigenvalues)) <= 1e-12 * lam1, key
            assert s1.fourth_moment is not None
            assert s1.fourth_moment == pytest.approx(s2.fourth_moment, rel=1e-12), key
            assert s1.n_samples == s2.n_samples
    assert len(dict(two.without_outliers().items())) >= 1
    assert torch.get_num_threads() == 2 and _threads_seen_by_a_new_thread() == 2


def test_group_spectra_are_the_same_with_one_or_two_workers(monkeypatch, two_threads):
    """The K leave-one-group-out and the convergence spectra (and their fourth moments),
    decomposed in flight: the same as one at a time, in the same places."""
    model = make_tiny("llama")
    batches = [random_batch(seed=s) for s in range(4)]
    runs = {}
    for workers in ("1", "2"):
        monkeypatch.setenv(ENV, workers)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # few tokens per dimension: not the point here
            runs[workers] = ni.collect_spectra(model, batches, n_groups=4, progress=False)
    for key, s1 in runs["1"].items():
        g1, g2 = s1.groups, runs["2"].spectrum(*key).groups
        scale = float(s1.eigenvalues[0])
        for name in ("loo_eigenvalues", "conv_eigenvalues"):
            a, b = getattr(g1, name), getattr(g2, name)
            assert a.shape == b.shape and np.max(np.abs(a - b)) <= 1e-12 * scale, (key, name)
        for name in ("loo_fourth", "conv_fourth", "conv_n", "n"):
            np.testing.assert_allclose(getattr(g2, name), getattr(g1, name), rtol=1e-12)

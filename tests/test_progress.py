"""The package's progress bar: off under TQDM_DISABLE (tqdm's notebook bar ignores that switch),
and the plain bar, without tqdm.auto's TqdmWarning, outside a kernel with ipywidgets."""

from __future__ import annotations

import io
import warnings

import pytest
from tqdm.std import tqdm as std_tqdm

from nerve_interp._progress import bars_disabled, tqdm


@pytest.mark.parametrize(("value", "off"), [("1", True), ("true", True), ("0", False),
                                            ("", False), ("false", False)])
def test_tqdm_disable_switch(monkeypatch, value, off):
    monkeypatch.setenv("TQDM_DISABLE", value)
    assert bars_disabled() is off
    out = io.StringIO()
    bar = tqdm(range(3), file=out, desc="work")
    assert bar.disable is off
    assert list(bar) == [0, 1, 2]  # the iterable passes through either way
    bar.close()
    assert ("work" in out.getvalue()) is not off


def test_plain_bar_outside_a_kernel_and_no_warning(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a TqdmWarning would raise here
        bar = tqdm(total=2, file=io.StringIO(), disable=True)
    assert isinstance(bar, std_tqdm)
    bar.close()

"""Every Python example of the README runs against the current API.

The blocks run in order in one namespace (as pasted into one notebook), scaled by
``benchmarks/readme_blocks.scaled`` (token counts and training steps capped) so the whole
README takes a few minutes here; ``make bench BENCH_ARGS="--parts readme"`` runs them as
written and holds each to the time it states.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def readme_blocks():
    spec = importlib.util.spec_from_file_location("readme_blocks",
                                                  ROOT / "benchmarks" / "readme_blocks.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["readme_blocks"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("readme_blocks", None)


def test_blocks_are_found_and_state_their_time(readme_blocks):
    blocks = readme_blocks.python_blocks()
    assert len(blocks) >= 7
    slow = [b.line for b in blocks if "collect_spectra(" in b.code or "train(" in b.code]
    untimed = [b.line for b in blocks if b.line in slow and b.stated_seconds is None]
    assert not untimed, f"README blocks at lines {untimed} run a capture or training " \
                        "without stating their time on 2 cores"
    assert all(b.stated_seconds <= 180 for b in blocks if b.stated_seconds), \
        "every README example must run in under 3 minutes as written"


def test_scaling_caps_only_the_named_sizes(readme_blocks):
    code = "f(max_tokens=12_000, steps=5, every=50, n_groups=16, k=8)\nmax_tokens=100\n"
    assert readme_blocks.scaled(code) == \
        "f(max_tokens=1024, steps=5, every=6, n_groups=4, k=8)\nmax_tokens=100\n"
    assert readme_blocks.stated_seconds("# ~1-2 min on 2 cores") == 120
    assert readme_blocks.stated_seconds("# ~20 s") == 20
    assert readme_blocks.stated_seconds("x = 1") is None


def test_every_readme_block_runs(readme_blocks, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)          # the examples write files
    rows = readme_blocks.run_blocks(readme_blocks.python_blocks(), scale=True)
    print("scaled README blocks, wall s:", {r["line"]: round(r["seconds"], 1) for r in rows})
    assert len(rows) == len(readme_blocks.python_blocks())
    # what the examples promise to write, they wrote
    assert (tmp_path / "smollm2.safetensors").exists()
    assert (tmp_path / "run.pt").exists()

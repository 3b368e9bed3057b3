"""The README's Python examples as runnable blocks, with their stated times.

Every ```python block of README.md runs, in order, in one namespace (a later block may use
the names of an earlier one, as a reader pasting them into one notebook would). Two uses:

- ``tests/test_readme.py`` runs them **scaled** (:func:`scaled`: token counts, training
  steps and groups cut so the whole README runs in a few minutes of CI) to check that every
  block still runs against the current API;
- ``benchmarks/bench.py --parts readme`` runs them **as written** and reports each block's
  time beside the time its comment states (``~1-2 min on 2 cores``): the budget is the upper
  end of the stated range.

The file is plain Python with no nerve_interp import, so both can load it by path.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

README = Path(__file__).resolve().parent.parent / "README.md"

# A stated time: "~1-2 min", "~1 min", "~20 s" (the upper end is the budget).
_STATED = re.compile(r"~\s*(\d+(?:\.\d+)?)(?:\s*[-–]\s*(\d+(?:\.\d+)?))?\s*(min|s)\b")
# What the scaled run changes, and to what (the larger of the two is never taken).
SCALED_LIMITS = {"max_tokens": 1_024, "steps": 12, "every": 6, "n_groups": 4}


@dataclass(frozen=True)
class Block:
    """One ```python block of the README.

    Attributes
    ----------
    code : str
        The block's source, as written.
    line : int
        1-based line of the README where the block's code starts.
    stated_seconds : float or None
        The upper end of the first time the block states (``~1-2 min`` → 120 s), None when
        it states none.
    """

    code: str
    line: int
    stated_seconds: float | None


def python_blocks(path: Path = README) -> list[Block]:
    """Every ```python block of a Markdown file, in order.

    Raises
    ------
    ValueError
        If a block is not closed (the Markdown is broken).
    """
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    blocks, start = [], None
    for i, line in enumerate(lines):
        if start is None and line.strip() == "```python":
            start = i + 1
        elif start is not None and line.strip() == "```":
            code = "\n".join(lines[start:i]) + "\n"
            blocks.append(Block(code, start + 1, stated_seconds(code)))
            start = None
    if start is not None:
        raise ValueError(f"{path}: the ```python block opened at line {start} is never closed.")
    return blocks


def stated_seconds(code: str) -> float | None:
    """The upper end of the first ``~a-b min`` / ``~n s`` the code states, in seconds."""
    m = _STATED.search(code)
    if m is None:
        return None
    value = float(m.group(2) or m.group(1))
    return value * 60.0 if m.group(3) == "min" else value


def scaled(code: str, limits: dict[str, int] = SCALED_LIMITS) -> str:
    """The block with every ``name=<integer>`` of ``limits`` capped at its limit.

    ``max_tokens=12_000`` becomes ``max_tokens=2048``; smaller values stay as written.
    """
    def cap(m: re.Match) -> str:
        value = int(m.group(2).replace("_", ""))
        return f"{m.group(1)}={min(value, limits[m.group(1)])}"

    names = "|".join(map(re.escape, limits))
    return re.sub(rf"\b({names})=(\d[\d_]*)\b", cap, code)


def run_blocks(blocks: list[Block], *, scale: bool, namespace: dict[str, Any] | None = None
               ) -> list[dict[str, Any]]:
    """Execute the blocks in order in one namespace; one row per block.

    Each row: ``line``, ``seconds`` (wall time), ``stated_seconds`` and ``within`` (seconds
    ≤ stated, None when nothing is stated). An exception names the README line of its block.
    """
    ns = {"__name__": "__readme__"} if namespace is None else namespace
    rows = []
    for block in blocks:
        code = scaled(block.code) if scale else block.code
        t0 = time.perf_counter()
        try:
            exec(compile(code, f"README.md:{block.line}", "exec"), ns)
        except Exception as err:
            raise RuntimeError(f"the README block at line {block.line} failed: "
                               f"{type(err).__name__}: {err}") from err
        seconds = time.perf_counter() - t0
        stated = block.stated_seconds
        rows.append({"line": block.line, "seconds": seconds, "stated_seconds": stated,
                     "within": None if stated is None else seconds <= stated})
    return rows

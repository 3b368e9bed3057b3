"""Tutorials and paper-reproduction notebooks run top to bottom (the notebooks with their
small preset; their assertions check the claims) and are committed without outputs."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
TUTORIALS = sorted((ROOT / "tutorials").glob("*.ipynb"))


def test_notebooks_exist_and_are_stripped():
    assert len(NOTEBOOKS) >= 3 and len(TUTORIALS) >= 2
    for path in NOTEBOOKS + TUTORIALS:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, path.name
        if path in NOTEBOOKS:
            tags = [c.metadata.get("tags", []) for c in nb.cells]
            assert any("parameters" in t for t in tags), f"{path.name}: no parameters cell"
        else:  # a tutorial says what it teaches and ends with exercises
            assert "You will learn" in nb.cells[0].source, path.name
            assert "Exercises" in nb.cells[-1].source, path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path):
    """Paper notebooks, small preset. (Tutorials are executed by the docs build:
    tests/test_docs.py.)"""
    import papermill

    papermill.execute_notebook(str(path), str(tmp_path / path.name),
                               parameters={"preset": "small"}, cwd=str(tmp_path),
                               kernel_name="python3", progress_bar=False)

"""Checks of the notebook files in notebooks/: committed clean, described, runnable.

These read the files only. tests/test_notebook_execution.py runs them.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from workbench.notebook.runner import (
    find_notebooks,
    notebook_requirements,
    stored_outputs,
)

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
EXPECTED = {
    "01-explore-dataset.ipynb",
    "02-ingest-from-orthanc.ipynb",
    "03-train-and-evaluate.ipynb",
    "04-gemma-on-series.ipynb",
    "05-federated-simulation.ipynb",
    "06-audit-review.ipynb",
}


def test_expected_notebooks_present() -> None:
    names = {path.name for path in find_notebooks(NOTEBOOKS)}

    assert names >= EXPECTED


@pytest.mark.parametrize("path", find_notebooks(NOTEBOOKS), ids=lambda p: p.stem)
def test_notebook_committed_without_outputs(path: Path) -> None:
    findings = stored_outputs(path)

    assert findings == [], (
        f"{path.name} stores outputs; clear them with"
        f" `.venv/bin/python -m workbench.notebook.runner clear {path}`"
    )


@pytest.mark.parametrize("path", find_notebooks(NOTEBOOKS), ids=lambda p: p.stem)
def test_notebook_describes_itself(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    first = notebook.cells[0]

    assert first.cell_type == "markdown"
    assert first.source.startswith("# ")
    assert "Takes about" in first.source
    assert notebook.metadata.kernelspec.name == "python3"


@pytest.mark.parametrize("path", find_notebooks(NOTEBOOKS), ids=lambda p: p.stem)
def test_notebook_states_requirements(path: Path) -> None:
    requirements = notebook_requirements(path)

    assert requirements.min_figures >= 1
    assert requirements.needs
    assert 0 < requirements.timeout_s <= 600

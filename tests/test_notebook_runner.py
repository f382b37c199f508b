"""Tests of the notebook runner: headless execution, requirements, output clearing."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient.exceptions import CellExecutionError
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from workbench.errors import ConfigurationError
from workbench.notebook.runner import (
    DEFAULT_TIMEOUT_S,
    clear_outputs,
    main,
    notebook_requirements,
    run_notebook,
    stored_outputs,
)

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def write_notebook(path: Path, *sources: str, metadata: dict | None = None) -> Path:
    notebook = new_notebook(
        cells=[new_markdown_cell("# test"), *(new_code_cell(s) for s in sources)]
    )
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3"}
    notebook.metadata.update(metadata or {})
    nbformat.write(notebook, path)
    return path


def test_stored_outputs_and_clear(tmp_path: Path) -> None:
    path = write_notebook(tmp_path / "dirty.ipynb", "print(1)", "2")
    notebook = nbformat.read(path, as_version=4)
    notebook.cells[1].outputs = [new_output("stream", name="stdout", text="1\n")]
    notebook.cells[1].execution_count = 1
    notebook.cells[2].execution_count = 2
    notebook.metadata["widgets"] = {"state": {}}
    nbformat.write(notebook, path)

    assert stored_outputs(path) == [
        "cell 2: 1 outputs",
        "cell 2: execution count 1",
        "cell 3: execution count 2",
        "notebook metadata: widgets",
    ]
    assert clear_outputs(path) is True
    assert stored_outputs(path) == []
    cleared = path.read_bytes()
    assert clear_outputs(path) is False
    assert path.read_bytes() == cleared
    assert nbformat.read(path, as_version=4).cells[1].source == "print(1)"


def test_check_command_exit_status(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    clean = write_notebook(tmp_path / "clean.ipynb", "1")
    dirty = write_notebook(tmp_path / "dirty.ipynb", "1")
    notebook = nbformat.read(dirty, as_version=4)
    notebook.cells[1].execution_count = 5
    nbformat.write(notebook, dirty)

    assert main(["check", str(clean)]) == 0
    assert main(["check", str(clean), str(dirty)]) == 1
    assert f"{dirty}: cell 2: execution count 5" in capsys.readouterr().out


def test_requirements_defaults_and_values(tmp_path: Path) -> None:
    plain = write_notebook(tmp_path / "plain.ipynb", "1")
    stated = write_notebook(
        tmp_path / "stated.ipynb",
        "1",
        metadata={
            "workbench": {"needs": ["dataset"], "min_figures": 2, "timeout_s": 9}
        },
    )

    assert notebook_requirements(plain).needs == ()
    assert notebook_requirements(plain).timeout_s == DEFAULT_TIMEOUT_S
    assert notebook_requirements(stated).needs == ("dataset",)
    assert notebook_requirements(stated).min_figures == 2
    assert notebook_requirements(stated).timeout_s == 9


@pytest.mark.parametrize(
    "metadata",
    [
        {"need": ["dataset"]},
        {"needs": "dataset"},
        {"min_figures": -1},
        {"timeout_s": "60"},
        {"min_figures": True},
    ],
)
def test_requirements_rejects_invalid(tmp_path: Path, metadata: dict) -> None:
    path = write_notebook(tmp_path / "bad.ipynb", "1", metadata={"workbench": metadata})

    with pytest.raises(ConfigurationError, match=r"bad\.ipynb"):
        notebook_requirements(path)


def test_run_notebook_env_and_figures(tmp_path: Path) -> None:
    path = write_notebook(
        tmp_path / "plot.ipynb",
        "import os\nprint(os.environ['WORKBENCH_RUNNER_TEST'])\nprint(os.getcwd())",
        "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()",
    )
    before = path.read_bytes()

    run = run_notebook(path, env={"WORKBENCH_RUNNER_TEST": "invented value"})

    assert run.stream_text("stdout") == f"invented value\n{tmp_path}\n"
    assert run.figures == 1
    assert "image/png" in run.mime_types()
    assert run.stream_text("stderr") == ""
    assert path.read_bytes() == before


def test_run_notebook_failure_saved(tmp_path: Path) -> None:
    path = write_notebook(
        tmp_path / "fails.ipynb",
        "print('before')",
        "raise ValueError('invented failure')",
    )
    saved = tmp_path / "out" / "fails.ipynb"

    with pytest.raises(CellExecutionError, match="invented failure"):
        run_notebook(path, save_to=saved)

    executed = nbformat.read(saved, as_version=4)
    assert executed.cells[1].outputs[0]["text"] == "before\n"
    assert executed.cells[2].outputs[0]["ename"] == "ValueError"


def test_explore_notebook_without_dataset(tmp_path: Path) -> None:
    with pytest.raises(CellExecutionError, match="make demo"):
        run_notebook(
            NOTEBOOKS / "01-explore-dataset.ipynb",
            env={"WORKBENCH_DATASET": str(tmp_path / "missing")},
        )

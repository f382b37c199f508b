"""Run the project's notebooks headless, and keep them free of stored outputs.

The test suite executes every notebook in ``notebooks/`` with :func:`run_notebook`,
in a fresh kernel per notebook (nbclient). Parameters travel as environment
variables that the notebook's first code cell reads, such as ``WORKBENCH_DATASET``
and ``ORTHANC_URL``. The run fails on the first cell that raises, and counts the
figures (``image/png`` outputs) the notebook drew.

A notebook states what it needs in its metadata, so a new notebook runs in the tests
without a change to them::

    "metadata": {"workbench": {"needs": ["dataset"], "min_figures": 2,
                               "timeout_s": 120}}

Notebooks are committed without outputs. :func:`stored_outputs` lists the cells that
still carry some, and :func:`clear_outputs` removes them::

    python -m workbench.notebook.runner check notebooks/*.ipynb
    python -m workbench.notebook.runner clear notebooks/*.ipynb
    python -m workbench.notebook.runner run notebooks/01-explore-dataset.ipynb
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.errors import ConfigurationError

__all__ = [
    "METADATA_KEY",
    "NotebookRequirements",
    "NotebookRun",
    "clear_outputs",
    "find_notebooks",
    "notebook_requirements",
    "run_notebook",
    "stored_outputs",
]

log = logging.getLogger(__name__)

METADATA_KEY = "workbench"
DEFAULT_TIMEOUT_S = 300
# Notebook-level metadata that a front end writes and that must not be committed.
SESSION_METADATA = ("widgets",)


@dataclass(frozen=True)
class NotebookRequirements:
    """Resources and limits of a notebook, from its ``workbench`` metadata.

    Attributes
    ----------
    needs
        Names of the resources the notebook reads, such as ``"dataset"`` (a
        de-identified dataset in ``WORKBENCH_DATASET``) or ``"orthanc"`` (an
        Orthanc with studies in ``ORTHANC_URL``). The test suite provides each.
    min_figures
        The fewest ``image/png`` outputs a successful run draws.
    timeout_s
        Seconds one cell may run.
    """

    needs: tuple[str, ...] = ()
    min_figures: int = 0
    timeout_s: int = DEFAULT_TIMEOUT_S


@dataclass
class NotebookRun:
    """An executed notebook, with its outputs.

    Attributes
    ----------
    path
        The notebook file that was run (it is left unchanged).
    notebook
        The executed notebook, outputs included.
    seconds
        Wall-clock time of the run, kernel start included.
    """

    path: Path
    notebook: Any
    seconds: float
    outputs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def figures(self) -> int:
        """Number of outputs that carry a PNG image."""
        return sum("image/png" in output.get("data", {}) for output in self.outputs)

    def stream_text(self, name: str = "stderr") -> str:
        """Return the text of every ``stdout`` or ``stderr`` output, joined."""
        return "".join(
            str(output.get("text", ""))
            for output in self.outputs
            if output.get("output_type") == "stream" and output.get("name") == name
        )

    def mime_types(self) -> set[str]:
        """Return every MIME type among the rich outputs."""
        return {mime for output in self.outputs for mime in output.get("data", {})}


def find_notebooks(folder: Path) -> list[Path]:
    """Return the notebooks in ``folder``, sorted, without checkpoint copies."""
    return sorted(
        path
        for path in Path(folder).glob("*.ipynb")
        if ".ipynb_checkpoints" not in path.parts
    )


def notebook_requirements(path: Path) -> NotebookRequirements:
    """Read a notebook's ``workbench`` metadata.

    Raises
    ------
    ConfigurationError
        When the metadata has unknown keys or values of the wrong type.
    """
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    metadata = dict(notebook.metadata.get(METADATA_KEY, {}))
    known = {"needs", "min_figures", "timeout_s"}
    unknown = set(metadata) - known
    if unknown:
        raise ConfigurationError(
            f"notebook {path.name}: unknown {METADATA_KEY} metadata keys"
            f" {sorted(unknown)}; expected some of {sorted(known)}"
        )
    needs = metadata.get("needs", [])
    min_figures = metadata.get("min_figures", 0)
    timeout_s = metadata.get("timeout_s", DEFAULT_TIMEOUT_S)
    if not (isinstance(needs, list) and all(isinstance(n, str) for n in needs)):
        raise ConfigurationError(
            f"notebook {path.name}: {METADATA_KEY}.needs must be a list of names,"
            f" not {needs!r}"
        )
    for name, value in (("min_figures", min_figures), ("timeout_s", timeout_s)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigurationError(
                f"notebook {path.name}: {METADATA_KEY}.{name} must be a whole number"
                f" of 0 or more, not {value!r}"
            )
    return NotebookRequirements(tuple(needs), min_figures, timeout_s)


def run_notebook(
    path: Path,
    *,
    env: Mapping[str, str] | None = None,
    timeout_s: int | None = None,
    kernel_name: str | None = None,
    save_to: Path | None = None,
) -> NotebookRun:
    """Execute every cell of a notebook in a fresh kernel and return the result.

    The kernel runs in the notebook's folder, with this process's environment
    plus ``env``. The file itself is not changed.

    Parameters
    ----------
    path
        The notebook.
    env
        Environment variables for the kernel, such as ``WORKBENCH_DATASET``.
    timeout_s
        Seconds one cell may run (default: the notebook's ``timeout_s``).
    kernel_name
        Kernel to run (default: the notebook's kernelspec, else ``python3``).
    save_to
        Where to write the executed notebook, also when a cell fails, for
        inspection.

    Raises
    ------
    nbclient.exceptions.CellExecutionError
        When a cell raises; the message contains the cell and the traceback.
    nbclient.exceptions.CellTimeoutError
        When a cell runs longer than ``timeout_s``.
    """
    import nbformat
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    path = Path(path)
    notebook = nbformat.read(path, as_version=4)
    requirements = notebook_requirements(path)
    kernel = kernel_name or notebook.metadata.get("kernelspec", {}).get(
        "name", "python3"
    )
    client = NotebookClient(
        notebook,
        timeout=timeout_s or requirements.timeout_s,
        kernel_name=kernel,
        resources={"metadata": {"path": str(path.resolve().parent)}},
    )
    kernel_env = {**os.environ, "PYDEVD_DISABLE_FILE_VALIDATION": "1", **(env or {})}

    # CurveZMQ keys encrypt the kernel's loopback sockets, and spare each notebook
    # ipykernel's warning about plain-text TCP; older jupyter_client lacks them.
    launch: dict[str, Any] = {"env": kernel_env}
    if "transport_encryption" in KernelManager.class_trait_names():
        launch["transport_encryption"] = "auto"

    started = time.monotonic()
    try:
        client.execute(**launch)
    finally:
        seconds = time.monotonic() - started
        if save_to is not None:
            save_to.parent.mkdir(parents=True, exist_ok=True)
            nbformat.write(notebook, save_to)
    outputs = [
        dict(output)
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
    ]
    log.info("ran notebook %s in %.1f s", path.name, seconds)
    return NotebookRun(path=path, notebook=notebook, seconds=seconds, outputs=outputs)


def stored_outputs(path: Path) -> list[str]:
    """Describe what a notebook file stores beyond its code: outputs, counts, state.

    Returns
    -------
    list[str]
        One line per finding, such as ``"cell 3: 2 outputs"``; empty when the
        notebook is clean.
    """
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    findings = []
    for index, cell in enumerate(notebook.cells, start=1):
        if cell.cell_type != "code":
            continue
        if cell.get("outputs"):
            findings.append(f"cell {index}: {len(cell.outputs)} outputs")
        if cell.get("execution_count") is not None:
            findings.append(f"cell {index}: execution count {cell.execution_count}")
    for key in SESSION_METADATA:
        if key in notebook.metadata:
            findings.append(f"notebook metadata: {key}")
    return findings


def clear_outputs(path: Path) -> bool:
    """Remove outputs, execution counts and widget state; return whether it changed.

    The file is rewritten only when something was removed.
    """
    import nbformat

    if not stored_outputs(path):
        return False
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    for key in SESSION_METADATA:
        notebook.metadata.pop(key, None)
    nbformat.write(notebook, path)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """Check, clear or run notebooks from the command line; return the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m workbench.notebook.runner",
        description="Check that notebooks carry no outputs, clear them, or run them.",
    )
    parser.add_argument("command", choices=("check", "clear", "run"))
    parser.add_argument("notebooks", nargs="+", type=Path, metavar="NOTEBOOK")
    args = parser.parse_args(argv)

    status = 0
    for path in args.notebooks:
        if args.command == "check":
            findings = stored_outputs(path)
            for finding in findings:
                print(f"{path}: {finding}")
            status = status or (1 if findings else 0)
        elif args.command == "clear":
            if clear_outputs(path):
                print(f"{path}: outputs cleared")
        else:
            run = run_notebook(path)
            print(f"{path}: ran in {run.seconds:.1f} s, {run.figures} figures")
    return status


if __name__ == "__main__":
    sys.exit(main())

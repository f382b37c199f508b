"""Run every notebook in notebooks/ headless against data the tests build.

Each notebook names what it needs in its ``workbench`` metadata. For each need
``NAME`` a fixture ``notebook_env_NAME`` here provides it and returns the
environment variables that point the notebook at it, so a new notebook with known
needs runs without a change to this module. The executed notebooks are saved under
test-artifacts/notebooks/ for inspection.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from ingest_helpers import ingest_folder

from workbench.audit import open_audit_log
from workbench.dataset.reader import DatasetView
from workbench.notebook.runner import (
    NotebookRun,
    find_notebooks,
    notebook_requirements,
    run_notebook,
)
from workbench.orthanc.upload import upload_paths
from workbench.samples import generate_studies

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
ARTIFACTS = ROOT / "test-artifacts" / "notebooks"
CT_SLICES = 12
MR_SLICES = 6
PATIENTS = 2


@pytest.fixture(scope="module")
def notebook_studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("notebook-studies")
    generate_studies(
        folder,
        patients=PATIENTS,
        studies_per_patient=1,
        ct_slices=CT_SLICES,
        mr_slices=MR_SLICES,
        rows=48,
        columns=48,
    )
    return folder


@pytest.fixture(scope="module")
def notebook_dataset(
    notebook_studies: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("notebook-dataset") / "demo"
    summary = ingest_folder(notebook_studies, out, workers=1)
    assert summary.written == PATIENTS * (CT_SLICES + MR_SLICES)
    return out


# Providers, one per need named in notebook metadata.


@pytest.fixture
def notebook_env_dataset(notebook_dataset: Path) -> dict[str, str]:
    return {"WORKBENCH_DATASET": str(notebook_dataset)}


@pytest.fixture
def notebook_env_orthanc(
    orthanc: Any, notebook_studies: Path, tmp_path: Path
) -> dict[str, str]:
    with orthanc.client() as client:
        report = upload_paths(client, [notebook_studies], progress=False)
    assert len(report.outcomes) == PATIENTS * (CT_SLICES + MR_SLICES)
    return {
        "ORTHANC_URL": orthanc.url,
        "ORTHANC_USERNAME": orthanc.username,
        "ORTHANC_PASSWORD": orthanc.password,
        "WORKBENCH_INGEST_OUT": str(tmp_path / "ingested"),
    }


@pytest.fixture
def notebook_env_runs(tmp_path: Path) -> dict[str, str]:
    # Job outputs go to a fresh folder, outside the dataset and the repository.
    return {"WORKBENCH_RUNS": str(tmp_path / "runs")}


@pytest.fixture
def notebook_env_audit(notebook_dataset: Path) -> dict[str, str]:
    # The session's audit log, which the kernel finds through WORKBENCH_HOME,
    # contains the records of the dataset's ingest.
    return {}


# Checks of what particular notebooks must have done, beyond running.


def check_explore(run: NotebookRun, env: dict[str, str]) -> None:
    with open_audit_log() as audit:
        reads = audit.records(action="dataset.read", resource_prefix="dataset:demo")
    purposes = {record.purpose for record in reads}
    assert "explore the demo dataset" in purposes
    assert {"rows", "query", "series", "montage", "viewer", "volume"} <= {
        record.details["read"] for record in reads
    }
    assert "application/vnd.jupyter.widget-view+json" in run.mime_types()


def check_ingest(run: NotebookRun, env: dict[str, str]) -> None:
    view = DatasetView.open(env["WORKBENCH_INGEST_OUT"])
    modalities = view.instances(columns=["Modality"]).column("Modality").to_pylist()
    assert modalities == ["CT"] * PATIENTS * CT_SLICES
    assert f"instances:    {PATIENTS * CT_SLICES}" in run.stream_text("stdout")


def check_audit(run: NotebookRun, env: dict[str, str]) -> None:
    with open_audit_log() as audit:
        count = audit.verify().record_count
    assert "records verified" in run.stream_text("stdout")
    assert count > 0


def job_starts(purpose: str) -> list[Any]:
    with open_audit_log() as audit:
        return [r for r in audit.records(action="job.start") if r.purpose == purpose]


def check_train(run: NotebookRun, env: dict[str, str]) -> None:
    folder = only_run_folder(env, "03-train-and-evaluate")
    metrics = pd.read_csv(folder / "model" / "metrics.csv")
    predictions = pd.read_parquet(folder / "predictions" / "predictions.parquet")
    starts = job_starts("sphere classifier tutorial")
    accuracy = re.search(
        r"accuracy on (\d+) slices .*: ([0-9.]+)", run.stream_text("stdout")
    )

    assert list(metrics["epoch"]) == list(range(1, 9))
    assert len(predictions) == PATIENTS * CT_SLICES
    assert accuracy is not None
    assert int(accuracy.group(1)) == CT_SLICES
    assert float(accuracy.group(2)) >= 0.75
    assert [(r.details["job"], r.details["policy"]) for r in starts] == [
        ("train", "namespaces"),
        ("infer", "namespaces"),
    ]


def check_gemma(run: NotebookRun, env: dict[str, str]) -> None:
    folder = only_run_folder(env, "04-gemma-on-series")
    before = pd.read_parquet(folder / "before" / "generations.parquet")
    after = pd.read_parquet(folder / "after" / "generations.parquet")
    losses = pd.read_csv(folder / "lora" / "loss.csv")["loss"]
    starts = job_starts("Gemma 3n modality tutorial")

    assert len(before) == len(after) == PATIENTS * 2
    assert after["adapter"].notna().all()
    assert before["adapter"].isna().all()
    assert losses.tail(10).mean() < losses.head(10).mean()
    matches = re.search(r"(\d+)% of (\d+) stacks answered", run.stream_text("stdout"))
    assert matches is not None
    assert int(matches.group(2)) == PATIENTS * 2
    assert int(matches.group(1)) >= 75
    assert [(r.details["job"], r.details["policy"]) for r in starts] == [
        ("infer-gemma", "namespaces"),
        ("finetune-gemma", "namespaces"),
        ("infer-gemma", "namespaces"),
    ]


def check_federation(run: NotebookRun, env: dict[str, str]) -> None:
    folder = Path(env["WORKBENCH_RUNS"]) / "05-federated-simulation"
    metrics = pd.read_parquet(folder / "simulation" / "result" / "metrics.parquet")
    train = metrics[metrics.phase == "train"]
    server = metrics[metrics.phase == "server"].set_index("round")

    assert sorted(set(train.site)) == ["all", "east", "north", "south"]
    assert sorted(set(train["round"])) == [1, 2, 3]
    assert list(server.index) == [0, 1, 2, 3]
    assert (server.num_examples == PATIENTS * CT_SLICES).all()
    assert server.loc[3, "val_loss"] < server.loc[0, "val_loss"]
    for site in ("north", "south", "east"):
        audit = folder / "simulation" / "sites" / site / "audit.sqlite"
        with open_audit_log(audit) as log:
            log.verify()
            rounds = [
                r.details["round"] for r in log.records(action="federation.train")
            ]
        assert rounds == [1, 2, 3]
    assert "finished:completed" in run.stream_text("stdout")


def only_run_folder(env: dict[str, str], notebook: str) -> Path:
    """Return the one run folder (named by dataset version) a notebook wrote."""
    folders = list((Path(env["WORKBENCH_RUNS"]) / notebook).iterdir())
    assert len(folders) == 1
    return folders[0]


CHECKS: dict[str, Callable[[NotebookRun, dict[str, str]], None]] = {
    "01-explore-dataset": check_explore,
    "02-ingest-from-orthanc": check_ingest,
    "03-train-and-evaluate": check_train,
    "04-gemma-on-series": check_gemma,
    "05-federated-simulation": check_federation,
    "06-audit-review": check_audit,
}


def notebook_cases() -> list[Any]:
    cases = []
    for path in find_notebooks(NOTEBOOKS):
        marks = [pytest.mark.slow]
        if "orthanc" in notebook_requirements(path).needs:
            marks.append(pytest.mark.orthanc)
        cases.append(pytest.param(path, marks=marks, id=path.stem))
    return cases


@pytest.mark.parametrize("path", notebook_cases())
def test_notebook_runs(path: Path, request: pytest.FixtureRequest) -> None:
    requirements = notebook_requirements(path)
    # One thread per job: the tiny models gain nothing from more, and on a busy
    # 2-core machine 30 Gemma fine-tuning steps took 100 s with two threads
    # against 3 s with one.
    env: dict[str, str] = {"OMP_NUM_THREADS": "1"}
    for need in requirements.needs:
        provider = f"notebook_env_{need.replace('-', '_')}"
        try:
            env.update(request.getfixturevalue(provider))
        except pytest.FixtureLookupError:
            pytest.fail(
                f"{path.name} needs {need!r}, and no fixture {provider} provides it;"
                " add one to tests/test_notebook_execution.py"
            )

    run = run_notebook(path, env=env, save_to=ARTIFACTS / path.name)

    assert run.figures >= requirements.min_figures
    assert "Traceback" not in run.stream_text("stderr")
    check = CHECKS.get(path.stem)
    if check is not None:
        check(run, env)

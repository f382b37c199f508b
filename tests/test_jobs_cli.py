"""Training, inference and Gemma 3n from the command line, isolated, end to end.

Synthetic CT studies go into a real Orthanc, are ingested from there, and the
`workbench train`, `workbench infer` and `workbench finetune-gemma` commands run on
the dataset in the isolated child process (no network, dataset read-only). The
classification label is read off the pixels: a slice is positive when it cuts the
phantom's bright sphere, so a model that sees the images can learn it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pandas as pd
import pytest
from ingest_helpers import fixed_deid_key, orthanc_credentials

from workbench.audit import open_audit_log
from workbench.dataset.reader import DatasetView
from workbench.ingest import IngestConfig, run_ingest
from workbench.orthanc.upload import upload_paths
from workbench.samples import generate_studies
from workbench.samples.labels import sphere_labels

pytestmark = [pytest.mark.slow, pytest.mark.orthanc]

PURPOSE = "command-line job test"
CONFIG = """
[data]
level = "slice"
where = { Modality = "CT" }
labels = "labels.csv"
label_column = "sphere"
cache = "memory"

[task]
type = "classification"
metric = "accuracy"

[model]
name = "DenseNet"
args = { spatial_dims = 2, in_channels = 1, out_channels = 2, init_features = 8, \
growth_rate = 8, block_config = [2, 2], bn_size = 2 }

[[transforms]]
name = "ScaleIntensityRanged"
args = { keys = ["image"], a_min = 0.0, a_max = 700.0, b_min = 0.0, b_max = 1.0, \
clip = true }

[training]
epochs = 5
batch_size = 4
learning_rate = 0.01
validation_fraction = 0.34
seed = 0
device = "cpu"
"""


def workbench(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "workbench.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def data(orthanc_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("jobs")
    corpus = generate_studies(
        root / "corpus",
        patients=6,
        studies_per_patient=1,
        ct_slices=12,
        mr_slices=1,
        rows=32,
        columns=32,
        seed=1,
    )
    with orthanc_server.client() as client:
        for patient in client.patients():
            client.delete("Patient", patient)
        assert upload_paths(client, [corpus.root], progress=False).ok
    # A fixed key gives the same pseudonyms, so the same split, every session.
    with fixed_deid_key(root), orthanc_credentials(orthanc_server):
        run_ingest(
            IngestConfig(
                out=root / "dataset",
                orthanc=orthanc_server.url,
                purpose=PURPOSE,
                progress=False,
            )
        )

    configs = root / "configs"
    configs.mkdir()
    sphere_labels(root / "dataset", configs / "labels.csv")
    (configs / "train.toml").write_text(CONFIG)
    view = DatasetView.open(root / "dataset")
    rows = view.instances(columns=["SOPInstanceUID", "PatientID"]).to_pandas()
    rows = rows.merge(pd.read_csv(configs / "labels.csv"), on="SOPInstanceUID")
    return SimpleNamespace(
        root=root, dataset=root / "dataset", config=configs / "train.toml", rows=rows
    )


def job_records(job: str) -> list:
    with open_audit_log() as audit:
        return [
            r for r in audit.records() if r.action.startswith("job.") and
            r.details.get("job") == job
        ]  # fmt: skip


def test_train_then_infer_isolated(data):
    run = data.root / "run"
    workbench(
        "train", "--dataset", str(data.dataset), "--config", str(data.config),
        "--out", str(run), "--purpose", PURPOSE,
    )  # fmt: skip
    metrics = pd.read_csv(run / "metrics.csv")
    split = json.loads((run / "split.json").read_text())
    validation = data.rows[data.rows["PatientID"].isin(split["validation"])]
    share = validation["sphere"].mean()
    chance = max(share, 1 - share)
    assert metrics["val_metric"].max() >= chance + 0.2
    assert (run / "loss.png").exists()

    predictions_dir = data.root / "predictions"
    workbench(
        "infer", "--dataset", str(data.dataset), "--model", str(run),
        "--out", str(predictions_dir), "--purpose", PURPOSE,
    )  # fmt: skip
    predictions = pd.read_parquet(predictions_dir / "predictions.parquet")
    assert set(predictions["SOPInstanceUID"]) == set(data.rows["SOPInstanceUID"])
    merged = predictions.merge(data.rows, on="SOPInstanceUID")
    accuracy = (merged["predicted_label"] == merged["sphere"]).mean()
    assert accuracy >= 0.8

    start, end = job_records("train")[-2:]
    assert start.action == "job.start"
    assert start.details["policy"] == "namespaces"
    assert end.outcome == "ok"


def test_gemma_tiny_infer_and_finetune(data):
    out = data.root / "gemma"
    workbench(
        "infer", "--dataset", str(data.dataset), "--gemma", "tiny",
        "--prompt", "Modality: {Modality}. Describe the image.",
        "--out", str(out), "--purpose", PURPOSE, "--max-new-tokens", "8",
    )  # fmt: skip
    generations = pd.read_parquet(out / "generations.parquet")
    stacks = DatasetView.open(data.dataset).volumes()
    assert set(generations["SeriesInstanceUID"]) == set(stacks["SeriesInstanceUID"])
    assert generations["text"].str.len().min() > 0

    lora = data.root / "gemma-lora"
    result = workbench(
        "finetune-gemma", "--dataset", str(data.dataset), "--gemma", "tiny",
        "--prompt", "Describe the image.", "--target-column", "Modality",
        "--steps", "30", "--learning-rate", "0.01",
        "--out", str(lora), "--purpose", PURPOSE,
    )  # fmt: skip
    loss = pd.read_csv(lora / "loss.csv")["loss"]
    assert loss.tail(5).mean() < loss.head(5).mean()
    summary = json.loads(result.stdout)
    assert summary["trainable_parameters"] > 0
    assert (lora / "adapter").is_dir()


def test_no_isolation_is_audited(data):
    out = data.root / "debug-run"
    (data.root / "configs" / "short.toml").write_text(
        CONFIG.replace("epochs = 5", "epochs = 1")
    )
    workbench(
        "train", "--dataset", str(data.dataset),
        "--config", str(data.root / "configs" / "short.toml"),
        "--out", str(out), "--purpose", PURPOSE, "--no-isolation",
    )  # fmt: skip
    start = job_records("train")[-2]
    assert start.action == "job.start"
    assert start.details["policy"] == "none"


def test_raw_folder_refused(data, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "workbench.cli",
            "train",
            "--dataset",
            str(raw),
            "--config",
            str(data.config),
            "--out",
            str(tmp_path / "out"),
            "--purpose",
            PURPOSE,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1
    assert "no manifest.json" in result.stderr
    assert not (tmp_path / "out").exists()

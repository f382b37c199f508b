"""Training and inference jobs, end to end on a real ingest of synthetic CT studies.

Six invented patients, one axial CT series of 12 slices (32 x 32) each. The label
is read off the pixels: a slice is positive when it cuts the phantom's bright
sphere (some voxel at or above 370 HU, halfway between body and sphere). The mask
for segmentation marks those voxels.

The ingest uses a fixed de-identification key, so the pseudonyms, and with them
the split by patient, are the same in every test session.
"""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from ingest_helpers import fixed_deid_key, ingest_folder

from workbench.audit import open_audit_log
from workbench.dataset.reader import DatasetView
from workbench.errors import ConfigurationError, DatasetError
from workbench.inference import run_inference
from workbench.samples import generate_studies
from workbench.training import load_config, run_training
from workbench.training.config import build_network, build_transforms

SPHERE_HU = 370
PATIENTS, SLICES, SIZE = 6, 12, 32
PURPOSE = "training tests"
CONFIGS = Path(__file__).resolve().parent.parent / "workbench" / "configs"

CONFIG_TOML = """
[data]
level = "slice"
where = {{ Modality = "CT" }}
labels = "{labels}"
label_column = "sphere"
cache = "memory"

[task]
type = "classification"
metric = "accuracy"

[model]
name = "DenseNet"
args = {{ spatial_dims = 2, in_channels = 1, out_channels = 2, init_features = 8, \
growth_rate = 8, block_config = [2, 2], bn_size = 2 }}

[[transforms]]
name = "ScaleIntensityRanged"
args = {{ keys = ["image"], a_min = 0.0, a_max = 700.0, b_min = 0.0, b_max = 1.0, \
clip = true }}

[[transforms]]
name = "RandFlipd"
args = {{ keys = ["image"], prob = 0.5, spatial_axis = 0 }}
train_only = true

[training]
epochs = {epochs}
batch_size = 4
learning_rate = {learning_rate}
validation_fraction = 0.34
seed = 0
device = "cpu"
"""


def write_config(folder, labels, epochs=5, learning_rate=0.01):
    path = folder / "train.toml"
    path.write_text(
        CONFIG_TOML.format(labels=labels, epochs=epochs, learning_rate=learning_rate)
    )
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    corpus = generate_studies(
        root / "corpus",
        patients=PATIENTS,
        studies_per_patient=1,
        ct_slices=SLICES,
        mr_slices=1,
        rows=SIZE,
        columns=SIZE,
        seed=1,
    )
    with fixed_deid_key(root):
        ingest_folder(corpus.root, root / "dataset")
    view = DatasetView.open(root / "dataset")
    rows = view.instances(
        columns=[
            "SOPInstanceUID",
            "SeriesInstanceUID",
            "PatientID",
            "Modality",
            "volume_path",
            "volume_index",
        ]
    ).to_pandas()
    rows = rows[rows["Modality"] == "CT"].reset_index(drop=True)
    stacks = {
        path: np.asarray(view.pixel_array(path)[...])
        for path in rows["volume_path"].unique()
    }
    rows["sphere"] = [
        bool(stacks[path][index].max() >= SPHERE_HU)
        for path, index in zip(rows["volume_path"], rows["volume_index"], strict=True)
    ]
    rows[["SOPInstanceUID", "sphere"]].to_csv(root / "labels.csv", index=False)

    (root / "masks").mkdir()
    masks = []
    for path, pixels in stacks.items():
        name = f"masks/{path.split('/')[0]}.npy"
        np.save(root / name, (pixels >= SPHERE_HU).astype(np.uint8))
        masks.append({"SeriesInstanceUID": path.split("/")[0], "mask": name})
    pd.DataFrame(masks).to_csv(root / "masks.csv", index=False)
    return SimpleNamespace(
        root=root, dataset=root / "dataset", labels=root / "labels.csv", rows=rows
    )


@pytest.fixture(scope="module")
def trained(data):
    out = data.root / "run"
    summary = run_training(
        write_config(data.root, data.labels),
        data.dataset,
        out,
        purpose="sphere classifier test",
    )
    return out, summary


def read_metrics(out):
    return pd.read_csv(out / "metrics.csv")


# Training end to end


def test_training_learns_sphere(data, trained):
    out, summary = trained
    metrics = read_metrics(out)
    assert list(metrics.columns) == ["epoch", "train_loss", "val_loss", "val_metric"]
    assert metrics["epoch"].tolist() == [1, 2, 3, 4, 5]

    split = json.loads((out / "split.json").read_text())
    validation = data.rows[data.rows["PatientID"].isin(split["validation"])]
    share = validation["sphere"].mean()
    chance = max(share, 1 - share)
    # Over eight seeds (eight splits) the best and the last accuracy beat chance
    # by at least 0.28.
    assert metrics["val_metric"].max() >= chance + 0.2
    assert metrics["val_metric"].iloc[-1] >= chance + 0.15
    assert summary["best_metric"] == metrics["val_metric"].max()
    assert metrics["train_loss"].iloc[1:].min() < metrics["train_loss"].iloc[0]

    assert summary["classes"] == [False, True]
    assert summary["epochs_run"] == 5
    assert summary["resumed_from"] is None
    run = json.loads((out / "run.json").read_text())
    assert run["dataset_version"] == DatasetView.open(data.dataset).version
    assert run["config"]["model_name"] == "DenseNet"
    assert (out / "config.toml").read_text() == (data.root / "train.toml").read_text()
    for name in ("checkpoint-last.pt", "checkpoint-best.pt"):
        assert (out / name).stat().st_size > 0
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_split_keeps_patients_apart(data, trained):
    out, summary = trained
    split = json.loads((out / "split.json").read_text())
    assert not set(split["train"]) & set(split["validation"])
    assert set(split["train"]) | set(split["validation"]) == set(data.rows["PatientID"])
    assert len(split["validation"]) == 3
    validation_rows = data.rows["PatientID"].isin(split["validation"]).sum()
    assert summary["validation_items"] == validation_rows
    assert summary["train_items"] == len(data.rows) - validation_rows


def test_training_is_audited(trained):
    with open_audit_log() as audit:
        records = [r for r in audit.records() if r.purpose == "sphere classifier test"]
    actions = [r.action for r in records]
    assert actions[:3] == ["training.start", "dataset.read", "training.end"]
    assert records[1].details["job"] == "training"
    assert records[2].outcome == "ok"


def test_deterministic_and_resumes_exactly(data, trained, tmp_path):
    # A second run with the same seed repeats the first epochs exactly, and a run
    # resumed after epoch 2 continues as the uninterrupted run did.
    reference = read_metrics(trained[0])
    out = data.root / "resumed"
    config = write_config(tmp_path, data.labels, epochs=2)
    run_training(config, data.dataset, out, purpose=PURPOSE)
    pd.testing.assert_frame_equal(read_metrics(out), reference.iloc[:2])

    config = write_config(tmp_path, data.labels, epochs=3)
    summary = run_training(config, data.dataset, out, purpose=PURPOSE)
    assert summary["resumed_from"] == 2
    assert summary["epochs_run"] == 1
    pd.testing.assert_frame_equal(read_metrics(out), reference.iloc[:3])


def test_resume_needs_same_config(data, trained, tmp_path):
    out, _ = trained
    changed = write_config(tmp_path, data.labels, learning_rate=0.5)
    with pytest.raises(ConfigurationError, match="learning_rate changed"):
        run_training(changed, data.dataset, out, purpose=PURPOSE)
    same = write_config(tmp_path, data.labels)
    done = run_training(same, data.dataset, out, purpose=PURPOSE)
    assert done["epochs_run"] == 0
    assert done["best_epoch"] == trained[1]["best_epoch"]


# Inference


def test_inference_keyed_to_dataset_uids(data, trained):
    out, _ = trained
    result = run_inference(
        data.dataset, out, data.root / "predictions", purpose="sphere inference test"
    )
    predictions = pd.read_parquet(result["predictions"])
    assert len(predictions) == len(data.rows)
    assert set(predictions["SOPInstanceUID"]) <= set(data.rows["SOPInstanceUID"])
    assert set(predictions["SeriesInstanceUID"]) <= set(data.rows["SeriesInstanceUID"])
    assert predictions["SOPInstanceUID"].is_unique
    total = predictions["probability_False"] + predictions["probability_True"]
    np.testing.assert_allclose(total, 1.0, rtol=1e-5)
    assert predictions["predicted_label"].dtype == bool

    truth = data.rows.set_index("SOPInstanceUID")["sphere"]
    expected = truth.loc[predictions["SOPInstanceUID"]].to_numpy()
    assert (predictions["predicted_label"].to_numpy() == expected).mean() >= 0.8
    assert result["checkpoint_epoch"] == trained[1]["best_epoch"]

    with open_audit_log() as audit:
        actions = [
            r.action for r in audit.records() if r.purpose == "sphere inference test"
        ]
    assert actions == ["dataset.read", "inference.start", "inference.end"]


def test_inference_needs_training_folder(data, tmp_path):
    with pytest.raises(ConfigurationError, match=r"has no run\.json"):
        run_inference(data.dataset, tmp_path, tmp_path / "out", purpose=PURPOSE)


# Segmentation


@pytest.mark.slow
def test_segmentation_learns_sphere(data):
    config = {
        "data": {
            "level": "slice",
            "where": {"Modality": "CT"},
            "labels": str(data.root / "masks.csv"),
            "mask_column": "mask",
            "cache": "memory",
        },
        "task": {"type": "segmentation"},
        "model": {
            "name": "UNet",
            "args": {
                "spatial_dims": 2,
                "in_channels": 1,
                "out_channels": 2,
                "channels": [8, 16],
                "strides": [2],
            },
        },
        "transforms": [
            {
                "name": "ScaleIntensityRanged",
                "args": {
                    "keys": ["image"],
                    "a_min": 0.0,
                    "a_max": 700.0,
                    "b_min": 0.0,
                    "b_max": 1.0,
                    "clip": True,
                },
            },
            {
                "name": "Resized",
                "args": {
                    "keys": ["image", "mask"],
                    "spatial_size": [48, 48],
                    "mode": ["bilinear", "nearest"],
                },
            },
        ],
        "training": {
            "epochs": 5,
            "batch_size": 4,
            "learning_rate": 0.01,
            "validation_fraction": 0.34,
            "device": "cpu",
        },
    }
    out = data.root / "segmentation"
    summary = run_training(config, data.dataset, out, purpose=PURPOSE)
    metrics = read_metrics(out)
    assert summary["metric"] == "dice"
    assert metrics["val_metric"].iloc[-1] >= 0.65

    result = run_inference(data.dataset, out, out / "predicted", purpose=PURPOSE)
    predictions = pd.read_parquet(result["predictions"])
    assert len(predictions) == len(data.rows)
    truth = data.rows.set_index("SOPInstanceUID")
    overlap = total = 0
    for row in predictions.itertuples():
        mask = np.load(row.mask_path)
        # Masks come back in the stack's geometry, undoing the resize.
        assert mask.shape == (SIZE, SIZE)
        stack = np.load(data.root / f"masks/{row.SeriesInstanceUID}.npy")
        expected = stack[truth.loc[row.SOPInstanceUID, "volume_index"]]
        overlap += int((mask & expected).sum())
        total += int(mask.sum() + expected.sum())
    assert 2 * overlap / total >= 0.6


# Clear errors


def test_config_errors(data, tmp_path):
    base = tomllib.loads(write_config(tmp_path, data.labels).read_text())

    def fails(error, match, **changes):
        config = json.loads(json.dumps(base))
        for dotted, value in changes.items():
            section, key = dotted.split("__")
            config[section][key] = value
        with pytest.raises(error, match=match):
            run_training(config, data.dataset, tmp_path / "out", purpose=PURPOSE)

    fails(
        ConfigurationError,
        "'DenseNet12' not found.*did you mean",
        model__name="DenseNet12",
    )
    fails(
        ConfigurationError,
        "rejected its arguments",
        model__args={"spatial_dims": 2, "in_channels": 1},
    )
    fails(
        ConfigurationError,
        "set its number of outputs",
        model__args={**base["model"]["args"], "out_channels": 3},
    )
    fails(
        ConfigurationError, "label column 'grade' not found", data__label_column="grade"
    )
    fails(ConfigurationError, r"\[data\] has unknown keys \['label'\]", data__label="x")
    fails(ConfigurationError, "task.metric", task__metric="dice")

    no_join = tmp_path / "other.csv"
    pd.DataFrame({"SOPInstanceUID": ["1.2.3"], "sphere": [True]}).to_csv(no_join)
    fails(DatasetError, "labels table does not join", data__labels=str(no_join))

    transform_errors = [
        ("ScaleIntensityRangd", "not found in monai.transforms.*did you mean"),
        ("ScaleIntensityRange", "use its dictionary form ScaleIntensityRanged"),
    ]
    for name, match in transform_errors:
        config = json.loads(json.dumps(base))
        config["transforms"][0]["name"] = name
        with pytest.raises(ConfigurationError, match=match):
            run_training(config, data.dataset, tmp_path / "out", purpose=PURPOSE)
    assert not (tmp_path / "out" / "checkpoint-last.pt").exists()


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigurationError, match="not found"):
        load_config(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("[model\nname = 1")
    with pytest.raises(ConfigurationError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")
    (tmp_path / "typo.toml").write_text('[model]\nname = "UNet"\n[trainig]\nepochs = 1')
    with pytest.raises(ConfigurationError, match=r"unknown keys \['trainig'\]"):
        load_config(tmp_path / "typo.toml")


@pytest.mark.parametrize("name", ["ct-classification", "ct-segmentation"])
def test_example_configs_build(name):
    config = load_config(CONFIGS / f"{name}.toml")
    assert config.labels is not None
    assert config.labels.parent == CONFIGS
    build_network(config.model_name, config.model_args)
    train = build_transforms(config.transforms, train=True)
    validation = build_transforms(config.transforms, train=False)
    assert len(train) > len(validation) >= 1


def test_inference_from_moved_output(data, trained, tmp_path):
    # The output folder is self-contained: inference works from a moved copy.
    moved = tmp_path / "moved"
    shutil.copytree(trained[0], moved)
    result = run_inference(data.dataset, moved, tmp_path / "p", purpose=PURPOSE)
    assert result["items"] == len(data.rows)

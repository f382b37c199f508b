"""Tests of the notebook API: audited dataset reads, windows, pictures, ingest, audit.

A small dataset (one invented patient, a CT of 8 slices and an MR of 6, 32x32
pixels) is ingested once with the real pipeline. Each test records its reads in an
audit log of its own, so it can check every record it caused.
"""

from __future__ import annotations

import io
import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ingest_helpers import ingest_folder, orthanc_credentials

import workbench.notebook as wb
from workbench.audit import current_user, open_audit_log
from workbench.dataset.store import QUARANTINE_FIELDS
from workbench.errors import (
    AuditChainError,
    ConfigurationError,
    DatasetError,
)
from workbench.notebook import display
from workbench.notebook.display import slice_image_png
from workbench.notebook.windows import Window, first_window_value, resolve_window
from workbench.orthanc.upload import upload_paths
from workbench.samples import generate_studies

CT_SLICES = 8
MR_SLICES = 6
PURPOSE = "notebook API test"


@pytest.fixture(scope="module")
def small_studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("api-studies")
    generate_studies(
        folder,
        patients=1,
        studies_per_patient=1,
        ct_slices=CT_SLICES,
        mr_slices=MR_SLICES,
        rows=32,
        columns=32,
    )
    return folder


@pytest.fixture(scope="module")
def small_dataset(
    small_studies: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("api-dataset") / "small"
    summary = ingest_folder(small_studies, out, workers=1)
    assert summary.written == CT_SLICES + MR_SLICES
    return out


@pytest.fixture
def audit_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'reads.sqlite'}"


@pytest.fixture
def ds(small_dataset: Path, audit_url: str) -> wb.AuditedDataset:
    return wb.open_dataset(small_dataset, purpose=PURPOSE, audit_url=audit_url)


def read_details(audit_url: str) -> list[dict[str, Any]]:
    """Return the details of every dataset.read record, oldest first."""
    with open_audit_log(audit_url) as audit:
        return [record.details for record in audit.records(action="dataset.read")]


def stack_uid(ds: wb.AuditedDataset, modality: str) -> str:
    frame = ds.series
    return str(frame.loc[frame.Modality == modality, "SeriesInstanceUID"].iloc[0])


# Opening


@pytest.mark.parametrize("purpose", [None, "", "   "])
def test_open_dataset_requires_purpose(small_dataset: Path, purpose: Any) -> None:
    with pytest.raises(ConfigurationError, match="needs a purpose"):
        wb.open_dataset(small_dataset, purpose=purpose)


def test_open_dataset_rejects_unverified(small_dataset: Path, tmp_path: Path) -> None:
    copy = tmp_path / "unverified"
    shutil.copytree(small_dataset, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["verified"] = False
    (copy / "manifest.json").write_text(json.dumps(manifest))

    with pytest.raises(DatasetError):
        wb.open_dataset(copy, purpose=PURPOSE)


# Rows


def test_instances_read_once_and_audited(ds: wb.AuditedDataset, audit_url: str) -> None:
    frame = ds.instances

    assert len(frame) == CT_SLICES + MR_SLICES
    assert ds.instances is frame
    assert ds.table.num_rows == CT_SLICES + MR_SLICES
    with open_audit_log(audit_url) as audit:
        records = audit.records()
    assert len(records) == 1
    assert records[0].action == "dataset.read"
    assert records[0].resource == "dataset:small"
    assert records[0].purpose == PURPOSE
    assert records[0].actor == current_user()
    assert records[0].details == {
        "read": "rows",
        "rows": CT_SLICES + MR_SLICES,
        "columns": ds.table.num_columns,
        "dataset_version": ds.version,
    }


def test_sql_counts_and_audit(ds: wb.AuditedDataset, audit_url: str) -> None:
    query = "select Modality, count(*) as n from instances group by 1 order by 1"

    result = ds.sql(query)

    assert list(result.itertuples(index=False, name=None)) == [
        ("CT", CT_SLICES),
        ("MR", MR_SLICES),
    ]
    assert read_details(audit_url) == [
        {"read": "query", "query": query, "rows": 2, "dataset_version": ds.version}
    ]


def test_sql_cannot_touch_files(
    ds: wb.AuditedDataset, audit_url: str, tmp_path: Path
) -> None:
    outside = tmp_path / "outside.csv"
    outside.write_text("a,b\n1,2\n")
    exported = tmp_path / "exported.csv"

    with pytest.raises(DatasetError, match="disabled"):
        ds.sql(f"select * from read_csv('{outside}')")  # noqa: S608 (test path)
    with pytest.raises(DatasetError, match="disabled"):
        ds.sql(f"copy instances to '{exported}'")
    assert not exported.exists()
    assert read_details(audit_url) == []


def test_sql_error_names_table(ds: wb.AuditedDataset) -> None:
    with pytest.raises(DatasetError, match="table named instances"):
        ds.sql("select * from studies")


def test_series_one_row_per_stack(ds: wb.AuditedDataset, audit_url: str) -> None:
    frame = ds.series
    frame["slices"] = -1

    again = ds.series

    assert sorted(zip(again.Modality, again.slices, strict=True)) == [
        ("CT", CT_SLICES),
        ("MR", MR_SLICES),
    ]
    assert read_details(audit_url) == [
        {"read": "series", "stacks": 2, "dataset_version": ds.version}
    ]


# Volumes


def test_volume_by_uid_and_path(ds: wb.AuditedDataset, audit_url: str) -> None:
    uid = stack_uid(ds, "CT")
    path = str(ds.series.set_index("SeriesInstanceUID").loc[uid, "volume_path"])

    by_uid = ds.volume(uid)
    by_path = ds.volume(path)

    assert by_uid.dims == ("z", "y", "x")
    assert by_uid.shape == (CT_SLICES, 32, 32)
    assert by_uid.attrs["units"] == "HU"
    assert np.allclose(np.diff(by_uid.z.values), by_uid.attrs["slice_spacing_mm"])
    assert len(by_uid.attrs["affine"]) == 4
    assert np.array_equal(by_uid.values, by_path.values)
    volume_reads = [d for d in read_details(audit_url) if d["read"] == "volume"]
    expected = {
        "read": "volume",
        "volume": path,
        "slices": CT_SLICES,
        "dataset_version": ds.version,
    }
    assert volume_reads == [expected, expected]


def test_volume_unknown_series(ds: wb.AuditedDataset, audit_url: str) -> None:
    with pytest.raises(DatasetError, match="take a SeriesInstanceUID"):
        ds.volume("2.25.1")
    assert all(d["read"] != "volume" for d in read_details(audit_url))


# Pictures


def test_show_windowed_montage(ds: wb.AuditedDataset, audit_url: str) -> None:
    uid = stack_uid(ds, "CT")
    path = str(ds.series.set_index("SeriesInstanceUID").loc[uid, "volume_path"])
    volume = ds.volume(uid)

    figure = ds.show(uid, window="lung", columns=4)

    panels = [ax for ax in figure.axes if ax.images]
    assert len(panels) == CT_SLICES
    lung = Window(-600, 1500)
    expected = lung.to_grey(volume.values[0])
    assert np.array_equal(panels[0].images[0].get_array(), expected)
    assert panels[0].get_title() == f"z {float(volume.z[0]):.1f} mm"
    assert "window -600/1500 HU (lung)" in figure.texts[0].get_text()
    assert read_details(audit_url)[-1] == {
        "read": "montage",
        "volume": path,
        "slices": CT_SLICES,
        "dataset_version": ds.version,
    }


def test_show_evenly_spaced_slices(ds: wb.AuditedDataset) -> None:
    uid = stack_uid(ds, "CT")
    z = ds.volume(uid).z.values

    figure = ds.show(uid, slices=3)

    titles = [ax.get_title() for ax in figure.axes if ax.images]
    assert titles == [f"z {z[i]:.1f} mm" for i in (0, 4, 7)]


def test_show_auto_uses_stored_window(ds: wb.AuditedDataset) -> None:
    figure = ds.show(stack_uid(ds, "CT"), window="auto", slices=1)

    assert "window 40/400 HU (stored)" in figure.texts[0].get_text()


def test_show_rejects_bad_requests(ds: wb.AuditedDataset) -> None:
    uid = stack_uid(ds, "CT")

    with pytest.raises(ConfigurationError, match=r"not in 0\.\.7"):
        ds.show(uid, slices=[0, 99])
    with pytest.raises(ConfigurationError, match="lung"):
        ds.show(uid, window="wide")
    with pytest.raises(ConfigurationError, match="columns"):
        ds.show(uid, columns=0)


def test_ct_preset_on_mr_warns(ds: wb.AuditedDataset) -> None:
    with pytest.warns(UserWarning, match="CT preset in HU"):
        ds.show(stack_uid(ds, "MR"), window="lung", slices=1)


def test_viewer_slider_changes_slice(ds: wb.AuditedDataset, audit_url: str) -> None:
    uid = stack_uid(ds, "CT")
    volume = ds.volume(uid)

    viewer = ds.viewer(uid)
    _title, image, slider, caption = viewer.children

    assert slider.max == CT_SLICES - 1
    assert slider.value == CT_SLICES // 2
    assert caption.value.startswith(f"slice {CT_SLICES // 2 + 1} of {CT_SLICES}")
    slider.value = 0
    assert caption.value == f"slice 1 of {CT_SLICES}  z {float(volume.z[0]):.1f} mm"
    stored = Window(40, 400)
    assert image.value == slice_image_png(volume.values[0], window=stored)
    viewer_reads = [d for d in read_details(audit_url) if d["read"] == "viewer"]
    assert len(viewer_reads) == 1
    assert viewer_reads[0]["slices"] == CT_SLICES


def test_quarantine_report_columns(ds: wb.AuditedDataset, audit_url: str) -> None:
    report = ds.quarantine

    assert list(report.columns) == list(QUARANTINE_FIELDS)
    assert len(report) == 0
    assert read_details(audit_url)[-1]["read"] == "quarantine report"


# Windows


def test_window_presets_and_pairs() -> None:
    assert resolve_window("lung") == Window(-600, 1500, source="lung")
    assert resolve_window("Soft-Tissue").center == resolve_window("mediastinum").center
    assert resolve_window((40, 400)) == Window(40, 400, source="given")
    assert Window(40, 400).limits == (-160.0, 239.0)


@pytest.mark.parametrize(
    "bad", ["wide", (40,), ("a", 1), (40, 0.5), (40, float("inf"))]
)
def test_window_rejects_invalid(bad: Any) -> None:
    with pytest.raises(ConfigurationError):
        resolve_window(bad)


def test_window_auto_sources() -> None:
    pixels = np.arange(1000, dtype=np.float32)

    assert resolve_window("auto", stored=(50, 350)) == Window(50, 350, source="stored")
    fallback = resolve_window("auto", pixels=pixels)
    assert fallback.source == "pixels"
    assert fallback.width == pytest.approx(
        np.percentile(pixels, 99) - np.percentile(pixels, 1)
    )
    with pytest.raises(ConfigurationError, match="auto"):
        resolve_window("auto")


def test_window_to_grey_clips() -> None:
    # Centre 0, width 101: black at -50.5 and below, white at 49.5 and above.
    grey = Window(0, 101).to_grey(np.array([-1000, -50.5, -0.5, 49.5, 1000]))

    assert grey.tolist() == [0, 0, 128, 255, 255]


def test_first_window_value() -> None:
    assert first_window_value([40.0, 60.0]) == 40.0
    assert first_window_value(400) == 400.0
    assert first_window_value([]) is None
    assert first_window_value(None) is None
    assert first_window_value("x") is None


# Audit review


def test_audit_log_frame_and_filters(ds: wb.AuditedDataset, audit_url: str) -> None:
    ds.sql("select count(*) from instances")
    ds.volume(stack_uid(ds, "MR"))

    frame = wb.audit_log(url=audit_url)

    assert list(frame.action) == ["dataset.read"] * 3
    assert [d["read"] for d in frame.details] == ["query", "series", "volume"]
    assert str(frame.timestamp.dt.tz) == "UTC"
    assert frame.timestamp.is_monotonic_increasing
    assert len(wb.audit_log(resource="dataset:small", url=audit_url)) == 3
    assert len(wb.audit_log(resource="dataset:other", url=audit_url)) == 0
    assert list(wb.audit_log(limit=1, url=audit_url).sequence) == [3]
    assert wb.verify_audit(url=audit_url).record_count == 3


def test_verify_audit_detects_edit(ds: wb.AuditedDataset, tmp_path: Path) -> None:
    ds.sql("select count(*) from instances")
    ds.sql("select 1")
    database = sqlite3.connect(tmp_path / "reads.sqlite")
    with database:
        database.execute("DROP TRIGGER audit_record_no_update")
        database.execute("UPDATE audit_record SET purpose = 'other' WHERE sequence = 1")
    database.close()

    with pytest.raises(AuditChainError) as raised:
        wb.verify_audit(url=f"sqlite:///{tmp_path / 'reads.sqlite'}")
    assert raised.value.sequence == 1


# Ingest


def test_ingest_definition_with_progress(
    small_studies: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    definition = tmp_path / "cohort.toml"
    definition.write_text(
        f'[source]\nfolder = "{small_studies}"\n\n[output]\npath = "cohort"\n'
    )

    first = wb.ingest(definition, purpose="ingest test", workers=1)
    second = wb.ingest(definition, purpose="ingest test", workers=1)

    assert first.written == CT_SLICES + MR_SLICES
    assert first.out == tmp_path / "cohort"
    assert second.series_skipped == 2
    assert second.written == 0
    progress = capfd.readouterr().err
    assert "ingest: " in progress
    assert f"instances={CT_SLICES + MR_SLICES}" in progress
    assert "skipped=2" in progress


def test_ingest_requires_out_and_purpose(small_studies: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="out folder"):
        wb.ingest(folder=small_studies, purpose="ingest test")
    with pytest.raises(ConfigurationError, match="needs a purpose"):
        wb.ingest(out=tmp_path / "out", folder=small_studies)
    with pytest.raises(ConfigurationError, match="exactly one source"):
        wb.ingest(out=tmp_path / "out", purpose="ingest test")
    assert not (tmp_path / "out").exists()


def test_ingest_from_orthanc_bar_total(
    orthanc: Any, small_studies: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    with orthanc.client() as client:
        report = upload_paths(client, [small_studies], progress=False)
    assert len(report.outcomes) == CT_SLICES + MR_SLICES

    with orthanc_credentials(orthanc):
        summary = wb.ingest(
            out=tmp_path / "ct",
            orthanc=orthanc.url,
            query={"Modality": "CT"},
            purpose="ingest test",
            workers=1,
        )

    assert summary.written == CT_SLICES
    progress = capfd.readouterr().err
    assert "1/1" in progress
    assert f"instances={CT_SLICES}" in progress


def test_slice_image_png_is_png() -> None:
    png = slice_image_png(np.zeros((4, 6)), window=Window(0, 10))

    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    from matplotlib.image import imread

    decoded = imread(io.BytesIO(png))
    assert decoded.shape[:2] == (4, 6)


def test_montage_inverts_and_keeps_colour() -> None:
    grey = np.array([[0.0, 50.0], [100.0, 150.0]])
    colour = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    window = Window(75, 151)

    inverted = display.montage([grey], window=window, invert=True)
    coloured = display.montage([colour], window=window)

    shown = inverted.axes[0].images[0].get_array()
    assert np.array_equal(shown, 255 - window.to_grey(grey))
    assert np.array_equal(coloured.axes[0].images[0].get_array(), colour)


# Loaders


def default_audit_details(purpose: str) -> list[dict[str, Any]]:
    """Return the details of the workbench audit log's records with ``purpose``."""
    with open_audit_log() as audit:
        return [
            record.details for record in audit.records() if record.purpose == purpose
        ]


def test_to_monai_slices_audited(small_dataset: Path) -> None:
    purpose = "notebook API to_monai test"
    ds = wb.open_dataset(small_dataset, purpose=purpose)

    items = ds.to_monai(level="slice", where={"Modality": "CT"})

    assert ds.path == small_dataset.resolve()
    assert len(items) == CT_SLICES
    assert tuple(items[0]["image"].shape) == (1, 32, 32)
    reads = default_audit_details(purpose)
    assert len(reads) == 1
    assert reads[0]["version"] == ds.version


def test_to_gemma_prompt_and_image(small_dataset: Path) -> None:
    purpose = "notebook API to_gemma test"
    ds = wb.open_dataset(small_dataset, purpose=purpose)

    examples = ds.to_gemma(prompt_template="Modality: {Modality}", window="lung")

    assert sorted(example.prompt for example in examples) == [
        "Modality: CT",
        "Modality: MR",
    ]
    ct = next(example for example in examples if example.prompt.endswith("CT"))
    assert ct.slice_indices == [CT_SLICES // 2]
    assert ct.images[0].size == (32, 32)
    assert default_audit_details(purpose)[0]["examples"] == 2


# Jobs: requests rejected before a job starts


@pytest.fixture
def sphere_config(tmp_path: Path) -> Path:
    config = tmp_path / "config" / "sphere.toml"
    config.parent.mkdir()
    config.write_text(
        '[data]\nlabel_column = "sphere"\n\n[model]\nname = "DenseNet121"\n'
    )
    return config


def test_train_rejects_out_inside_dataset(
    ds: wb.AuditedDataset, sphere_config: Path
) -> None:
    before = sorted(ds.path.rglob("*"))

    with pytest.raises(DatasetError, match="lies inside dataset"):
        wb.train(ds, sphere_config, ds.path / "run")

    assert sorted(ds.path.rglob("*")) == before


def test_train_rejects_unknown_isolation(
    ds: wb.AuditedDataset, sphere_config: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigurationError, match="'namespaces', 'weak', 'none'"):
        wb.train(ds, sphere_config, tmp_path / "run", isolation="off")

    assert not (tmp_path / "run").exists()


def test_jobs_need_purpose_and_dataset(
    small_dataset: Path, sphere_config: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigurationError, match="needs a purpose"):
        wb.train(small_dataset, sphere_config, tmp_path / "run")
    with pytest.raises(DatasetError):
        wb.infer(tmp_path, tmp_path, tmp_path / "out", purpose=PURPOSE)
    assert not (tmp_path / "run").exists()


def test_train_missing_config(ds: wb.AuditedDataset, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"missing\.toml does not exist"):
        wb.train(ds, tmp_path / "missing.toml", tmp_path / "run")


@pytest.mark.parametrize(
    "targets",
    [{}, {"target_column": "Modality", "reports": "reports.csv"}],
)
def test_finetune_needs_one_target(
    ds: wb.AuditedDataset, tmp_path: Path, targets: dict[str, str]
) -> None:
    with pytest.raises(ConfigurationError, match="exactly one target"):
        wb.finetune_gemma(ds, "tiny", tmp_path / "lora", prompt="?", **targets)


def test_gemma_infer_rejects_hub_name(ds: wb.AuditedDataset, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="is not a folder"):
        wb.gemma_infer(ds, "google/gemma-3n-E2B-it", "?", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# Result pictures


def test_plot_loss_training_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text(
        "epoch,train_loss,val_loss,val_metric\n1,0.9,1.0,0.5\n2,0.6,0.7,0.8\n"
        "3,0.4,0.8,0.75\n"
    )
    (run / "run.json").write_text(json.dumps({"metric": "roc_auc"}))

    figure = wb.plot_loss(run)

    losses, scores = figure.axes
    assert list(losses.lines[0].get_ydata()) == [0.9, 0.6, 0.4]
    assert list(losses.lines[1].get_ydata()) == [1.0, 0.7, 0.8]
    assert list(scores.lines[0].get_ydata()) == [0.5, 0.8, 0.75]
    assert list(scores.lines[1].get_xdata()) == [2]
    assert scores.get_title() == "validation roc_auc"
    assert scores.get_legend().get_texts()[0].get_text() == "best: 0.800 at epoch 2"


def test_plot_loss_finetune_and_missing(tmp_path: Path) -> None:
    lora = tmp_path / "lora"
    lora.mkdir()
    steps = "\n".join(f"{step},{10 - step},4,0.1" for step in range(1, 11))
    (lora / "loss.csv").write_text(f"step,loss,examples,seconds\n{steps}\n")

    figure = wb.plot_loss(lora)

    raw, smoothed = figure.axes[0].lines
    assert list(raw.get_ydata()) == [float(10 - step) for step in range(1, 11)]
    assert smoothed.get_label() == "mean of 1 steps"
    with pytest.raises(ConfigurationError, match=r"neither metrics\.csv"):
        wb.plot_loss(tmp_path)


def uid_table(**columns: list[Any]) -> Any:
    import pandas as pd

    return pd.DataFrame(columns)


def test_confusion_matrix_counts(tmp_path: Path) -> None:
    predictions = uid_table(
        SOPInstanceUID=["2.25.1", "2.25.2", "2.25.3", "2.25.4", "2.25.5"],
        SeriesInstanceUID=["2.25.9"] * 5,
        predicted_label=[True, True, False, False, True],
    )
    labels = tmp_path / "labels.csv"
    # 2.25.5 has no label and 2.25.6 no prediction: both are left out.
    labels.write_text(
        "SOPInstanceUID,sphere\n2.25.1,True\n2.25.2,False\n2.25.3,False\n"
        "2.25.4,True\n2.25.6,True\n"
    )

    matrix = wb.confusion_matrix(predictions, labels)

    assert matrix.index.name == "true sphere"
    assert matrix.columns.name == "predicted sphere"
    assert matrix.loc[True, True] == 1
    assert matrix.loc[True, False] == 1
    assert matrix.loc[False, True] == 1
    assert matrix.loc[False, False] == 1
    figure = wb.plot_confusion_matrix(matrix, title="invented")
    axes = figure.axes[0]
    assert axes.get_title() == "invented\naccuracy 0.500 of 4 items"
    assert [text.get_text() for text in axes.texts] == ["1", "1", "1", "1"]


def test_confusion_matrix_series_key_and_classes() -> None:
    predictions = uid_table(
        SeriesInstanceUID=["2.25.1", "2.25.2", "2.25.3"],
        predicted_label=["CT", "MR", "PT"],
    )
    labels = uid_table(
        SeriesInstanceUID=["2.25.1", "2.25.2", "2.25.3"], kind=["CT"] * 3
    )

    matrix = wb.confusion_matrix(predictions, labels)

    assert list(matrix.index) == ["CT", "MR", "PT"]
    assert list(matrix.columns) == ["CT", "MR", "PT"]
    assert matrix.to_numpy().tolist() == [[1, 1, 1], [0, 0, 0], [0, 0, 0]]


def test_confusion_matrix_rejects_bad_tables() -> None:
    predictions = uid_table(SOPInstanceUID=["2.25.1"], predicted_label=[True])
    two_columns = uid_table(SOPInstanceUID=["2.25.1"], a=[True], b=[False])
    other_uids = uid_table(SOPInstanceUID=["2.25.7"], sphere=[True])

    with pytest.raises(ConfigurationError, match="pass label_column"):
        wb.confusion_matrix(predictions, two_columns)
    with pytest.raises(ConfigurationError, match="do not overlap"):
        wb.confusion_matrix(predictions, other_uids)
    with pytest.raises(ConfigurationError, match="lack column"):
        wb.confusion_matrix(predictions, two_columns, label_column="c")


def invented_answers(ds: wb.AuditedDataset, text: str) -> Any:
    """Return a generations table with ``text`` for each stack, as Gemma writes it."""
    stacks = ds.series
    return uid_table(
        SeriesInstanceUID=list(stacks.SeriesInstanceUID),
        volume_path=list(stacks.volume_path),
        slice_indices=[[int(count) // 2] for count in stacks.slices],
        prompt=["Which modality is this?"] * len(stacks),
        text=[f"{text} {modality}" for modality in stacks.Modality],
    )


def test_show_generations_images_and_answers(ds: wb.AuditedDataset) -> None:
    before = invented_answers(ds, "noise")
    after = invented_answers(ds, "surely")
    uid = stack_uid(ds, "MR")
    example = ds.to_gemma(prompt_template="", where={"SeriesInstanceUID": uid})[0]

    figure = wb.show_generations(
        ds, {"before": before, "after": after}, series=[uid, stack_uid(ds, "CT")]
    )

    image_axes, text_axes = figure.axes[0], figure.axes[1]
    drawn = image_axes.images[0].get_array()
    assert np.array_equal(drawn, np.asarray(example.images[0]))
    assert text_axes.texts[0].get_text() == (
        "prompt: Which modality is this?\n\nbefore: noise MR\n\nafter: surely MR"
    )
    assert figure.axes[3].texts[0].get_text().endswith("after: surely CT")
    assert len(figure.axes) == 4


def test_show_generations_rejects_mismatch(ds: wb.AuditedDataset) -> None:
    answers = invented_answers(ds, "noise")
    moved = answers.assign(slice_indices=[[0]] * len(answers))

    with pytest.raises(ConfigurationError, match="the loader now gives slices"):
        wb.show_generations(ds, moved)
    with pytest.raises(DatasetError, match=r"no series or stack '2\.25\.1'"):
        wb.show_generations(ds, answers, series=["2.25.1"])
    with pytest.raises(ConfigurationError, match="have no row"):
        wb.show_generations(ds, {"all": answers, "one": answers.head(1)})


def test_gemma_infer_without_isolation(ds: wb.AuditedDataset, tmp_path: Path) -> None:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = wb.gemma_infer(
            ds, "tiny", "Which modality is this?", tmp_path / "g", max_new_tokens=4,
            isolation="none",
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)

    assert summary["examples"] == 2
    with open_audit_log() as audit:
        start = audit.records(action="job.start")[-1]
    assert start.details["job"] == "infer-gemma"
    assert start.details["policy"] == "none"
    assert start.purpose == PURPOSE
    figure = wb.show_generations(ds, tmp_path / "g")
    assert len(figure.axes) == 4

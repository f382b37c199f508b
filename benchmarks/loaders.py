"""Loader throughput: MONAI items from Zarr against MONAI's DICOM reader, in one run.

Writes synthetic CT series, ingests them, then reads the same series both ways
through a MONAI ``Dataset``, with the same simple transform (HU window to 0..1)
and with none (loading alone):

- ``monai_dataset``: this workbench's loader, pixels from the dataset's Zarr store;
- ``LoadImaged(reader="PydicomReader")``: MONAI's reader on the source DICOM files
  (a series folder per volume item, one file per slice item).

Both run in this process, one item after another, without DataLoader workers.
The first item is read once before timing (imports, open stores), and each rate
is the best of ``--repeats`` passes over every item, so the DICOM files come from
the page cache in the later passes. Run it from the project root::

    .venv/bin/python benchmarks/loaders.py                 # a few minutes
    .venv/bin/python benchmarks/loaders.py --quick         # a smoke run
    .venv/bin/python benchmarks/loaders.py --headers scanner

``--headers planted`` (the default) reads the synthetic corpus of the tests, whose
instances carry an invented identity in every attribute of PS3.15 Table E.1-1
(about 1100 elements); ``--headers scanner`` gives every slice the header of a
real GE CT slice (pydicom's ``CT_small.dcm``, 258 elements), which pydicom parses
faster.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from workbench.home import init_home
from workbench.samples import generate_studies

# Hounsfield units from air to dense bone, mapped to 0..1: the simple transform.
WINDOW = (-1000.0, 1000.0)
# Item level, and whether the window transform runs after loading.
CASES = ("volume+window", "volume+none", "slice+window", "slice+none")


def main() -> None:
    """Run the benchmark and print its report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=10, help="CT series")
    parser.add_argument("--slices", type=int, default=60, help="slices per series")
    parser.add_argument("--size", type=int, default=256, help="rows and columns")
    parser.add_argument("--repeats", type=int, default=2, help="passes; best counts")
    parser.add_argument(
        "--headers",
        choices=("planted", "scanner"),
        default="planted",
        help="planted: the synthetic corpus of the tests (about 1100 elements an"
        " instance); scanner: the header of a real GE CT slice (258 elements)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for tests")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.series, args.slices, args.size, args.repeats = 2, 8, 64, 1

    warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
    logging.getLogger("monai").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="workbench-loader-bench-") as folder:
        work = Path(folder)
        os.environ["WORKBENCH_HOME"] = str(init_home(work / "home"))
        os.environ.pop("WORKBENCH_AUDIT_URL", None)
        results = measure(work, args)
    print_report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def measure(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Write, ingest and read the series in ``work``; return the rates."""
    # 1. The same CT series as DICOM files and as an ingested dataset.
    folders = write_series(work / "dicom", args)
    dataset = ingest(work / "dicom", work / "dataset")
    results: dict[str, Any] = {
        "headers": args.headers,
        "series": len(folders),
        "slices_per_series": args.slices,
        "size": args.size,
    }

    # 2. Whole volumes, then single slices, each read both ways, with the window
    #    transform and without.
    for case in CASES:
        level, transformed = case.split("+")[0], case.endswith("+window")
        zarr_items = zarr_dataset(dataset, level, transformed)
        dicom_items = dicom_dataset(folders, level, transformed)
        check_same_pixels(zarr_items, dicom_items, case)
        results[f"{case}_items"] = len(zarr_items)
        results[f"{case}_zarr_per_s"] = rate(zarr_items, args.repeats)
        results[f"{case}_dicom_per_s"] = rate(dicom_items, args.repeats)
        results[f"{case}_ratio"] = (
            results[f"{case}_zarr_per_s"] / results[f"{case}_dicom_per_s"]
        )
    return results


def write_series(folder: Path, args: argparse.Namespace) -> list[Path]:
    """Write the CT series; return their folders, one per series."""
    if args.headers == "scanner":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from ingest import write_scanner_studies

        files = write_scanner_studies(folder, args.series, args.slices, args.size)
        return sorted({path.parent for path in files})
    corpus = generate_studies(
        folder,
        patients=args.series,
        studies_per_patient=1,
        ct_slices=args.slices,
        mr_slices=1,
        rows=args.size,
        columns=args.size,
    )
    return [
        series.files[0].parent for series in corpus.series if series.modality == "CT"
    ]


def ingest(folder: Path, out: Path) -> Path:
    """Ingest ``folder`` with the real pipeline; return the dataset folder."""
    from workbench.ingest import IngestConfig, run_ingest

    summary = run_ingest(
        IngestConfig(out=out, folder=folder, purpose="loader benchmark", progress=False)
    )
    if summary.failed_series or summary.quarantined:
        raise SystemExit(f"ingest did not write every instance: {summary}")
    return out


def window() -> Any:
    """Return the transform both loaders apply: HU window to 0..1."""
    from monai.transforms import ScaleIntensityRanged

    return ScaleIntensityRanged("image", *WINDOW, 0.0, 1.0, clip=True)


def zarr_dataset(dataset: Path, level: str, transformed: bool) -> Any:
    """Return the workbench loader's dataset of the CT series."""
    from workbench.loaders import monai_dataset

    return monai_dataset(
        dataset,
        purpose="loader benchmark",
        level=level,
        where={"Modality": "CT"},
        transforms=[window()] if transformed else [],
    )


def dicom_dataset(folders: list[Path], level: str, transformed: bool) -> Any:
    """Return a MONAI dataset that reads the DICOM files with PydicomReader."""
    from monai.data import Dataset
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    if level == "volume":
        items = [{"image": str(folder)} for folder in folders]
    else:
        items = [
            {"image": str(path)}
            for folder in folders
            for path in sorted(folder.iterdir())
        ]
    load = LoadImaged("image", reader="PydicomReader", image_only=True)
    steps = [load, EnsureChannelFirstd("image")]
    if transformed:
        steps.append(window())
    return Dataset(items, Compose(steps))


def check_same_pixels(zarr_items: Any, dicom_items: Any, case: str) -> None:
    """Stop unless both loaders give the same images, in some order."""
    if len(zarr_items) != len(dicom_items):
        raise SystemExit(
            f"{case}: {len(zarr_items)} Zarr items but {len(dicom_items)} DICOM items"
        )
    reference = dicom_items[0]["image"]
    for index in range(len(zarr_items)):
        image = zarr_items[index]["image"]
        if image.shape == reference.shape and np.allclose(image, reference):
            return
    raise SystemExit(f"{case}: no Zarr item equals the first DICOM item")


def rate(items: Any, repeats: int) -> float:
    """Return the best rate, in items per second, of ``repeats`` full passes."""
    items[0]  # before timing: imports, open stores
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        for index in range(len(items)):
            items[index]
        best = max(best, len(items) / (time.perf_counter() - started))
    return best


def print_report(results: dict[str, Any]) -> None:
    """Print the rates and ratios, one column per case."""
    print(
        f"{results['series']} CT series of {results['slices_per_series']} slices,"
        f" {results['size']} x {results['size']}, headers: {results['headers']}"
    )
    rows = [
        ("items", "items", "{:.0f}"),
        ("monai_dataset (Zarr), items/s", "zarr_per_s", "{:.1f}"),
        ("PydicomReader (DICOM), items/s", "dicom_per_s", "{:.1f}"),
        ("ratio (target at least 10)", "ratio", "{:.1f}"),
    ]
    print(f"{'':32}" + "".join(f"{case:>15}" for case in CASES))
    for label, key, number in rows:
        cells = [number.format(results[f"{case}_{key}"]) for case in CASES]
        print(f"{label:32}" + "".join(f"{cell:>15}" for cell in cells))


if __name__ == "__main__":
    main()

"""Ingest throughput and memory, each against a baseline measured in the same run.

Prints, for one set of synthetic 256x256 CT studies in a real local Orthanc:

- the raw sequential fetch rate of the instance files, the reference: once with
  a plain ``requests`` session as any client sends it (HTTP compression offered,
  so Orthanc deflates each file), once asking for no compression;
- this pipeline's end-to-end rate (``run_ingest``: query, Dask cluster start,
  fetch, de-identify, verify, write Parquet and Zarr, finish), in instances/s;
- a sequential baseline: requests + pydicom + the ``deid`` package's default
  recipe + one Parquet file;
- the peak resident memory of the driver and of the largest worker for N and for
  10 x N studies.

Absolute numbers depend on the machine; the ratios are the result. Run it from the
project root after ``make setup``::

    .venv/bin/python benchmarks/ingest.py              # about two minutes
    .venv/bin/python benchmarks/ingest.py --quick      # a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import requests

from workbench.home import init_home
from workbench.orthanc.server import OrthancServer, start_orthanc
from workbench.orthanc.upload import upload_paths
from workbench.samples import generate_studies


def main() -> None:
    """Run the benchmark and print its report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=10, help="CT studies (N)")
    parser.add_argument("--slices", type=int, default=60, help="slices per study")
    parser.add_argument("--size", type=int, default=256, help="rows and columns")
    parser.add_argument(
        "--memory-studies",
        type=int,
        default=4,
        help="studies in the smaller memory run; the larger has ten times as many",
    )
    parser.add_argument(
        "--headers",
        choices=("scanner", "planted"),
        default="scanner",
        help="scanner: the header of a real GE CT slice (pydicom's CT_small.dcm, 258"
        " elements, 179 private); planted: the synthetic corpus with an identity in"
        " every PS3.15 attribute (about 1100 elements)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for tests")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.studies, args.slices, args.size, args.memory_studies = 2, 8, 64, 1

    work = Path(tempfile.mkdtemp(prefix="workbench-bench-"))
    os.environ["WORKBENCH_HOME"] = str(init_home(work / "home"))
    os.environ.pop("WORKBENCH_AUDIT_URL", None)
    results: dict[str, Any] = {"headers": args.headers}
    with start_orthanc(work / "orthanc") as server:
        os.environ["ORTHANC_USERNAME"] = server.username
        os.environ["ORTHANC_PASSWORD"] = server.password

        # 1. One set of studies, three ways of reading it.
        ids = load_ct_studies(
            server, work / "rates", args.studies, args.slices, args.size, args.headers
        )
        results["instances"] = len(ids)
        results["raw_fetch_per_s"] = raw_fetch_rate(server, ids, compression=True)
        results["raw_fetch_no_compression_per_s"] = raw_fetch_rate(
            server, ids, compression=False
        )
        run = ingest_in_child(server, work / "dataset-rates")
        results["pipeline_per_s"] = run["written"] / run["seconds"]
        results["baseline_per_s"] = baseline_rate(
            server, ids, work / "baseline.parquet"
        )

        # 2. Memory for N and 10 x N studies.
        for label, studies in (
            ("small", args.memory_studies),
            ("large", 10 * args.memory_studies),
        ):
            clear(server)
            folder = work / f"memory-{label}"
            load_ct_studies(
                server, folder, studies, args.slices, args.size, args.headers
            )
            run = ingest_in_child(server, work / f"dataset-{label}")
            results[f"memory_{label}_instances"] = run["written"]
            results[f"memory_{label}_driver_mib"] = run["driver_mib"]
            results[f"memory_{label}_worker_mib"] = run["worker_mib"]

    print_report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def load_ct_studies(
    server: OrthancServer,
    folder: Path,
    studies: int,
    slices: int,
    size: int,
    headers: str,
) -> list[str]:
    """Write CT studies, upload them, and return their Orthanc instance ids."""
    if headers == "planted":
        corpus = generate_studies(
            folder,
            patients=studies,
            studies_per_patient=1,
            ct_slices=slices,
            mr_slices=1,
            rows=size,
            columns=size,
        )
        files = [p for s in corpus.series if s.modality == "CT" for p in s.files]
    else:
        files = write_scanner_studies(folder, studies, slices, size)
    with server.client() as client:
        report = upload_paths(client, files, progress=False)
        if not report.ok:
            raise SystemExit(f"upload failed: {report.summary()}")
        return [i for series in client.find("Series", {}) for i in series["Instances"]]


def write_scanner_studies(
    folder: Path, studies: int, slices: int, size: int
) -> list[Path]:
    """Write CT series whose headers are a real scanner's, with invented patients.

    Every slice copies the header of pydicom's ``CT_small.dcm`` (a GE LightSpeed
    CT slice with its private blocks), with an invented name, ID and birth date
    per study, new UIDs, positions along the table and a ``size`` x ``size``
    phantom as pixel data.
    """
    import numpy as np
    import pydicom
    from pydicom.uid import generate_uid

    template_path = (
        Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"
    )
    template = pydicom.dcmread(template_path)
    rows, columns = np.mgrid[0:size, 0:size]
    body = ((rows - size / 2) / (size * 0.4)) ** 2 + (
        (columns - size / 2) / (size * 0.3)
    ) ** 2
    rng = np.random.default_rng(0)
    files = []
    for study in range(studies):
        study_uid, series_uid, frame_uid = (
            generate_uid(),
            generate_uid(),
            generate_uid(),
        )
        for index in range(slices):
            ds = template.copy()
            ds.PatientName = f"BENCHMARK^PATIENT{study:03d}"
            ds.PatientID = f"BENCH{study:05d}"
            ds.PatientBirthDate = f"{1940 + study % 50}0101"
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
            ds.FrameOfReferenceUID = frame_uid
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber = index + 1
            ds.ImagePositionPatient = [-125.0, -125.0, -100.0 + 2.5 * index]
            ds.SliceLocation = -100.0 + 2.5 * index
            ds.Rows = ds.Columns = size
            pixels = np.where(body < 1, 40, -1000) + rng.integers(-20, 20, (size, size))
            ds.PixelData = pixels.astype("<i2").tobytes()
            path = folder / f"study-{study:03d}" / f"{index:04d}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
    return files


def clear(server: OrthancServer) -> None:
    """Delete every patient from the benchmark's Orthanc."""
    with server.client() as client:
        for patient in client.patients():
            client.delete("Patient", patient)


def raw_fetch_rate(
    server: OrthancServer, ids: list[str], *, compression: bool
) -> float:
    """Fetch every instance file once, sequentially, with a plain requests session."""
    session = requests.Session()
    session.auth = (server.username, server.password)
    if not compression:
        session.headers["Accept-Encoding"] = "identity"
    started = time.perf_counter()
    for instance in ids:
        response = session.get(f"{server.url}/instances/{instance}/file", timeout=60)
        response.raise_for_status()
        _ = response.content
    return len(ids) / (time.perf_counter() - started)


def baseline_rate(server: OrthancServer, ids: list[str], parquet: Path) -> float:
    """requests + pydicom + deid's default recipe + one Parquet file, sequentially."""
    import pydicom
    from deid.dicom import replace_identifiers
    from deid.logger import bot

    bot.level = 0
    logging.getLogger("deid").setLevel(logging.ERROR)
    session = requests.Session()
    session.auth = (server.username, server.password)
    rows = []
    started = time.perf_counter()
    # deid prints a line for every UID it replaces; keep it off the terminal.
    with contextlib.redirect_stdout(io.StringIO()):
        for instance in ids:
            response = session.get(
                f"{server.url}/instances/{instance}/file", timeout=60
            )
            ds = pydicom.dcmread(io.BytesIO(response.content))
            [ds] = replace_identifiers([ds], save=False, remove_private=True)
            rows.append(
                {
                    element.keyword: str(element.value)
                    for element in ds
                    if element.keyword and element.VR not in ("OB", "OW", "SQ", "UN")
                }
            )
        pq.write_table(pa.Table.from_pylist(rows), parquet)
    return len(ids) / (time.perf_counter() - started)


CHILD_SCRIPT = """
import json, sys, threading, time
from pathlib import Path

import psutil

from workbench.ingest import IngestConfig, run_ingest


def watch(peaks, stop):
    # Resident memory of every worker process, sampled; the largest counts.
    me = psutil.Process()
    while not stop.is_set():
        for child in me.children(recursive=True):
            try:
                rss = child.memory_info().rss
            except psutil.Error:
                continue
            peaks[child.pid] = max(peaks.get(child.pid, 0), rss)
        time.sleep(0.05)


def high_water_kib():
    # VmHWM starts afresh at exec, unlike getrusage's ru_maxrss.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


if __name__ == "__main__":
    peaks, stop = {}, threading.Event()
    watcher = threading.Thread(target=watch, args=(peaks, stop), daemon=True)
    watcher.start()
    started = time.perf_counter()
    config = IngestConfig(
        out=Path(sys.argv[2]), orthanc=sys.argv[1], purpose="benchmark", progress=False
    )
    summary = run_ingest(config)
    seconds = time.perf_counter() - started
    stop.set()
    watcher.join()
    print(json.dumps({
        "seconds": seconds,
        "written": summary.written,
        "quarantined": summary.quarantined,
        "driver_mib": high_water_kib() / 1024,
        "worker_mib": max(peaks.values(), default=0) / 2**20,
    }))
"""


def ingest_in_child(server: OrthancServer, out: Path) -> dict[str, float]:
    """Run one ingest in a fresh Python process; return its time and peak memory.

    The rate counts from the call of ``run_ingest`` to its return, so it includes
    the Dask cluster's start and the dataset's finalisation, but not Python's own
    start-up.
    """
    script = out.parent / f"{out.name}-run.py"
    script.write_text(CHILD_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), server.url, str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    run = json.loads(result.stdout.strip().splitlines()[-1])
    if run["quarantined"]:
        raise SystemExit(f"{run['quarantined']} instances were quarantined")
    return run


def print_report(results: dict[str, Any]) -> None:
    """Print the measurements and the ratios the targets are stated in."""
    raw = results["raw_fetch_per_s"]
    raw_plain = results["raw_fetch_no_compression_per_s"]
    pipeline = results["pipeline_per_s"]
    baseline = results["baseline_per_s"]
    lines = [
        f"CT instances ({results['headers']} headers): {int(results['instances'])}",
        f"raw sequential fetch, default client:      {raw:8.1f} /s (reference)",
        f"raw sequential fetch, no HTTP compression: {raw_plain:8.1f} /s",
        f"pipeline end to end (2 workers):           {pipeline:8.1f} /s",
        f"baseline (requests+pydicom+deid+Parquet):  {baseline:8.1f} /s",
        "",
        f"pipeline / raw fetch, default client: {pipeline / raw:6.2f} (target 0.8)",
        f"pipeline / raw fetch, no compression: {pipeline / raw_plain:6.2f}",
        f"pipeline / baseline:                  {pipeline / baseline:6.2f} (target 3)",
        "",
    ]
    for role in ("driver", "worker"):
        small = results[f"memory_small_{role}_mib"]
        large = results[f"memory_large_{role}_mib"]
        lines.append(
            f"peak {role} memory, {int(results['memory_small_instances'])} vs"
            f" {int(results['memory_large_instances'])} instances:"
            f" {small:6.0f} MiB vs {large:6.0f} MiB, ratio {large / small:5.2f}"
            "   (flat: close to 1)"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()

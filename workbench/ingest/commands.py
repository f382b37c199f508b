"""``workbench ingest``: de-identify studies from Orthanc into a dataset folder."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from workbench.cli import EXIT_FAILURE, EXIT_QUARANTINED
from workbench.errors import ConfigurationError
from workbench.ingest.config import IngestConfig, load_dataset_definition, parse_query


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``ingest`` command."""
    parser = subparsers.add_parser(
        "ingest",
        help="de-identify studies into a Parquet and Zarr dataset",
        description=(
            "Read series from an Orthanc server (or a folder of DICOM files),"
            " de-identify and verify every instance in memory, and write a dataset"
            " folder: Parquet metadata, Zarr volumes, a quarantine report and a"
            " manifest. Runs again skip series already written. Exit status 0 when"
            " every instance was written, 3 when some were quarantined, 1 when a"
            " series failed."
        ),
    )
    parser.add_argument(
        "definition",
        nargs="?",
        type=Path,
        help="dataset definition (TOML) giving source, output and options",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--orthanc",
        metavar="URL",
        help="Orthanc server base URL, or 'local' for the one `workbench orthanc"
        " start` runs",
    )
    source.add_argument(
        "--folder", type=Path, metavar="DIR", help="read DICOM files from a folder"
    )
    parser.add_argument(
        "--out", type=Path, metavar="DIR", help="dataset folder to write"
    )
    parser.add_argument(
        "--query",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="series filter such as Modality=CT or StudyDate=20190101-20191231"
        " (repeatable)",
    )
    scale = parser.add_mutually_exclusive_group()
    scale.add_argument(
        "--workers",
        type=int,
        help="worker processes of the local Dask cluster (default 2)",
    )
    scale.add_argument(
        "--scheduler", metavar="ADDRESS", help="use an existing Dask scheduler instead"
    )
    parser.add_argument(
        "--purpose", help="why the data is read; written to the audit log"
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="allow plain HTTP to a remote Orthanc and plain TCP to a remote scheduler",
    )
    parser.add_argument(
        "--keep-descriptors",
        action="store_true",
        default=None,
        help="keep descriptions and comments with identifying values removed"
        " (Clean Descriptors Option) instead of removing them",
    )
    parser.add_argument(
        "--keep-burned-in",
        action="store_true",
        default=None,
        help="write instances that may show burned-in text instead of quarantining"
        " them",
    )
    parser.add_argument(
        "--recipe",
        action="append",
        type=Path,
        default=[],
        metavar="FILE",
        help="extra deid recipe file, read before the bundled recipe (repeatable)",
    )
    parser.add_argument(
        "--fetch-threads",
        type=int,
        help="concurrent downloads in one series (default 4)",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="do not show a progress bar"
    )
    parser.set_defaults(handler=run_ingest_command)


def config_from_args(args: argparse.Namespace) -> IngestConfig:
    """Build the ingest configuration from a definition file and options."""
    query = parse_query(args.query)
    if args.definition is not None:
        config = load_dataset_definition(args.definition)
        if args.orthanc:
            config = replace(config, orthanc=args.orthanc, folder=None)
        elif args.folder:
            config = replace(config, folder=args.folder, orthanc=None, query={})
    else:
        if args.out is None:
            raise ConfigurationError(
                "--out is required (or give a dataset definition file)"
            )
        if not args.orthanc and not args.folder:
            raise ConfigurationError(
                "give a source: --orthanc URL or --folder DIR (or a definition file)"
            )
        config = IngestConfig(out=args.out, orthanc=args.orthanc, folder=args.folder)
    return config.with_overrides(
        out=args.out,
        query={**config.query, **query} if query else None,
        purpose=args.purpose,
        workers=args.workers,
        scheduler=args.scheduler,
        insecure=args.insecure,
        clean_descriptors=args.keep_descriptors,
        quarantine_burned_in=False if args.keep_burned_in else None,
        recipes=tuple(args.recipe) + config.recipes if args.recipe else None,
        fetch_threads=args.fetch_threads,
        progress=False if args.no_progress else None,
    )


def run_ingest_command(args: argparse.Namespace) -> int:
    """Run the ingest and print its summary."""
    from workbench.ingest.pipeline import run_ingest

    summary = run_ingest(config_from_args(args))
    for line in summary.lines():
        print(line)
    for failure in summary.failures:
        print(f"failed series {failure}")
    if summary.failed_series:
        return EXIT_FAILURE
    if summary.quarantined:
        return EXIT_QUARANTINED
    return 0

"""``workbench orthanc``: run the local Orthanc and load DICOM files into it.

``start``, ``stop`` and ``status`` manage the Orthanc of an Orthanc home (by default
``<workbench home>/orthanc``). ``load`` uploads files and folders, and with
``--samples`` the bundled sample studies, to that Orthanc or to the one named by
``--url``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
from pathlib import Path

from workbench.errors import ConfigurationError
from workbench.home import find_home
from workbench.orthanc.client import OrthancClient
from workbench.orthanc.server import (
    CREDENTIALS_FILENAME,
    orthanc_status,
    read_credentials,
    start_orthanc,
    stop_orthanc,
)
from workbench.orthanc.upload import upload_paths

__all__ = ["register", "run_load", "run_start", "run_status", "run_stop"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
# Some files were not uploaded (not DICOM, or refused by Orthanc); the rest were.
EXIT_REFUSED = 3
# Files listed one by one after a load's summary; the rest are counted.
MAX_LISTED_PROBLEMS = 50


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``orthanc`` command group."""
    parser = subparsers.add_parser(
        "orthanc",
        help="run the local Orthanc DICOM archive and load files into it",
        description=(
            "Manage the workbench's own Orthanc, which listens for clients on this"
            " machine only and requires a password, and upload DICOM files to it."
        ),
    )
    commands = parser.add_subparsers(dest="orthanc_command", metavar="COMMAND")
    commands.required = True

    start = commands.add_parser(
        "start",
        help="start the local Orthanc, or show it if it is already running",
        description=(
            "Start Orthanc with a locked-down configuration written to the Orthanc"
            " home. The username and password are generated on the first start and"
            " kept in credentials.json in that folder (mode 0600)."
        ),
    )
    _add_home_argument(start)
    start.add_argument(
        "--port",
        type=int,
        help="HTTP port (default: 8042 if it is free, otherwise a free port)",
    )
    start.add_argument(
        "--dicom-port",
        type=int,
        help="also start Orthanc's DICOM server on this TCP port (default: off)",
    )
    start.set_defaults(handler=run_start)

    stop = commands.add_parser("stop", help="stop the local Orthanc")
    _add_home_argument(stop)
    stop.set_defaults(handler=run_stop)

    status = commands.add_parser(
        "status",
        help="show whether the local Orthanc runs and what it stores",
        description="Exit status: 0 when Orthanc runs and responds, 1 otherwise.",
    )
    _add_home_argument(status)
    status.set_defaults(handler=run_status)

    load = commands.add_parser(
        "load",
        help="upload DICOM files and folders to Orthanc",
        description=(
            "Upload DICOM files, and folders walked recursively, to the local Orthanc"
            " (with its stored credentials) or to --url (credentials from"
            " ORTHANC_USERNAME and ORTHANC_PASSWORD). Files that are not usable DICOM"
            " are reported and not sent. Exit status: 0 when every file is stored,"
            " 3 when some files were not DICOM or were rejected by Orthanc, 1 on an"
            " error."
        ),
    )
    load.add_argument(
        "paths", nargs="*", type=Path, metavar="PATH", help="DICOM file or folder"
    )
    load.add_argument(
        "--samples", action="store_true", help="also upload the bundled sample studies"
    )
    load.add_argument("--url", help="Orthanc base URL (default: the local Orthanc)")
    load.add_argument(
        "--insecure",
        action="store_true",
        help="allow plain http:// to another host (password and data unencrypted)",
    )
    load.add_argument(
        "--workers",
        type=int,
        default=4,
        help="files uploaded at the same time (default: %(default)s)",
    )
    load.add_argument(
        "--no-progress", action="store_true", help="do not show a progress bar"
    )
    _add_home_argument(load)
    load.set_defaults(handler=run_load)


def run_start(args: argparse.Namespace) -> int:
    """Start the local Orthanc and print its URL and credentials file."""
    home = _orthanc_home(args.home)
    server = start_orthanc(home, port=args.port, dicom_port=args.dicom_port)
    print(f"Orthanc is running at {server.url} (PID {server.pid})")
    if args.dicom_port is not None:
        print(f"DICOM server on port {args.dicom_port}")
    print(f"credentials: {server.home / CREDENTIALS_FILENAME}")
    return EXIT_OK


def run_stop(args: argparse.Namespace) -> int:
    """Stop the local Orthanc."""
    home = _orthanc_home(args.home)
    if stop_orthanc(home):
        print(f"stopped Orthanc of {home}")
    else:
        print(f"Orthanc of {home} was not running")
    return EXIT_OK


def run_status(args: argparse.Namespace) -> int:
    """Print whether the local Orthanc runs, and its counts when it does."""
    status = orthanc_status(_orthanc_home(args.home))
    print(f"home: {status['home']}")
    if not status["running"]:
        print("running: no")
        return EXIT_FAILURE
    print(f"running: yes (PID {status['pid']})")
    print(f"url: {status['url']}")
    print(f"credentials: {status['credentials_file']}")
    if not status["responding"]:
        print(f"responding: no ({status['error']})")
        return EXIT_FAILURE
    print(
        f"stored: {status['patients']} patients, {status['studies']} studies,"
        f" {status['series']} series, {status['instances']} instances"
        f" ({status['disk_size_mb']} MB)"
    )
    return EXIT_OK


def run_load(args: argparse.Namespace) -> int:
    """Upload the given files, and the sample studies with ``--samples``."""
    if not args.paths and not args.samples:
        print(
            "workbench orthanc load: give at least one PATH, or --samples",
            file=sys.stderr,
        )
        return EXIT_USAGE

    client = _load_client(args)
    with client, tempfile.TemporaryDirectory(prefix="workbench-samples-") as scratch:
        check = client.check_server()
        print(f"Orthanc {check.version} at {client.url}")
        paths = list(args.paths)
        if args.samples:
            paths.extend(_sample_files(Path(scratch)))
        report = upload_paths(
            client, paths, workers=args.workers, progress=not args.no_progress
        )

    print(report.summary())
    if not report.outcomes:
        print("no files were found in the given paths", file=sys.stderr)
        return EXIT_FAILURE
    problems = report.problems()
    for outcome in problems[:MAX_LISTED_PROBLEMS]:
        reason = outcome.reason.removeprefix(f"{outcome.status}: ")
        print(f"  {outcome.status}: {outcome.path}: {reason}")
    if len(problems) > MAX_LISTED_PROBLEMS:
        print(f"  ... and {len(problems) - MAX_LISTED_PROBLEMS} more")
    return EXIT_OK if report.ok else EXIT_REFUSED


def _load_client(args: argparse.Namespace) -> OrthancClient:
    """Return a client for ``--url``, or for the local Orthanc with its credentials.

    ``ORTHANC_USERNAME`` and ``ORTHANC_PASSWORD`` apply to ``--url`` only: the
    local Orthanc has its own stored credentials.
    """
    if args.url is not None:
        return OrthancClient.from_environment(
            args.url, home=args.home, insecure=args.insecure
        )
    home = _orthanc_home(args.home)
    credentials = read_credentials(home)
    if credentials is None or not orthanc_status(home).get("running"):
        raise ConfigurationError(
            f"the local Orthanc (home {home}) is not running; start it with"
            " `workbench orthanc start`, or give --url"
        )
    return OrthancClient(credentials.url, credentials.username, credentials.password)


def _add_home_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--home",
        type=Path,
        default=None,
        help="Orthanc home folder (default: orthanc/ in the workbench home)",
    )


def _orthanc_home(home: Path | None) -> Path:
    return home if home is not None else find_home() / "orthanc"


def _sample_files(destination: Path) -> list[Path]:
    # Imported here: the samples module is optional for every other command.
    try:
        samples = importlib.import_module("workbench.samples")
        sample_files = samples.sample_files
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError(
            "the bundled sample studies are not available in this installation"
            f" (workbench.samples.sample_files could not be loaded: {exc})"
        ) from exc
    return list(sample_files(destination))

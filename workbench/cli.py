"""The ``workbench`` command line.

Each command group lives beside the code it drives and registers itself here through a
``register(subparsers)`` function. This module only sets up logging, dispatches, and
turns :class:`~workbench.errors.WorkbenchError` into a one-line message and an exit
status.

Exit status: 0 on success, 1 when the command failed, 2 for a usage error, 3 when an
ingest finished but quarantined one or more instances, 130 on interruption.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from workbench import __version__
from workbench.errors import WorkbenchError

__all__ = ["EXIT_FAILURE", "EXIT_QUARANTINED", "EXIT_USAGE", "main"]

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_QUARANTINED = 3

# Modules whose register(subparsers) adds a command group. Imports are deferred so
# that `workbench --help` does not load torch or Flower.
COMMAND_MODULES = (
    "workbench.home_commands",
    "workbench.orthanc.commands",
    "workbench.samples.commands",
    "workbench.ingest.commands",
    "workbench.jobs.commands",
    "workbench.audit.commands",
    "workbench.federation.commands",
)


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every command group registered."""
    parser = argparse.ArgumentParser(
        prog="workbench",
        description="Medical imaging research workbench.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument(
        "-v", "--verbose", action="store_true", help="log debugging detail"
    )
    verbosity.add_argument(
        "-q", "--quiet", action="store_true", help="log warnings and errors only"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def configure_logging(*, verbose: bool = False, quiet: bool = False) -> None:
    """Send the package's log records to standard error."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    )
    package_logger = logging.getLogger("workbench")
    package_logger.addHandler(handler)
    package_logger.setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(verbose=args.verbose, quiet=args.quiet)
    try:
        return int(args.handler(args) or 0)
    except WorkbenchError as exc:
        print(f"workbench: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(
            "workbench: interrupted; an ingest resumes where it stopped when you run"
            " the same command again",
            file=sys.stderr,
        )
        return 130
    except BrokenPipeError:
        # The reader of our output went away (``workbench samples list | head``).
        sys.stderr.close()
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())

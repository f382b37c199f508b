"""``workbench init``: create the workbench home and its de-identification key."""

from __future__ import annotations

import argparse
from pathlib import Path

from workbench.home import HOME_DIRNAME, init_home


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``init`` command."""
    parser = subparsers.add_parser(
        "init",
        help="create the workbench home folder and its de-identification key",
        description=(
            "Create the workbench home (default: ./.workbench) with a random"
            " de-identification key readable only by you. Safe to run again: an"
            " existing key is kept."
        ),
    )
    parser.add_argument(
        "--home",
        type=Path,
        default=Path(HOME_DIRNAME),
        help="folder to create (default: %(default)s)",
    )
    parser.set_defaults(handler=run_init)


def run_init(args: argparse.Namespace) -> int:
    """Create the home folder and print its path."""
    home = init_home(args.home)
    print(f"workbench home: {home}")
    return 0

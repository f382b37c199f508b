"""``workbench audit``: verify the audit log's hash chain and show its records."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from workbench.audit.chain import AuditRecord, canonical_json
from workbench.audit.log import (
    AUDIT_FILENAME,
    AUDIT_URL_ENV,
    open_audit_log,
    sqlite_path,
)
from workbench.audit.query import parse_time
from workbench.errors import ConfigurationError
from workbench.home import find_home

__all__ = ["register", "run_show", "run_verify"]

TABLE_COLUMNS = ("SEQ", "TIME (UTC)", "ACTOR", "ACTION", "OUTCOME", "RESOURCE")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``audit`` command group with ``verify`` and ``show``."""
    parser = subparsers.add_parser(
        "audit",
        help="verify and read the tamper-evident audit log",
        description=(
            "Verify and read the audit log of data accesses. The log is the one"
            f" named by --url, else by {AUDIT_URL_ENV}, else audit.sqlite in the"
            " workbench home."
        ),
    )
    commands = parser.add_subparsers(dest="audit_command", metavar="SUBCOMMAND")
    commands.required = True

    verify = commands.add_parser(
        "verify",
        help="check the hash chain and print the record count and head hash",
        description=(
            "Recompute every record's hash and link, and check the head anchor."
            " Exit status 0 when the log verifies, 1 when a record was edited,"
            " deleted, inserted or moved. Keep the printed head hash somewhere"
            " else and pass it back with --expected-head to detect deletion of the"
            " newest records."
        ),
    )
    _add_url_option(verify)
    verify.add_argument(
        "--expected-head",
        metavar="HASH",
        help="head hash printed by an earlier verify; some record must have it",
    )
    verify.set_defaults(handler=run_verify)

    show = commands.add_parser(
        "show",
        help="print audit records, filtered",
        description=(
            "Print audit records, oldest first, as a table or as JSON lines. This"
            " does not verify them; run `workbench audit verify` for that."
        ),
    )
    _add_url_option(show)
    show.add_argument("--action", help="only this action, such as orthanc.query")
    show.add_argument("--actor", metavar="USER", help="only this actor")
    show.add_argument("--outcome", help="only this outcome, such as denied")
    show.add_argument(
        "--resource", metavar="PREFIX", help="only resources starting with PREFIX"
    )
    show.add_argument(
        "--since",
        metavar="ISO",
        type=_iso_time,
        help="only records at or after this ISO 8601 time (UTC if no offset)",
    )
    show.add_argument(
        "--until",
        metavar="ISO",
        type=_iso_time,
        help="only records before this ISO 8601 time (UTC if no offset)",
    )
    show.add_argument(
        "--limit",
        metavar="N",
        type=_positive_int,
        help="only the newest N matching records",
    )
    show.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per record, with hashes, instead of a table",
    )
    show.set_defaults(handler=run_show)


def _add_url_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        help=(
            "audit log: sqlite:////PATH or postgresql://USER@HOST:PORT/DB (default:"
            f" {AUDIT_URL_ENV}, else audit.sqlite in the workbench home)"
        ),
    )


def _iso_time(text: str) -> str:
    try:
        parse_time(text)
    except ConfigurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return text


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def run_verify(args: argparse.Namespace) -> int:
    """Verify the log and print its record count and head hash.

    Raises
    ------
    AuditChainError
        When the chain does not verify; the command line prints it and exits 1.
    """
    _require_existing_sqlite(args.url)
    with open_audit_log(args.url) as audit:
        report = audit.verify(expected_head=args.expected_head)
        location = audit.location
    print(f"audit log: {location}")
    print(f"records verified: {report.record_count}")
    print(f"head sequence: {report.head_sequence}")
    print(f"head hash: {report.head_hash}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    """Print the records that match the filters, as a table or as JSON lines."""
    _require_existing_sqlite(args.url)
    with open_audit_log(args.url) as audit:
        records = audit.records(
            action=args.action,
            actor=args.actor,
            outcome=args.outcome,
            resource_prefix=args.resource,
            since=args.since,
            until=args.until,
            limit=args.limit,
        )
    if args.json:
        for record in records:
            print(json.dumps(record.to_dict(), ensure_ascii=False))
    else:
        write_table(records, sys.stdout)
    return 0


def write_table(records: Sequence[AuditRecord], stream: TextIO) -> None:
    """Write ``records`` as an aligned text table with purpose and details last."""
    if not records:
        print("no audit records match", file=stream)
        return
    rows = [
        (
            str(record.sequence),
            record.timestamp[:19].replace("T", " "),
            record.actor,
            record.action,
            record.outcome,
            record.resource,
        )
        for record in records
    ]
    widths = [
        max(len(column), *(len(row[index]) for row in rows))
        for index, column in enumerate(TABLE_COLUMNS)
    ]
    header = "  ".join(
        column.ljust(width) for column, width in zip(TABLE_COLUMNS, widths, strict=True)
    )
    print(f"{header}  PURPOSE / DETAILS", file=stream)
    for record, row in zip(records, rows, strict=True):
        cells = "  ".join(
            cell.ljust(width) for cell, width in zip(row, widths, strict=True)
        )
        extra = record.purpose
        if record.details:
            extra = f"{extra} {canonical_json(record.details)}".strip()
        print(f"{cells}  {extra}".rstrip(), file=stream)


def _require_existing_sqlite(url: str | None) -> None:
    """Refuse to read a SQLite log that does not exist: opening would create it.

    A mistyped path would otherwise "verify" a new, empty log.
    """
    url = url or os.environ.get(AUDIT_URL_ENV) or None
    if url is None:
        path = find_home() / AUDIT_FILENAME
    elif "://" not in url:
        path = Path(url)
    elif url.lower().startswith("sqlite:"):
        path = sqlite_path(url)
    else:
        return
    if not path.is_file():
        raise ConfigurationError(
            f"no audit log at {path}; check the path (--url or {AUDIT_URL_ENV})"
        )

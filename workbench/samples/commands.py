"""``workbench samples``: write synthetic studies and field cases, list real files."""

from __future__ import annotations

import argparse
from pathlib import Path

from workbench.samples.bundled import bundled_sample_files
from workbench.samples.field_cases import FIELD_CASES, build_field_case
from workbench.samples.synthetic import (
    MAX_IMAGE_SIZE,
    MAX_PATIENTS,
    MIN_IMAGE_SIZE,
    generate_studies,
)

__all__ = ["register", "run_cases", "run_generate", "run_list"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``samples`` command group."""
    parser = subparsers.add_parser(
        "samples",
        help="write synthetic DICOM studies and field cases, list bundled files",
        description=(
            "Sample DICOM input with invented identities, for the demo and the tests."
        ),
    )
    commands = parser.add_subparsers(dest="samples_command", metavar="COMMAND")
    commands.required = True

    generate = commands.add_parser(
        "generate",
        help="write synthetic CT and MR studies of invented patients",
        description=(
            "Write synthetic studies (one CT and one MR series each) of invented"
            " patients as DICOM Part 10 files OUT/<patient>/<study>/<series>/*.dcm,"
            " with invented identities in every attribute that can carry identity."
            " The same seed gives the same bytes."
        ),
    )
    generate.add_argument("--out", type=Path, required=True, help="output folder")
    generate.add_argument(
        "--patients",
        type=int,
        default=3,
        help=f"number of patients, 1 to {MAX_PATIENTS} (default: %(default)s)",
    )
    generate.add_argument(
        "--studies-per-patient",
        type=int,
        default=2,
        help="studies per patient (default: %(default)s)",
    )
    generate.add_argument(
        "--seed", type=int, default=0, help="random seed (default: %(default)s)"
    )
    generate.add_argument(
        "--ct-slices",
        type=int,
        default=24,
        help="slices per CT series (default: %(default)s)",
    )
    generate.add_argument(
        "--mr-slices",
        type=int,
        default=12,
        help="slices per MR series (default: %(default)s)",
    )
    generate.add_argument(
        "--size",
        type=int,
        default=64,
        help=(
            f"rows and columns of every image, {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE}"
            " (default: %(default)s)"
        ),
    )
    generate.set_defaults(handler=run_generate)

    cases = commands.add_parser(
        "cases",
        help="write the field cases F1 to F11",
        description=(
            "Write small DICOM inputs that reproduce how DICOM goes wrong in practice"
            " (nested identities, broken files, unusual encodings), one folder per"
            " case, and print what each case expects."
        ),
    )
    cases.add_argument("--out", type=Path, required=True, help="output folder")
    cases.add_argument(
        "case_ids",
        nargs="*",
        metavar="CASE",
        help=f"cases to write (default: all of {', '.join(FIELD_CASES)})",
    )
    cases.set_defaults(handler=run_cases)

    labels = commands.add_parser(
        "labels",
        help="write sphere labels of a sample dataset's CT slices, for training",
        description=(
            "Read a dataset ingested from the sample studies and write a labels"
            " table (SOPInstanceUID,sphere): true for each CT slice that cuts the"
            " phantom's bright sphere. Use it with `workbench train --labels`."
        ),
    )
    labels.add_argument("--dataset", type=Path, required=True, help="dataset folder")
    labels.add_argument("--out", type=Path, required=True, help="CSV file to write")
    labels.set_defaults(handler=run_labels)

    listing = commands.add_parser(
        "list",
        help="list the real DICOM files bundled with installed packages",
        description="Print the path of each DICOM file shipped with pydicom.",
    )
    listing.set_defaults(handler=run_list)


def run_generate(args: argparse.Namespace) -> int:
    """Write the synthetic studies and print a summary."""
    corpus = generate_studies(
        args.out,
        patients=args.patients,
        studies_per_patient=args.studies_per_patient,
        ct_slices=args.ct_slices,
        mr_slices=args.mr_slices,
        rows=args.size,
        columns=args.size,
        seed=args.seed,
    )
    print(
        f"wrote {len(corpus.files)} instances of {len(corpus.patients)} patients"
        f" to {corpus.root}"
    )
    return 0


def run_cases(args: argparse.Namespace) -> int:
    """Write the requested field cases and print each one's expected behaviour."""
    for case_id in args.case_ids or FIELD_CASES:
        case = build_field_case(case_id, args.out / case_id.upper())
        print(f"{case.case_id}: {case.title} ({len(case.files)} files)")
        print(f"    expected: {case.expected}")
    return 0


def run_labels(args: argparse.Namespace) -> int:
    """Write the sphere labels table and print how many slices it covers."""
    from workbench.samples.labels import sphere_labels

    count = sphere_labels(args.dataset, args.out)
    print(f"wrote labels of {count} CT slices to {args.out}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    """Print one bundled file path a line."""
    del args  # The command takes no options.
    for path in bundled_sample_files():
        print(path)
    return 0

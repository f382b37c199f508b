"""``workbench train``, ``workbench infer``, ``workbench finetune-gemma``.

Each command runs its job in an isolated child process by default (see
:mod:`workbench.isolation`): no network, datasets read-only, no secrets, Hugging
Face offline. ``--isolation weak`` accepts a weaker in-process guard where the
kernel refuses namespaces; ``--no-isolation`` runs in this process, for debugging,
and the audit log records that it did.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench.errors import ConfigurationError, DatasetError

if TYPE_CHECKING:
    from workbench.isolation import IsolatedResult

__all__ = [
    "launch_gemma_finetune",
    "launch_gemma_infer",
    "launch_infer",
    "launch_train",
    "register",
]

ENTRY = "workbench.jobs.entry"
POLICIES = {"namespaces": "namespaces", "weak": "weak-in-process-guard"}
TINY_GEMMA = "tiny"
INPUTS_FOLDER = "inputs"
# Folders shared by every program on the machine; a job may see things below them
# only through its own inputs and outputs.
SHARED_FOLDERS = frozenset(
    {"/", "/tmp", "/var/tmp", "/dev/shm", "/run", "/home", "/root"}  # noqa: S108
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train``, ``infer`` and ``finetune-gemma`` commands."""
    train = subparsers.add_parser(
        "train",
        help="train a MONAI model on a dataset (isolated)",
        description=(
            "Train a MONAI model described by a TOML config on a de-identified"
            " dataset, in an isolated child process. Writes checkpoints,"
            " metrics.csv and a loss plot to --out; run again to resume."
        ),
    )
    _common(train)
    train.add_argument(
        "--config", type=Path, required=True, help="training config (TOML)"
    )
    train.add_argument(
        "--labels",
        type=Path,
        help="labels table (CSV or Parquet), overriding the config's",
    )
    train.set_defaults(handler=run_train)

    infer = subparsers.add_parser(
        "infer",
        help="run a trained model or Gemma 3n on a dataset (isolated)",
        description=(
            "Run a model trained with `workbench train` (--model) and write"
            " predictions.parquet, or Gemma 3n (--gemma, with --prompt) and write"
            " generations.parquet, keyed by the dataset's new UIDs."
        ),
    )
    _common(infer)
    which = infer.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", type=Path, help="output folder of `workbench train`")
    which.add_argument(
        "--gemma",
        metavar="PATH_OR_tiny",
        help="a local Gemma 3n checkpoint folder, or 'tiny' for a small random model",
    )
    infer.add_argument(
        "--checkpoint", choices=("best", "last"), default="best",
        help="which checkpoint of --model (default: %(default)s)",
    )  # fmt: skip
    infer.add_argument(
        "--prompt", help="Gemma prompt template over metadata columns, such as"
        " 'Modality: {Modality}. Describe the image.'",
    )  # fmt: skip
    infer.add_argument(
        "--adapter", type=Path, help="LoRA adapter folder from `finetune-gemma`"
    )
    infer.add_argument(
        "--max-new-tokens", type=int, default=32, help="Gemma answer length"
    )
    infer.set_defaults(handler=run_infer)

    finetune = subparsers.add_parser(
        "finetune-gemma",
        help="fine-tune Gemma 3n with LoRA on a dataset (isolated)",
        description=(
            "Fine-tune Gemma 3n with LoRA on the text decoder's attention"
            " projections, from one image per series and a target text from a"
            " dataset column or a reports table. Writes the adapter, loss.csv and"
            " finetune.json to --out."
        ),
    )
    _common(finetune)
    finetune.add_argument("--gemma", required=True, metavar="PATH_OR_tiny")
    finetune.add_argument("--prompt", required=True, help="prompt template")
    target = finetune.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-column", help="dataset column holding the target")
    target.add_argument(
        "--reports", type=Path, help="table keyed on SeriesInstanceUID with a 'report'"
    )
    finetune.add_argument("--steps", type=int, default=100, help="optimizer steps")
    finetune.add_argument("--learning-rate", type=float, default=2e-4)
    finetune.add_argument("--lora-rank", type=int, default=8)
    finetune.add_argument("--seed", type=int, default=0)
    finetune.set_defaults(handler=run_finetune)


def run_train(args: argparse.Namespace) -> int:
    """Train in an isolated child and print the summary."""
    result = launch_train(
        args.dataset,
        args.config,
        args.out,
        purpose=args.purpose,
        labels=args.labels,
        policy=_policy(args),
    )
    _print_summary(result.value)
    return 0


def run_infer(args: argparse.Namespace) -> int:
    """Run MONAI or Gemma 3n inference in an isolated child and print the summary."""
    if args.model is not None:
        result = launch_infer(
            args.dataset,
            args.model,
            args.out,
            purpose=args.purpose,
            checkpoint=args.checkpoint,
            policy=_policy(args),
        )
    else:
        if not args.prompt:
            raise ConfigurationError("--gemma needs --prompt, the prompt template")
        result = launch_gemma_infer(
            args.dataset,
            args.gemma,
            args.prompt,
            args.out,
            purpose=args.purpose,
            adapter=args.adapter,
            max_new_tokens=args.max_new_tokens,
            policy=_policy(args),
        )
    _print_summary(result.value)
    return 0


def run_finetune(args: argparse.Namespace) -> int:
    """Fine-tune Gemma 3n with LoRA in an isolated child and print the summary."""
    result = launch_gemma_finetune(
        args.dataset,
        args.gemma,
        args.out,
        purpose=args.purpose,
        prompt=args.prompt,
        target_column=args.target_column,
        reports=args.reports,
        steps=args.steps,
        learning_rate=args.learning_rate,
        lora_rank=args.lora_rank,
        seed=args.seed,
        policy=_policy(args),
    )
    _print_summary(result.value)
    return 0


def launch_train(
    dataset: Path,
    config: Path,
    out: Path,
    *,
    purpose: str,
    labels: Path | None = None,
    policy: str = "namespaces",
) -> IsolatedResult:
    """Run ``entry:train`` isolated, as ``workbench train`` and the notebook do.

    The config and the labels table are copied into ``out/inputs``, which the
    job can read; their own folders are not shown to it.
    """
    from workbench.training import load_config

    _check_dataset(dataset, out)
    config_path = _existing_file(Path(config), "--config")
    settings = load_config(config_path)
    labels = Path(labels) if labels is not None else settings.labels
    staged = _stage_inputs(out, {"config": config_path, "labels": labels})
    inputs = []
    if settings.task == "segmentation" and labels is not None:
        # Mask files sit beside the labels table and are named relative to it.
        inputs.append(_input_folder(labels.parent, "--labels"))
        staged["labels"] = str(labels.expanduser().resolve())
    kwargs = {
        "config": staged["config"],
        "dataset": str(dataset),
        "out": str(out),
        "purpose": purpose,
        "labels": staged.get("labels"),
    }
    return _launch("train", "train", kwargs, dataset, out, inputs, purpose, policy)


def launch_infer(
    dataset: Path,
    model: Path,
    out: Path,
    *,
    purpose: str,
    checkpoint: str = "best",
    policy: str = "namespaces",
) -> IsolatedResult:
    """Run ``entry:infer`` isolated with a trained model folder."""
    _check_dataset(dataset, out)
    folder = _input_folder(Path(model), "--model")
    kwargs = {
        "dataset": str(dataset),
        "model": str(folder),
        "out": str(out),
        "purpose": purpose,
        "checkpoint": checkpoint,
    }
    return _launch("infer", "infer", kwargs, dataset, out, [folder], purpose, policy)


def launch_gemma_infer(
    dataset: Path,
    gemma: str,
    prompt: str,
    out: Path,
    *,
    purpose: str,
    adapter: Path | None = None,
    max_new_tokens: int = 32,
    slices: int = 1,
    window: str | list[float] = "auto",
    policy: str = "namespaces",
) -> IsolatedResult:
    """Run ``entry:gemma_infer`` isolated; ``gemma`` is ``tiny`` or a folder."""
    _check_dataset(dataset, out)
    inputs = _gemma_inputs(str(gemma))
    adapter_folder = None
    if adapter is not None:
        adapter_folder = _input_folder(Path(adapter), "--adapter")
        inputs.append(adapter_folder)
    kwargs = {
        "dataset": str(dataset),
        "gemma": _gemma_spec(str(gemma)),
        "prompt": prompt,
        "out": str(out),
        "purpose": purpose,
        "adapter": str(adapter_folder) if adapter_folder else None,
        "max_new_tokens": max_new_tokens,
        "slices": slices,
        "window": window,
    }
    return _launch(
        "gemma_infer", "infer-gemma", kwargs, dataset, out, inputs, purpose, policy
    )


def launch_gemma_finetune(
    dataset: Path,
    gemma: str,
    out: Path,
    *,
    purpose: str,
    prompt: str,
    target_column: str | None = None,
    reports: Path | None = None,
    steps: int = 100,
    learning_rate: float = 2e-4,
    lora_rank: int = 8,
    seed: int = 0,
    policy: str = "namespaces",
) -> IsolatedResult:
    """Run ``entry:gemma_finetune`` isolated; the reports table goes to inputs."""
    _check_dataset(dataset, out)
    inputs = _gemma_inputs(str(gemma))
    staged = _stage_inputs(out, {"reports": reports})
    kwargs = {
        "dataset": str(dataset),
        "gemma": _gemma_spec(str(gemma)),
        "out": str(out),
        "purpose": purpose,
        "prompt": prompt,
        "target_column": target_column,
        "reports": staged.get("reports"),
        "steps": steps,
        "learning_rate": learning_rate,
        "lora_rank": lora_rank,
        "seed": seed,
    }
    return _launch(
        "gemma_finetune", "finetune-gemma", kwargs, dataset, out, inputs, purpose,
        policy,
    )  # fmt: skip


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset", type=Path, required=True, help="dataset folder (read-only)"
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--purpose", required=True, help="why the job runs; written to the audit log"
    )
    isolation = parser.add_mutually_exclusive_group()
    isolation.add_argument(
        "--isolation",
        choices=sorted(POLICIES),
        default="namespaces",
        help="namespaces (default): no network, read-only datasets, enforced by the"
        " kernel; weak: only Python's own sockets refused, for kernels that forbid"
        " namespaces",
    )
    isolation.add_argument(
        "--no-isolation",
        action="store_true",
        help="run in this process, for debugging; the audit log records it",
    )


def _policy(args: argparse.Namespace) -> str:
    return "none" if args.no_isolation else POLICIES[args.isolation]


def _print_summary(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, default=str))


def _launch(
    function: str,
    job: str,
    kwargs: dict[str, Any],
    dataset: Path,
    out: Path,
    inputs: list[Path],
    purpose: str,
    policy: str,
) -> IsolatedResult:
    from workbench.isolation import run_isolated

    return run_isolated(
        f"{ENTRY}:{function}",
        kwargs,
        datasets=[dataset],
        outputs=[out],
        inputs=inputs,
        purpose=purpose,
        job=job,
        policy=policy,
    )


def _check_dataset(path: Path, out: Path) -> None:
    """Refuse a folder that is not a de-identified dataset, or an output inside it,
    before anything is copied into the output folder."""
    from workbench.dataset.reader import DatasetView

    root = DatasetView.open(path).root
    folder = Path(out).expanduser().resolve()
    if folder == root or folder.is_relative_to(root):
        raise DatasetError(
            f"output folder {folder} lies inside dataset {root}, which jobs may only"
            " read; choose an output folder outside every dataset"
        )


def _stage_inputs(out: Path, files: dict[str, Path | None]) -> dict[str, str]:
    """Copy small input files into ``out/inputs`` and return their new paths.

    The isolated job sees its output folder, so it can read these copies; the
    folders they came from (often ``/tmp`` or a home folder) stay hidden.
    """
    staged: dict[str, str] = {}
    folder = Path(out).expanduser().resolve() / INPUTS_FOLDER
    for name, path in files.items():
        if path is None:
            continue
        source = _existing_file(Path(path), f"--{name}")
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{name}{source.suffix}"
        shutil.copyfile(source, target)
        staged[name] = str(target)
    return staged


def _input_folder(path: Path, option: str) -> Path:
    """Return a folder the job may read, refusing top-level scratch folders."""
    folder = path.expanduser().resolve()
    if not folder.is_dir():
        raise ConfigurationError(f"{option} {folder} is not a folder")
    if str(folder) in SHARED_FOLDERS:
        raise ConfigurationError(
            f"{option} {folder} is a shared folder the job must not see whole; put"
            " its files in a folder of their own"
        )
    return folder


def _existing_file(path: Path, option: str) -> Path:
    path = path.expanduser().resolve()
    if not path.is_file():
        raise ConfigurationError(f"{option} {path} does not exist")
    return path


def _gemma_spec(spec: str) -> str:
    if spec == TINY_GEMMA:
        return spec
    return str(Path(spec).expanduser().resolve())


def _gemma_inputs(spec: str) -> list[Path]:
    """Return the checkpoint folder the job must read, checked here."""
    if spec == TINY_GEMMA:
        return []
    folder = _input_folder(Path(spec), "--gemma")
    if not (folder / "config.json").is_file():
        raise ConfigurationError(
            f"--gemma {spec}: not 'tiny' and not a local checkpoint folder with a"
            " config.json; the workbench never downloads models"
        )
    return [folder]

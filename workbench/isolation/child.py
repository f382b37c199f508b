"""The process of an isolated job: ``python -m workbench.isolation.child --spec-fd N``.

:func:`workbench.isolation.run_isolated` starts this module with the interpreter of
the calling process, so the job uses the same virtual environment. It reads the job's
specification (JSON) from descriptor ``N`` and builds the sandbox that the policy
requires. Only then does it import the job's module and call the function. It writes
one JSON document to the result descriptor named in the specification:

- ``{"status": "ok", "value": ...}`` with the function's return value;
- ``{"status": "error", "error_type": ..., "message": ..., "traceback": ...}``
  when the function raised;
- ``{"status": "isolation-error", "message": ...}`` when the sandbox could not be
  built and the job did not run;
- ``{"status": "died", "exit_status": ..., "signal": ...}``, written by the
  sandbox's supervisor, when the job's process ended without writing a result.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import signal
import sys
import traceback
from collections.abc import Callable
from types import FrameType
from typing import Any

from workbench.isolation.errors import IsolationError

EXIT_OK = 0
EXIT_JOB_ERROR = 1
EXIT_ISOLATION_ERROR = 3

# Policy names as IsolationPolicy spells them; the enum itself lives in the runner.
NAMESPACES = "namespaces"
WEAK_IN_PROCESS_GUARD = "weak-in-process-guard"


class ResultWriter:
    """Writes the job's single JSON result to the descriptor the runner gave."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, document: dict[str, Any]) -> None:
        """Write ``document`` as JSON text."""
        data = json.dumps(document, allow_nan=False).encode("utf-8")
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]

    def write_died(self, exit_status: int, signal_number: int) -> None:
        """Record how the job's process ended, unless it wrote a result itself."""
        if os.fstat(self.fd).st_size == 0:
            self.write(
                {
                    "status": "died",
                    "exit_status": exit_status,
                    "signal": signal_number or None,
                }
            )


def main(argv: list[str] | None = None) -> int:
    """Run the job described on the specification descriptor; return the exit status."""
    parser = argparse.ArgumentParser(prog="python -m workbench.isolation.child")
    parser.add_argument("--spec-fd", type=int, required=True)
    arguments = parser.parse_args(argv)
    with os.fdopen(arguments.spec_fd, "rb") as handle:
        spec = json.loads(handle.read())
    result = ResultWriter(spec["result_fd"])
    os.set_inheritable(result.fd, False)
    _end_with_runner(spec["parent_pid"])

    try:
        _enter_policy(spec, result)
    except IsolationError as exc:
        result.write({"status": "isolation-error", "message": str(exc)})
        return EXIT_ISOLATION_ERROR
    for number in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, _raise_terminated)

    # Import the job only now, so its import-time code runs inside the sandbox.
    sys.path[:] = [
        *spec["sys_path"],
        *(p for p in sys.path if p not in spec["sys_path"]),
    ]
    try:
        function = _load_function(spec["target"])
        value = function(**spec["kwargs"])
    except BaseException as exc:  # every failure, even SystemExit, goes to the runner
        result.write(_error_document(exc, str(exc) or type(exc).__name__))
        return EXIT_JOB_ERROR
    try:
        result.write({"status": "ok", "value": value})
    except (TypeError, ValueError) as exc:
        message = f"the return value of {spec['target']} is not JSON: {exc}"
        result.write(_error_document(exc, message))
        return EXIT_JOB_ERROR
    return EXIT_OK


def _enter_policy(spec: dict[str, Any], result: ResultWriter) -> None:
    """Build the sandbox of ``spec["policy"]`` around this process."""
    policy = spec["policy"]
    if policy == NAMESPACES:
        from workbench.isolation.namespaces import SandboxPlan, enter_sandbox

        enter_sandbox(SandboxPlan(**spec["plan"]), on_job_died=result.write_died)
    elif policy == WEAK_IN_PROCESS_GUARD:
        from workbench.isolation.guard import install_network_guard

        install_network_guard()
    else:
        raise IsolationError(f"isolation policy {policy!r} cannot run in a child")


def _end_with_runner(runner_pid: int) -> None:
    """Have the kernel kill this process when the runner ends, even by SIGKILL."""
    from workbench.isolation import syscalls

    with contextlib.suppress(OSError):
        syscalls.set_parent_death_signal(signal.SIGKILL)
    # The runner may have ended before the request took effect.
    if os.getppid() != runner_pid:
        os._exit(EXIT_ISOLATION_ERROR)


def _load_function(target: str) -> Callable[..., Any]:
    module_name, _, function_name = target.partition(":")
    module = importlib.import_module(module_name)
    function = module
    for name in function_name.split("."):
        function = getattr(function, name)
    if not callable(function):
        raise TypeError(f"{target} is a {type(function).__name__}, not a function")
    return function  # type: ignore[return-value]


def _error_document(exc: BaseException, message: str) -> dict[str, Any]:
    cls = type(exc)
    error_type = cls.__qualname__
    if cls.__module__ != "builtins":
        error_type = f"{cls.__module__}.{error_type}"
    return {
        "status": "error",
        "error_type": error_type,
        "message": message,
        "traceback": "".join(traceback.format_exception(exc)),
    }


def _raise_terminated(number: int, _frame: FrameType | None) -> None:
    raise SystemExit(f"terminated by {signal.Signals(number).name}")


if __name__ == "__main__":
    sys.exit(main())

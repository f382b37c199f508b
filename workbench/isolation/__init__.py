"""Isolated execution of training and inference jobs on de-identified datasets.

A job is a plain Python function, named ``"package.module:function"``, that takes
JSON keyword arguments and returns a JSON value. :func:`run_isolated` runs it in a
child process that cannot reach any network. The process reads the datasets it is
given but cannot change them, and writes only its output folders and a private
``/tmp``. Its environment contains no secrets and sets the Hugging Face libraries
offline, and it cannot read the de-identification key::

    from workbench.isolation import IsolationPolicy, run_isolated

    result = run_isolated(
        "workbench.training.train:run_training",
        {"config": "configs/ct.toml", "out": "runs/ct-cls"},
        datasets=["datasets/demo"],
        outputs=["runs/ct-cls"],
        purpose="nodule classifier v1",
        job="train",
        policy=IsolationPolicy.NAMESPACES,
    )
    result.value      # the function's return value

The job's ``open_audit_log().append(...)`` calls reach this process's audit log
through a pipe (:mod:`workbench.isolation.relay`), between the ``job.start`` and
``job.end`` records that :func:`run_isolated` writes.

Policies, strongest first:

``NAMESPACES`` (default)
    Linux mount, network and PID namespaces, plus a user namespace when not root
    (:mod:`workbench.isolation.namespaces`). The kernel enforces them, so they hold
    for native code and for every process the job starts.
``WEAK_IN_PROCESS_GUARD``
    For machines without namespaces: Python socket calls are refused in the child
    (:mod:`workbench.isolation.guard`). Native code and programs the job starts are
    NOT contained, datasets are NOT write-protected and the key is NOT hidden.
``NONE``
    The function runs in the calling process, for debugging.
"""

from workbench.isolation.errors import IsolatedJobError, IsolationError
from workbench.isolation.runner import IsolatedResult, IsolationPolicy, run_isolated

__all__ = [
    "IsolatedJobError",
    "IsolatedResult",
    "IsolationError",
    "IsolationPolicy",
    "run_isolated",
]

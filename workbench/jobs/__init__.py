"""Training and inference jobs as the command line runs them: isolated, audited.

:mod:`workbench.jobs.entry` holds the functions that run inside the isolated child
process; :mod:`workbench.jobs.commands` adds ``workbench train``, ``workbench infer``
and ``workbench finetune-gemma``.
"""

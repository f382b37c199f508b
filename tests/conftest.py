"""Shared test configuration: fixture modules that start real servers."""

import signal

# A shell that starts the tests in the background, without job control, makes
# them ignore SIGINT, and every process they start would inherit that. Tests that
# stop a job or the lab with SIGINT, as Ctrl-C does, need its default action there.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

pytest_plugins = [
    "fixtures.workbench_home",
    "fixtures.postgres",
    "fixtures.orthanc",
    "fixtures.dicom_samples",
]

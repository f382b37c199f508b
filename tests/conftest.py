"""Shared test configuration: fixture modules that start real servers."""

pytest_plugins = [
    "fixtures.workbench_home",
    "fixtures.postgres",
    "fixtures.orthanc",
    "fixtures.dicom_samples",
]

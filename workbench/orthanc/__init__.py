"""Orthanc, the DICOM archive the workbench reads from: server, client and upload.

:mod:`workbench.orthanc.server` runs a hardened Orthanc on this machine,
:mod:`workbench.orthanc.client` talks to any Orthanc over its REST API, and
:mod:`workbench.orthanc.upload` stores DICOM files from disk in it.
"""

from workbench.orthanc.client import OrthancClient, ServerCheck
from workbench.orthanc.server import (
    OrthancCredentials,
    OrthancServer,
    orthanc_status,
    read_credentials,
    start_orthanc,
    stop_orthanc,
)
from workbench.orthanc.upload import (
    UploadOutcome,
    UploadReport,
    UploadStatus,
    upload_paths,
)

__all__ = [
    "OrthancClient",
    "OrthancCredentials",
    "OrthancServer",
    "ServerCheck",
    "UploadOutcome",
    "UploadReport",
    "UploadStatus",
    "orthanc_status",
    "read_credentials",
    "start_orthanc",
    "stop_orthanc",
    "upload_paths",
]

"""Real DICOM files that ship inside installed Python packages.

pydicom's wheel carries about eighty test files (every common transfer syntax,
truncated and headerless files, structured reports, RT objects) and seventeen
character-set files. They are real, small and offline, so the demo and the tests
use them beside the synthetic studies. Of the packages the workbench depends on,
only pydicom ships DICOM files (checked with pydicom 3.0.2, MONAI 1.6.1 and deid
0.4.13, whose ``deid.dicom`` files are recipes, not DICOM).

The folders are found from ``pydicom.__file__``. pydicom's own
``get_testdata_files`` is never called with a pattern, because it then tries to
download further files.
"""

from __future__ import annotations

from pathlib import Path

import pydicom

__all__ = ["PYDICOM_CHARSET_FILES", "PYDICOM_TEST_FILES", "bundled_sample_files"]

PYDICOM_TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
PYDICOM_CHARSET_FILES = Path(pydicom.__file__).parent / "data" / "charset_files"


def bundled_sample_files() -> list[Path]:
    """Return pydicom's bundled test and character-set files, sorted by path.

    Some of them are broken on purpose (``MR_truncated.dcm``, ``no_meta.dcm``,
    ``rtplan_truncated.dcm``): a reader must quarantine or repair them, not crash.

    Returns
    -------
    list of Path
        Every ``*.dcm`` file in pydicom's ``data/test_files`` and
        ``data/charset_files`` folders; empty when pydicom was installed without
        its data.
    """
    files: list[Path] = []
    for folder in (PYDICOM_TEST_FILES, PYDICOM_CHARSET_FILES):
        files.extend(sorted(folder.glob("*.dcm")))
    return files

"""Labels a model can learn from the sample studies, read off the pixels.

The synthetic phantom holds a bright sphere (about 700 HU in CT) inside a body of
about 40 HU; :func:`sphere_labels` marks each CT slice of a dataset that cuts the
sphere. It reads the de-identified dataset, not the source, so its table is keyed
by the dataset's new UIDs, ready for ``workbench train --labels``. The read is
audit-logged like any other.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from workbench.audit import AuditEvent, open_audit_log
from workbench.dataset.reader import DatasetView

__all__ = ["SPHERE_THRESHOLD_HU", "sphere_labels"]

# Halfway between the phantom's body and its sphere.
SPHERE_THRESHOLD_HU = 370


def sphere_labels(
    dataset: Path | str, out: Path | str, *, purpose: str = "sample labels"
) -> int:
    """Write ``SOPInstanceUID,sphere`` for every CT slice; return the row count.

    The read goes to the audit log of the workbench home with ``purpose``.
    """
    view = DatasetView.open(dataset)
    rows = view.instances(
        columns=["SOPInstanceUID", "Modality", "volume_path", "volume_index"]
    ).to_pandas()
    rows = rows[(rows["Modality"] == "CT") & rows["volume_path"].notna()]
    maxima = {}
    for path in rows["volume_path"].unique():
        pixels = np.asarray(view.pixel_array(path)[...])
        axes = tuple(range(1, pixels.ndim))
        maxima[path] = pixels.max(axis=axes)
    rows["sphere"] = [
        bool(maxima[path][int(index)] >= SPHERE_THRESHOLD_HU)
        for path, index in zip(rows["volume_path"], rows["volume_index"], strict=True)
    ]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows[["SOPInstanceUID", "sphere"]].to_csv(out, index=False)
    with open_audit_log() as audit:
        audit.append(
            AuditEvent(
                action="dataset.read",
                resource=f"dataset:{view.name}",
                purpose=purpose,
                details={"job": "sphere labels", "slices": len(rows)},
            )
        )
    return len(rows)

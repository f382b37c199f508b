"""What the federation tests share: the sphere classifier's training sections."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from ingest_helpers import ingest_folder

from workbench.federation.plan import FederationConfig, load_federation_config
from workbench.samples import generate_studies
from workbench.samples.labels import sphere_labels


def sphere_classifier(
    *,
    metric: str = "accuracy",
    features: int = 4,
    blocks: tuple[int, ...] = (1, 1),
    validation_fraction: float = 0.34,
) -> str:
    """Return the TOML sections of a small DenseNet that finds the phantom's sphere.

    The sections follow a ``[federation]`` section (and its ``[strategy]`` and
    ``[privacy]``) in a federation config; the slices are labelled by
    :func:`workbench.samples.labels.sphere_labels`.
    """
    block_config = ", ".join(str(block) for block in blocks)
    return f"""
[data]
level = "slice"
where = {{ Modality = "CT" }}
label_column = "sphere"

[task]
type = "classification"
metric = "{metric}"
classes = [false, true]

[model]
name = "DenseNet"
args = {{ spatial_dims = 2, in_channels = 1, out_channels = 2, \
init_features = {features}, growth_rate = {features}, \
block_config = [{block_config}], bn_size = 2 }}

[[transforms]]
name = "ScaleIntensityRanged"
args = {{ keys = ["image"], a_min = -1000.0, a_max = 1000.0, b_min = 0.0, \
b_max = 1.0, clip = true }}

[training]
batch_size = 8
learning_rate = 3e-3
validation_fraction = {validation_fraction}
seed = 0
"""


def sphere_classifier_config(**settings: Any) -> FederationConfig:
    """Return a federation of :func:`sphere_classifier` with ``settings`` changed.

    The federation is named ``sphere`` and trains on the sites' dataset ``ct``.
    """
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "federation.toml"
        path.write_text(
            '[federation]\nname = "sphere"\ndataset = "ct"\n'
            'purpose = "federation test"\n' + sphere_classifier(),
            encoding="utf-8",
        )
        config = load_federation_config(path)
    return config.with_overrides(**settings)


def labelled_site(folder: Path, seed: int, purpose: str = "site labels") -> dict:
    """Ingest a small synthetic corpus into ``folder/dataset``; label its CT slices.

    Returns ``{"dataset": ..., "labels": ...}``, a site as ``simulate`` takes it.
    """
    corpus = generate_studies(
        folder / "corpus",
        patients=3,
        studies_per_patient=1,
        ct_slices=6,
        mr_slices=1,
        rows=24,
        columns=24,
        seed=seed,
    )
    dataset = folder / "dataset"
    ingest_folder(corpus.root, dataset)
    labels = folder / "labels.csv"
    sphere_labels(dataset, labels, purpose=purpose)
    return {"dataset": dataset, "labels": labels}

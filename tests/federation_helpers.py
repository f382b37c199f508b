"""What the federation tests share: the sphere classifier's training sections."""

from __future__ import annotations


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

"""What is learnt: the loss, the output check and the validation metric of each task.

- Classification: one class per item from a label column. The loss is the
  cross-entropy of the network's logits ``(batch, classes)``. The metric is the
  accuracy, or the area under the ROC curve: binary, or the mean of the
  one-against-rest curves for more classes.
- Segmentation: one class per voxel from a mask. Dice plus cross-entropy loss on
  logits ``(batch, classes, *spatial)``; metric the mean Dice of the foreground
  classes, over items whose mask or prediction holds that class.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from workbench.errors import ConfigurationError

__all__ = ["ClassificationTask", "SegmentationTask", "make_task"]


class ClassificationTask:
    """Classification of whole items into ``classes``.

    Parameters
    ----------
    classes
        Label values in the order of the network's outputs.
    metric
        ``accuracy`` or ``roc_auc``.
    """

    target_key = "label"

    def __init__(self, classes: Sequence[Any], metric: str) -> None:
        self.classes = list(classes)
        self.metric = metric
        self.loss_function = torch.nn.CrossEntropyLoss()

    def targets(self, batch: Mapping[str, Any], device: torch.device) -> torch.Tensor:
        """Return the class indexes of a batch."""
        return torch.as_tensor(batch["label"], dtype=torch.long, device=device)

    def check_output(self, output: torch.Tensor, target: torch.Tensor) -> None:
        """Raise a ConfigurationError unless the output has one logit per class."""
        if output.ndim != 2 or output.shape[1] != len(self.classes):
            raise ConfigurationError(
                f"the network returns shape {tuple(output.shape)}, but classification"
                f" into {len(self.classes)} classes {self.classes} needs"
                f" (batch, {len(self.classes)}); set its number of outputs"
                f" (out_channels, num_classes or classes) to {len(self.classes)}"
            )

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the mean cross-entropy of a batch."""
        return self.loss_function(output, target)

    def new_metric(self) -> ClassificationMetric:
        """Return an empty accumulator of the validation metric."""
        return ClassificationMetric(len(self.classes), self.metric)


class ClassificationMetric:
    """Accumulates probabilities and targets over batches; computes the metric."""

    def __init__(self, classes: int, name: str) -> None:
        self.classes = classes
        self.name = name
        self.probabilities: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch of logits and class indexes."""
        self.probabilities.append(torch.softmax(output.detach().float(), 1).cpu())
        self.targets.append(target.detach().cpu())

    def result(self) -> float:
        """Return the metric; NaN when it is undefined (one class only for AUC)."""
        if not self.targets:
            return math.nan
        probabilities = torch.cat(self.probabilities)
        targets = torch.cat(self.targets)
        if self.name == "accuracy":
            return float((probabilities.argmax(1) == targets).float().mean())
        if len(torch.unique(targets)) < 2:
            return math.nan
        from monai.metrics import compute_roc_auc

        if self.classes == 2:
            area: Any = compute_roc_auc(probabilities[:, 1], targets)
            return float(area)
        one_hot = torch.nn.functional.one_hot(targets, self.classes)
        with warnings.catch_warnings():
            # Classes absent from the validation set give NaN curves, left out.
            warnings.simplefilter("ignore", UserWarning)
            area = compute_roc_auc(probabilities, one_hot, average="macro")
            return float(area)


class SegmentationTask:
    """Voxel-wise classification against masks of class indexes ``0 .. classes-1``."""

    target_key = "mask"
    metric = "dice"

    def __init__(self, classes: int | None = None) -> None:
        from monai.losses import DiceCELoss

        self.classes = classes
        self.loss_function = DiceCELoss(to_onehot_y=True, softmax=True)

    def targets(self, batch: Mapping[str, Any], device: torch.device) -> torch.Tensor:
        """Return the masks of a batch as ``(batch, 1, *spatial)``."""
        mask = batch["mask"]
        if hasattr(mask, "as_tensor"):
            mask = mask.as_tensor()
        return mask.to(device)

    def check_output(self, output: torch.Tensor, target: torch.Tensor) -> None:
        """Raise a ConfigurationError unless output and masks fit each other."""
        if output.ndim != target.ndim or output.shape[2:] != target.shape[2:]:
            raise ConfigurationError(
                f"the network returns shape {tuple(output.shape)} for masks of shape"
                f" {tuple(target.shape)}; segmentation needs (batch, classes,"
                " *spatial) with the masks' spatial size"
            )
        if output.shape[1] < 2:
            raise ConfigurationError(
                "segmentation needs at least two output channels (background and"
                " one class); set out_channels"
            )
        if int(target.max()) >= output.shape[1]:
            raise ConfigurationError(
                f"a mask contains class {int(target.max())}, but the network has"
                f" {output.shape[1]} output channels; set out_channels to the number"
                " of classes including background"
            )

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the Dice plus cross-entropy loss of a batch."""
        return self.loss_function(output, target)

    def new_metric(self) -> DiceAccumulator:
        """Return an empty accumulator of the mean foreground Dice."""
        return DiceAccumulator()


class DiceAccumulator:
    """Mean foreground Dice over items, leaving out items where both are empty."""

    def __init__(self) -> None:
        self.scores: list[torch.Tensor] = []

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch of logits and masks."""
        classes = output.shape[1]
        prediction = torch.nn.functional.one_hot(output.argmax(1), classes)
        truth = torch.nn.functional.one_hot(target[:, 0].long(), classes)
        spatial = tuple(range(1, prediction.ndim - 1))
        overlap = (prediction * truth).sum(spatial)[:, 1:].float()
        total = (prediction.sum(spatial) + truth.sum(spatial))[:, 1:].float()
        dice = torch.where(total > 0, 2 * overlap / total.clamp(min=1), torch.nan)
        self.scores.append(dice.cpu())

    def result(self) -> float:
        """Return the mean Dice; NaN when no item contains a foreground class."""
        if not self.scores:
            return math.nan
        scores = torch.cat(self.scores)
        valid = scores[~torch.isnan(scores)]
        return float(valid.mean()) if len(valid) else math.nan


def make_task(task: str, metric: str, classes: Sequence[Any] | None) -> Any:
    """Return the task object for a config's ``task.type``."""
    if task == "segmentation":
        return SegmentationTask()
    return ClassificationTask(classes or [], metric)

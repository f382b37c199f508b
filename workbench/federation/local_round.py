"""One site's part of a federated round with a MONAI network, inside an isolated job.

:class:`SiteRounds` trains and evaluates the global model on a site's data. It
reads the dataset through the same loader as ``workbench train`` (items from
Parquet, pixels from Zarr, the config's MONAI transforms), splits it by patient
with the config's seed, starts from the global weights in ``weights_in`` and
writes the updated weights to ``weights_out``. It keeps each dataset's items and
transformed images in memory, so a site's trainer (:mod:`workbench.federation.
trainer`) reads its data once and trains every later round from memory. Every
round appends a ``dataset.read`` event to the audit log, cached or not. Rounds
return only counts, losses and the metric.

:func:`train_round` and :func:`evaluate_round` run one round without a cache, as
a one-off isolated job does.

FedProx adds ``mu / 2 * ||w - w_global||^2`` to each batch's loss; with
``proximal_mu = 0`` a round is plain local training as FedAvg and FedAdam expect.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from workbench.errors import ConfigurationError, DatasetError
from workbench.federation.weights import (
    exchanged_state,
    load_arrays,
    load_into_network,
    pack,
    save_arrays,
    unpack,
)

__all__ = ["SiteRounds", "evaluate_round", "initial_weights", "train_round"]

log = logging.getLogger(__name__)

SEED_MODULUS = 2**32


class SiteRounds:
    """Training and evaluation rounds of one site, with its data kept in memory.

    The cache holds one entry per dataset version, labels table content and
    training settings, so a changed dataset or labels table is read again.
    """

    def __init__(self) -> None:
        self._data: dict[str, _SiteData] = {}

    def train(
        self,
        *,
        training: Mapping[str, Any],
        dataset: str,
        labels: str | None,
        weights_in: str,
        weights_out: str,
        epochs: int,
        seed: int,
        server_round: int,
        purpose: str,
        proximal_mu: float = 0.0,
        run_id: int | None = None,
    ) -> dict[str, Any]:
        """Train the global model for ``epochs`` on this site's training split.

        Returns
        -------
        dict
            ``rows_read``, ``train_examples``, ``validation_examples``,
            ``train_loss``, ``val_loss``, ``val_metric`` (None when undefined) and
            ``seconds``.
        """
        import torch

        started = time.perf_counter()
        site = self._site_data(training, dataset, labels, whole_dataset=False)
        site.record_read(purpose, "federated training", run_id, server_round)
        network = site.network(weights_in)
        global_weights = [p.detach().clone() for p in network.parameters()]
        optimizer = torch.optim.Adam(
            network.parameters(), lr=site.settings.learning_rate
        )

        # Each epoch reseeds from the run's seed, the round and the epoch.
        train_loss = math.nan
        for epoch in range(1, epochs + 1):
            generator = _seed(
                site.train_data, seed * 1_000_003 + server_round * 101 + epoch
            )
            train_loss = _train_epoch(
                network, optimizer, site, generator, global_weights, proximal_mu
            )

        validation_loss, metric = site.evaluate(network)
        save_arrays(weights_out, pack(exchanged_state(network)))
        return {
            "rows_read": site.rows_read,
            "train_examples": len(site.train_data),
            "validation_examples": len(site.validation_data),
            "train_loss": _finite(train_loss),
            "val_loss": _finite(validation_loss),
            "val_metric": _finite(metric),
            "seconds": round(time.perf_counter() - started, 3),
        }

    def evaluate(
        self,
        *,
        training: Mapping[str, Any],
        dataset: str,
        labels: str | None,
        weights_in: str,
        purpose: str,
        whole_dataset: bool = False,
        server_round: int | None = None,
        run_id: int | None = None,
    ) -> dict[str, Any]:
        """Evaluate the global model on this site's validation split (or every item).

        Returns
        -------
        dict
            ``rows_read``, ``examples``, ``val_loss``, ``val_metric`` and
            ``seconds``.
        """
        started = time.perf_counter()
        site = self._site_data(training, dataset, labels, whole_dataset=whole_dataset)
        site.record_read(purpose, "federated evaluation", run_id, server_round)
        validation_loss, metric = site.evaluate(site.network(weights_in))
        return {
            "rows_read": site.rows_read,
            "examples": len(site.validation_data),
            "val_loss": _finite(validation_loss),
            "val_metric": _finite(metric),
            "seconds": round(time.perf_counter() - started, 3),
        }

    def _site_data(
        self,
        training: Mapping[str, Any],
        dataset: str,
        labels: str | None,
        *,
        whole_dataset: bool,
    ) -> _SiteData:
        from workbench.loaders.monai import open_view

        view = open_view(dataset)
        labels_digest = (
            hashlib.sha256(Path(labels).read_bytes()).hexdigest() if labels else None
        )
        key = json.dumps(
            [
                dict(training),
                str(view.root),
                view.version,
                labels_digest,
                whole_dataset,
            ],
            sort_keys=True,
            default=str,
        )
        if key not in self._data:
            self._data[key] = _SiteData.load(training, view, labels, whole_dataset)
            log.info(
                "site data of dataset %s loaded: %d items",
                view.name,
                self._data[key].rows_read,
            )
        return self._data[key]


def train_round(**arguments: Any) -> dict[str, Any]:
    """Run one training round without a cache; see :meth:`SiteRounds.train`."""
    return SiteRounds().train(**arguments)


def evaluate_round(**arguments: Any) -> dict[str, Any]:
    """Run one evaluation round without a cache; see :meth:`SiteRounds.evaluate`."""
    return SiteRounds().evaluate(**arguments)


def initial_weights(training: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """Return the arrays of a freshly initialised network, seeded."""
    import torch

    from workbench.training.config import build_network

    torch.manual_seed(seed % SEED_MODULUS)
    network = build_network(training["model_name"], training.get("model_args", {}))
    return exchanged_state(network)


class _SiteData:
    """A site's items, split, MONAI datasets, task and settings."""

    def __init__(self, **values: Any) -> None:
        self.__dict__.update(values)

    @classmethod
    def load(
        cls,
        training: Mapping[str, Any],
        view: Any,
        labels: str | None,
        whole_dataset: bool,
    ) -> _SiteData:
        from workbench.loaders.items import build_items
        from workbench.loaders.monai import build_transform, wrap_items
        from workbench.training.config import TrainingConfig, build_transforms
        from workbench.training.split import split_by_patient
        from workbench.training.tasks import make_task

        settings = TrainingConfig.from_dict(
            {**training, "labels": labels, "device": "cpu", "num_workers": 0}
        )
        items = build_items(
            view,
            settings.level,
            label_column=settings.label_column,
            labels=settings.labels,
            where=settings.where,
            mask_column=settings.mask_column,
        )
        if settings.task == "classification":
            items = _index_classes(items, settings.classes or [])
        if whole_dataset:
            train_items, validation_items = [], items
        else:
            split = split_by_patient(items, settings.validation_fraction, settings.seed)
            train_items = [items[i] for i in split.train]
            validation_items = [items[i] for i in split.validation]
        segmentation = settings.task == "segmentation"

        def wrap(chosen: list[dict[str, Any]], train: bool) -> Any:
            transform = build_transform(
                view,
                settings.level,
                build_transforms(settings.transforms, train=train),
                mask=segmentation,
            )
            # The deterministic transforms run once; rounds train from memory.
            return wrap_items(view, chosen, transform, settings.level, cache="memory")

        return cls(
            view=view,
            settings=settings,
            rows_read=len(items),
            train_data=wrap(train_items, True),
            validation_data=wrap(validation_items, False),
            task=make_task(settings.task, settings.metric, settings.classes),
        )

    def record_read(
        self, purpose: str, job: str, run_id: int | None, server_round: int | None
    ) -> None:
        """Append this round's ``dataset.read`` event, with counts and the round."""
        from workbench.loaders.monai import record_read

        details: dict[str, Any] = {
            "level": self.settings.level,
            "items": self.rows_read,
            "job": job,
            "train_items": len(self.train_data),
            "validation_items": len(self.validation_data),
        }
        if run_id is not None:
            details["run_id"] = run_id
        if server_round is not None:
            details["round"] = server_round
        record_read(self.view, purpose, details)

    def network(self, weights_in: str) -> Any:
        from workbench.training.config import build_network

        network = build_network(self.settings.model_name, self.settings.model_args)
        try:
            arrays = unpack(load_arrays(weights_in), exchanged_state(network))
            load_into_network(network, arrays)
        except ValueError as exc:
            raise ConfigurationError(
                f"the global weights do not fit {self.settings.model_name}: {exc}"
            ) from exc
        return network

    def evaluate(self, network: Any) -> tuple[float, float]:
        from workbench.training.job import evaluate

        if len(self.validation_data) == 0:
            return math.nan, math.nan
        return evaluate(
            network,
            self.task,
            self.validation_data,
            self.settings.batch_size,
            0,
            "cpu",
        )


def _train_epoch(
    network: Any,
    optimizer: Any,
    site: _SiteData,
    generator: Any,
    global_weights: list[Any],
    proximal_mu: float,
) -> float:
    import torch
    from monai.data import DataLoader

    from workbench.training.job import as_plain_tensor, network_output

    network.train()
    batch_size = site.settings.batch_size
    # A last batch of one item breaks batch normalisation in training mode.
    drop_last = len(site.train_data) > batch_size and (
        len(site.train_data) % batch_size == 1
    )
    loader = DataLoader(
        site.train_data,
        batch_size=batch_size,
        shuffle=True,
        num_workers=0,
        generator=generator,
        drop_last=drop_last,
    )
    total, count = 0.0, 0
    for batch in loader:
        inputs = as_plain_tensor(batch["image"])
        target = site.task.targets(batch, torch.device("cpu"))
        optimizer.zero_grad(set_to_none=True)
        output = network_output(network(inputs))
        site.task.check_output(output, target)
        loss = site.task.loss(output, target)
        if proximal_mu > 0:
            proximal = sum(
                (p - g).pow(2).sum()
                for p, g in zip(network.parameters(), global_weights, strict=True)
            )
            loss = loss + proximal_mu / 2 * proximal
        loss.backward()
        optimizer.step()
        total += loss.detach().item() * len(inputs)
        count += len(inputs)
    if count == 0:
        raise DatasetError(
            "the site's training split holds no item; the site needs more patients"
        )
    return total / count


def _seed(dataset: Any, seed: int) -> Any:
    import torch
    from monai.utils import set_determinism

    seed %= SEED_MODULUS
    set_determinism(seed=seed)
    dataset.transform.set_random_state(seed=seed)
    return torch.Generator().manual_seed(seed)


def _index_classes(
    items: list[dict[str, Any]], classes: list[Any]
) -> list[dict[str, Any]]:
    index = {value: i for i, value in enumerate(classes)}
    unknown = sorted(
        {repr(item["label"]) for item in items if item["label"] not in index}
    )
    if unknown:
        raise ConfigurationError(
            f"labels {unknown[:5]} are not among the federation's classes {classes}"
        )
    return [{**item, "label": index[item["label"]]} for item in items]


def _finite(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)

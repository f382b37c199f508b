"""One site's part of a federated LoRA fine-tuning round of Gemma 3n, run isolated.

Every site loads the same base model (``"tiny"`` or the same local checkpoint)
and wraps it with the same LoRA configuration; only the adapter weights, whose
names all contain ``lora_A`` or ``lora_B``, are exchanged. The base weights stay
at the site. Examples come from :func:`workbench.loaders.gemma.gemma_examples`,
as for :func:`workbench.gemma.run_gemma_finetune`. :class:`GemmaRounds` keeps the
base model and the encoded examples in memory between rounds, for a site's
trainer (:mod:`workbench.federation.trainer`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from workbench.errors import ConfigurationError
from workbench.federation.weights import load_arrays, pack, save_arrays, unpack

__all__ = [
    "ADAPTER_NAME_MARKERS",
    "GemmaRounds",
    "evaluate_round",
    "initial_adapter",
    "train_round",
]

# Every exchanged array's name contains one of these: LoRA's two low-rank factors.
ADAPTER_NAME_MARKERS = ("lora_A", "lora_B")
BASE_SEED = 0
MAX_GRAD_NORM = 1.0


def initial_adapter(gemma: Mapping[str, Any], seed: int) -> dict[str, np.ndarray]:
    """Return the LoRA adapter arrays of a fresh adapter, seeded."""
    model = _adapted_model(gemma, seed)[0]
    return _adapter_arrays(model)


class GemmaRounds:
    """LoRA rounds of one site, with the base model and the examples kept in memory.

    The adapted model is built once per Gemma settings and seed; each round loads
    the global adapter into it, so only the adapter differs between rounds. The
    encoded examples are kept per dataset version.
    """

    def __init__(self) -> None:
        self._models: dict[str, tuple[Any, Any]] = {}
        self._rows: dict[str, list[Any]] = {}

    def train(
        self,
        *,
        gemma: Mapping[str, Any],
        dataset: str,
        weights_in: str,
        weights_out: str,
        purpose: str,
        seed: int,
        server_round: int,
        run_id: int | None = None,
    ) -> dict[str, Any]:
        """Fine-tune the global adapter on this site's examples for ``steps`` steps.

        Returns
        -------
        dict
            ``rows_read``, ``train_examples``, ``train_loss`` (mean over the
            steps), ``val_loss`` (mean token loss after training) and ``seconds``.
        """
        import torch

        from workbench.gemma.inputs import collate_training

        started = time.perf_counter()
        model, loaded = self._model(gemma, seed, load_arrays(weights_in))
        rows = self._examples(gemma, loaded, dataset, purpose, run_id, server_round)
        parameters = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            parameters, lr=float(gemma.get("learning_rate", 2e-4)), weight_decay=0.0
        )
        generator = torch.Generator().manual_seed(seed * 1_000_003 + server_round)
        batch_size = min(int(gemma.get("batch_size", 2)), len(rows))
        losses = []
        model.train()
        base = model.get_base_model()
        for tower in ("vision_tower", "audio_tower"):
            getattr(base.model, tower).eval()
        for _ in range(int(gemma.get("steps", 4))):
            order = torch.randperm(len(rows), generator=generator)[:batch_size].tolist()
            batch, _ = collate_training(loaded, [rows[i] for i in order])
            output = model(**batch)
            if not torch.isfinite(output.loss):
                raise ConfigurationError("the LoRA training loss is not finite")
            output.loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, MAX_GRAD_NORM)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(output.loss.detach()))
        model.eval()
        save_arrays(weights_out, pack(_adapter_arrays(model)))
        return {
            "rows_read": len(rows),
            "train_examples": len(rows),
            "train_loss": float(np.mean(losses)),
            "val_loss": _mean_loss(model, loaded, rows),
            "seconds": round(time.perf_counter() - started, 3),
        }

    def evaluate(
        self,
        *,
        gemma: Mapping[str, Any],
        dataset: str,
        weights_in: str,
        purpose: str,
        seed: int,
        server_round: int | None = None,
        run_id: int | None = None,
    ) -> dict[str, Any]:
        """Return the mean token loss of the global adapter on this site's examples."""
        started = time.perf_counter()
        model, loaded = self._model(gemma, seed, load_arrays(weights_in))
        rows = self._examples(gemma, loaded, dataset, purpose, run_id, server_round)
        model.eval()
        return {
            "rows_read": len(rows),
            "examples": len(rows),
            "val_loss": _mean_loss(model, loaded, rows),
            "seconds": round(time.perf_counter() - started, 3),
        }

    def _model(
        self, gemma: Mapping[str, Any], seed: int, adapter: Mapping[str, np.ndarray]
    ) -> tuple[Any, Any]:
        key = json.dumps([dict(gemma), seed], sort_keys=True, default=str)
        if key not in self._models:
            self._models[key] = _adapted_model(gemma, seed)
        model, loaded = self._models[key]
        _load_adapter(model, adapter)
        return model, loaded

    def _examples(
        self,
        gemma: Mapping[str, Any],
        loaded: Any,
        dataset: str,
        purpose: str,
        run_id: int | None,
        server_round: int | None,
    ) -> list[Any]:
        from workbench.audit import AuditEvent, open_audit_log
        from workbench.dataset.reader import DatasetView

        view = DatasetView.open(dataset)
        key = json.dumps(
            [dict(gemma), str(view.root), view.version], sort_keys=True, default=str
        )
        if key not in self._rows:
            self._rows[key] = _rows(gemma, loaded, dataset, purpose)
        rows = self._rows[key]
        details: dict[str, Any] = {"job": "federated LoRA round", "examples": len(rows)}
        if run_id is not None:
            details["run_id"] = run_id
        if server_round is not None:
            details["round"] = server_round
        with open_audit_log() as audit:
            audit.append(
                AuditEvent(
                    action="dataset.read",
                    resource=f"dataset:{view.name}",
                    purpose=purpose,
                    details={"version": view.version, **details},
                )
            )
        return rows


def train_round(**arguments: Any) -> dict[str, Any]:
    """Run one LoRA round without a cache; see :meth:`GemmaRounds.train`."""
    return GemmaRounds().train(**arguments)


def evaluate_round(**arguments: Any) -> dict[str, Any]:
    """Evaluate the global adapter without a cache; see :meth:`GemmaRounds.evaluate`."""
    return GemmaRounds().evaluate(**arguments)


def _adapted_model(gemma: Mapping[str, Any], seed: int) -> tuple[Any, Any]:
    """Load the base model and wrap it with a new LoRA adapter, seeded."""
    import torch
    from peft import LoraConfig, get_peft_model

    from workbench.gemma import LORA_TARGET_PATTERN, load_gemma
    from workbench.gemma.model import peft_renaming_warning_ignored

    loaded = load_gemma(str(gemma.get("model", "tiny")), device="cpu", seed=BASE_SEED)
    rank = int(gemma.get("lora_rank", 4))
    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=LORA_TARGET_PATTERN,
        bias="none",
    )
    with peft_renaming_warning_ignored():
        model = get_peft_model(loaded.model, config)
    loaded.model = model
    return model, loaded


def _load_adapter(model: Any, adapter: Mapping[str, np.ndarray]) -> None:
    """Load the global adapter's arrays into the LoRA layers of ``model``."""
    import torch
    from peft import set_peft_model_state_dict

    layout = _adapter_arrays(model)
    try:
        adapter = unpack(adapter, layout)
    except ValueError as exc:
        raise ConfigurationError(
            f"the global adapter does not fit this model's LoRA adapter ({exc});"
            " the sites and the coordinator use different LoRA settings"
        ) from exc
    if set(adapter) != set(layout):
        raise ConfigurationError(
            f"the global adapter has {len(adapter)} arrays, this model's LoRA"
            f" adapter {len(layout)}; the sites and the coordinator use"
            " different LoRA settings"
        )
    state = {name: torch.as_tensor(value) for name, value in adapter.items()}
    set_peft_model_state_dict(model, state)


def _adapter_arrays(model: Any) -> dict[str, np.ndarray]:
    from peft import get_peft_model_state_dict

    arrays = {
        name: tensor.detach().cpu().float().numpy().copy()
        for name, tensor in get_peft_model_state_dict(model).items()
    }
    outside = [n for n in arrays if not any(m in n for m in ADAPTER_NAME_MARKERS)]
    if outside:
        raise ConfigurationError(
            f"the adapter state holds {len(outside)} arrays that are not LoRA factors"
            f" (such as {outside[:2]}); only adapters may leave a site"
        )
    return arrays


def _rows(
    gemma: Mapping[str, Any], loaded: Any, dataset: str, purpose: str
) -> list[Any]:
    from workbench.gemma.inputs import encode_training
    from workbench.loaders.gemma import gemma_examples

    examples = gemma_examples(
        dataset,
        purpose=purpose,
        prompt_template=str(gemma["prompt_template"]),
        target_column=gemma.get("target_column"),
        slices=int(gemma.get("slices", 1)),
        image_size=gemma.get("image_size"),
        where=gemma.get("where"),
    )
    rows = [
        encode_training(loaded, example.prompt, example.images, example.target)
        for example in examples
        if example.target is not None
    ]
    if not rows:
        raise ConfigurationError("no example of this site has a target text")
    return rows


def _mean_loss(model: Any, loaded: Any, rows: list[Any]) -> float:
    import torch

    from workbench.gemma.inputs import collate_training

    losses = []
    with torch.no_grad():
        for row in rows:
            batch, _ = collate_training(loaded, [row])
            losses.append(float(model(**batch).loss))
    return float(np.mean(losses))

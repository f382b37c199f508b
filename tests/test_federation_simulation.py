"""Simulation from a notebook-style call, and federated Gemma 3n LoRA fine-tuning.

Each simulation runs a real SuperLink (TLS, registered site keys) and one
SuperNode and trainer per site on 127.0.0.1, offline, with each site's own audit
log.
"""

from __future__ import annotations

import numpy as np
import pytest
from federation_helpers import labelled_site, sphere_classifier

from workbench import federation
from workbench.audit import open_audit_log
from workbench.federation.gemma_round import ADAPTER_NAME_MARKERS
from workbench.federation.plan import FederationConfig
from workbench.federation.server import FederationRunError, check_message_size
from workbench.federation.weights import load_arrays

MONAI_CONFIG = """
[federation]
name = "sim"
dataset = "ct"
purpose = "federation simulation test"
rounds = 2
min_sites = 3
local_epochs = 1
seed = 3
round_timeout_s = 300
site_wait_s = 120
evaluate = false
strategy = "fedadam"

[strategy]
eta = 0.01

[privacy]
mode = "local-dp"
clipping_norm = 5.0
epsilon = 20.0
delta = 1e-5

""" + sphere_classifier()
SEED = 5


@pytest.fixture(scope="module")
def site_datasets(tmp_path_factory):
    """Three small datasets with sphere labels, and the simulation config."""
    root = tmp_path_factory.mktemp("simulation-data")
    sites = {
        name: labelled_site(root / name, 20 + index, "simulation labels")
        for index, name in enumerate(("a", "b", "c"))
    }
    config = root / "sim.toml"
    config.write_text(MONAI_CONFIG)
    return config, sites


@pytest.fixture(scope="module")
def three_sites(site_datasets, tmp_path_factory):
    """FedAdam with local differential privacy over three sites, two rounds."""
    config, sites = site_datasets
    out = tmp_path_factory.mktemp("three-sites")
    return federation.simulate(sites=sites, rounds=2, config=config, seed=SEED, out=out)


@pytest.mark.slow
def test_simulation_of_three_sites(three_sites):
    result = three_sites
    assert result.outcome.succeeded, result.outcome.details
    metrics = result.metrics
    train = metrics[metrics.phase == "train"]
    assert sorted(set(train.site)) == ["a", "all", "b", "c"]
    assert sorted(set(train["round"])) == [1, 2]
    assert set(metrics.phase) == {"train"}
    for name in ("a", "b", "c"):
        with open_audit_log(result.audit_log(name)) as audit:
            audit.verify()
            rounds = [
                r.details["round"] for r in audit.records(action="federation.train")
            ]
            reads = [
                r.details["round"]
                for r in audit.records(action="dataset.read")
                if r.details.get("run_id") == result.outcome.run_id
            ]
        assert rounds == [1, 2]
        assert reads == [1, 2]


@pytest.mark.slow
def test_local_dp_budget_reported_per_round(three_sites):
    metrics = three_sites.metrics
    per_site = metrics[(metrics.phase == "train") & (metrics.site != "all")]
    assert len(per_site) == 6
    assert (per_site.dp_epsilon_round == 20.0).all()
    assert (
        list(per_site.sort_values("round").dp_epsilon_total) == [20.0] * 3 + [40.0] * 3
    )


@pytest.mark.slow
def test_simulation_is_reproducible_with_a_seed(three_sites, site_datasets, tmp_path):
    config, sites = site_datasets

    second = federation.simulate(
        sites=sites, rounds=2, config=config, seed=SEED, out=tmp_path
    )

    assert second.outcome.succeeded, second.outcome.details
    columns = [
        "round",
        "phase",
        "site",
        "num_examples",
        "train_loss",
        "val_loss",
        "val_metric",
        "dp_epsilon_total",
    ]
    order = ["round", "phase", "site"]
    one = three_sites.metrics[columns].sort_values(order).reset_index(drop=True)
    two = second.metrics[columns].sort_values(order).reset_index(drop=True)
    assert one.equals(two)
    first_weights = load_arrays(three_sites.output / "global-final.npz")
    second_weights = load_arrays(second.output / "global-final.npz")
    assert list(first_weights) == list(second_weights)
    for name, values in first_weights.items():
        np.testing.assert_array_equal(values, second_weights[name], err_msg=name)


@pytest.mark.slow
def test_gemma_lora_exchanges_only_adapters(site_datasets, tmp_path):
    from flwr.proto.recorddict_pb2 import RecordDict as RecordDictProto

    _, sites = site_datasets
    config = FederationConfig(
        name="gemma",
        dataset="ct",
        purpose="federated Gemma 3n LoRA test",
        kind="gemma-lora",
        rounds=2,
        min_sites=2,
        seed=0,
        round_timeout_s=300,
        site_wait_s=120,
        evaluate=False,
        gemma={
            "model": "tiny",
            "prompt_template": "Which modality is this?",
            "target_column": "Modality",
            "steps": 2,
            "lora_rank": 2,
            "learning_rate": 0.01,
        },
    )
    chosen = {"a": sites["a"]["dataset"], "b": sites["b"]["dataset"]}

    result = federation.simulate(
        sites=chosen, rounds=2, config=config, out=tmp_path, keep_replies=True
    )

    assert result.outcome.succeeded, result.outcome.details
    # Only the LoRA factors leave a site: the checkpoints hold them by name, and
    # every reply carries exactly that many values, packed into one vector.
    adapter = load_arrays(result.output / "global-final.npz")
    assert adapter
    assert all(any(m in n for m in ADAPTER_NAME_MARKERS) for n in adapter)
    assert not any("embed" in n or "vision" in n or "audio" in n for n in adapter)
    adapter_values = sum(value.size for value in adapter.values())
    assert adapter_values < 100_000
    contents = sorted((result.output / "replies").glob("*-train-*.content"))
    assert len(contents) == 4
    for path in contents:
        content = RecordDictProto.FromString(path.read_bytes())
        arrays = [i for i in content.items if i.WhichOneof("value") == "array_record"]
        [entry] = arrays[0].array_record.items
        assert entry.key == "weights"
        assert list(entry.value.shape) == [adapter_values]
    metrics = result.metrics
    per_round = metrics[(metrics.phase == "train") & (metrics.site == "all")]
    assert list(per_round["round"]) == [1, 2]
    assert (per_round.bytes_sent > 0).all()
    assert (per_round.bytes_received == per_round.bytes_sent).all()
    # The adapter is a small fraction of the 3.8 M-parameter base model.
    assert per_round.bytes_sent.iloc[0] < 2 * 4 * 100_000
    assert per_round.bytes_sent.iloc[0] >= 2 * 4 * adapter_values
    state = result.outcome.state
    assert state["bytes_sent_total"] == per_round.bytes_sent.sum()
    assert state["bytes_received_total"] == per_round.bytes_received.sum()
    # The message size was checked against the transport's limit before round 1.
    assert state["message_bytes"] * 2 == per_round.bytes_sent.iloc[0]
    assert state["message_bytes"] < state["message_limit"]


def test_message_size_checked_against_limit():
    arrays = {"lora_A": np.zeros((4, 64), np.float32)}

    size = check_message_size(arrays)

    # The array's data, plus the header of its NumPy serialization.
    assert 4 * 64 * 4 < size < 4 * 64 * 4 + 256
    with pytest.raises(FederationRunError, match="above the transport's limit") as err:
        check_message_size(arrays, limit=size - 1)
    assert err.value.reason == "message-too-large"

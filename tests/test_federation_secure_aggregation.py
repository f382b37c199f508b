"""Secure aggregation (Flower's SecAgg+) of the sites' updates.

The run test simulates three sites on a real SuperLink and SuperNodes on
127.0.0.1; the mod tests call the site's mod with Flower messages built in the
test, as a SuperNode would hand them over.
"""

from __future__ import annotations

import glob
import time

import numpy as np
import pytest
from federation_helpers import labelled_site, sphere_classifier_config
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE

from workbench import federation
from workbench.audit import open_audit_log
from workbench.errors import ConfigurationError
from workbench.federation.plan import RunPlan, model_hash
from workbench.federation.secure_aggregation import (
    SecureAggregationOptions,
    secure_aggregation_mod,
)
from workbench.federation.site import RunRefusedError, SiteConfig, admit
from workbench.federation.weights import load_arrays, pack

SITES = ("a", "b", "c")
MAX_WEIGHT = 100.0


def secure_config(**changes):
    """A three-site FedAvg federation with SecAgg+ and no local DP."""
    privacy = {
        "mode": "none",
        "secure_aggregation": True,
        "secagg_max_weight": MAX_WEIGHT,
        **changes.pop("privacy", {}),
    }
    settings = {
        "name": "secure",
        "purpose": "secure aggregation test",
        "rounds": 2,
        "min_sites": 3,
        "seed": 4,
        "evaluate": False,
        **changes,
    }
    return sphere_classifier_config(privacy=privacy, **settings)


# Settings


def test_secure_aggregation_needs_two_sites():
    with pytest.raises(ConfigurationError, match="min_sites of at least 2"):
        secure_config(min_sites=1)


@pytest.mark.parametrize(
    ("privacy", "message"),
    [
        ({"secagg_reconstruction_threshold": 1.5}, "must be in \\(0, 1\\]"),
        ({"secagg_clipping_range": 0.0}, "must be positive"),
        ({"secagg_quantization_range": 2**30}, "secagg_quantization_range"),
        ({"secagg_max_wieght": 10}, "unknown keys \\['secagg_max_wieght'\\]"),
        ({"secure_aggregation": "false"}, "must be true or false, not 'false'"),
        ({"secagg_max_weight": "100"}, "secagg_max_weight must be a number"),
        ({"secagg_quantization_range": 2.5}, "must be an integer, not 2.5"),
    ],
)
def test_invalid_options_refused(privacy, message):
    with pytest.raises(ConfigurationError, match=message):
        secure_config(privacy=privacy)


def test_options_without_secure_aggregation_warned(caplog):
    config = secure_config(
        privacy={"secure_aggregation": False, "secagg_max_weight": 10.0}
    )

    assert config.privacy["secure_aggregation"] is False
    assert "secure_aggregation is not true" in caplog.text


def test_options_read_from_privacy_table():
    options = SecureAggregationOptions.from_privacy(
        secure_config(privacy={"secagg_clipping_range": 2.0}).privacy
    )

    assert options.clipping_range == 2.0
    assert options.max_weight == MAX_WEIGHT
    assert options.reconstruction_threshold == 0.67


# The site's mod, called as a SuperNode calls it


def _train_message(content, run_id=7):
    from flwr.app import Message, Metadata
    from flwr.app.message_type import MessageType

    metadata = Metadata(
        run_id=run_id,
        message_id="m1",
        src_node_id=1,
        dst_node_id=42,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=600.0,
        message_type=MessageType.TRAIN,
    )
    return Message(content=content, metadata=metadata)


def _site_context(tmp_path, config, accepted):
    from flwr.app import Context, RecordDict

    site = SiteConfig(
        site="a",
        federation=config.name,
        datasets={config.dataset: str(tmp_path / "dataset")},
        work=str(tmp_path / "work"),
        accepted_model_hashes=[accepted],
    )
    site.save(tmp_path / "site.json")
    plan = RunPlan(config=config, model_hash=model_hash(config), output=str(tmp_path))
    return Context(
        run_id=7,
        node_id=42,
        node_config={"site-config": str(tmp_path / "site.json")},
        state=RecordDict(),
        run_config={"plan": plan.to_json()},
    )


def _setup_content():
    from flwr.app import ConfigRecord, RecordDict
    from flwr.common.secure_aggregation.secaggplus_constants import (
        RECORD_KEY_CONFIGS,
        Key,
        Stage,
    )

    return RecordDict(
        {
            RECORD_KEY_CONFIGS: ConfigRecord(
                {
                    Key.STAGE: Stage.SETUP,
                    Key.SAMPLE_NUMBER: 3,
                    Key.SHARE_NUMBER: 3,
                    Key.THRESHOLD: 2,
                    Key.CLIPPING_RANGE: 8.0,
                    Key.TARGET_RANGE: 2**22,
                    Key.MOD_RANGE: 2**32,
                    Key.MAX_WEIGHT: MAX_WEIGHT,
                }
            )
        }
    )


def _never_called(message, context):
    raise AssertionError("the site's handler must not run")


def test_mod_rejects_other_model_at_setup(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_AUDIT_URL", f"sqlite:///{tmp_path / 'audit.sqlite'}")
    config = secure_config()
    context = _site_context(tmp_path, config, accepted="sha256:" + "0" * 64)

    reply = secure_aggregation_mod(
        _train_message(_setup_content()), context, _never_called
    )

    assert reply.has_error()
    assert reply.error.code == 100
    assert reply.error.reason == "refused by site: model-hash"
    assert RECORD_KEY_STATE not in context.state.config_records
    with open_audit_log(f"sqlite:///{tmp_path / 'audit.sqlite'}") as audit:
        audit.verify()
        [refusal] = list(audit.records(action="federation.refuse"))
    assert refusal.outcome == "denied"
    assert refusal.details["run_id"] == 7


def test_mod_answers_setup_with_public_keys_only(tmp_path, monkeypatch):
    from flwr.common.secure_aggregation.secaggplus_constants import (
        RECORD_KEY_CONFIGS,
        Key,
    )

    monkeypatch.setenv("WORKBENCH_AUDIT_URL", f"sqlite:///{tmp_path / 'audit.sqlite'}")
    config = secure_config()
    context = _site_context(tmp_path, config, accepted=model_hash(config))

    reply = secure_aggregation_mod(
        _train_message(_setup_content()), context, _never_called
    )

    assert not reply.has_error()
    assert list(reply.content.config_records) == [RECORD_KEY_CONFIGS]
    assert not reply.content.array_records
    assert not reply.content.metric_records
    keys = reply.content.config_records[RECORD_KEY_CONFIGS]
    assert set(keys) == {Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2}
    assert keys[Key.PUBLIC_KEY_1] != keys[Key.PUBLIC_KEY_2]
    # The protocol's state (the private keys) stays in the site's context.
    assert RECORD_KEY_STATE in context.state.config_records


def test_mod_passes_runs_without_secure_aggregation(tmp_path):
    config = secure_config(privacy={"secure_aggregation": False}, min_sites=1)
    context = _site_context(tmp_path, config, accepted=model_hash(config))
    message = _train_message(_setup_content())
    seen = []

    def handler(received, _context):
        seen.append(received)
        return received

    assert secure_aggregation_mod(message, context, handler) is message
    assert seen == [message]


def test_site_requiring_it_rejects_plain_runs(tmp_path):
    plain = secure_config(privacy={"secure_aggregation": False})
    secure = secure_config()
    site = SiteConfig(
        site="a",
        federation=secure.name,
        datasets={secure.dataset: str(tmp_path / "dataset")},
        work=str(tmp_path / "work"),
        accepted_model_hashes=[model_hash(plain), model_hash(secure)],
        require_secure_aggregation=True,
    )
    url = f"sqlite:///{tmp_path / 'audit.sqlite'}"

    with open_audit_log(url) as audit:
        with pytest.raises(RunRefusedError, match="requires secure aggregation") as err:
            admit(site, RunPlan(plain, model_hash(plain), str(tmp_path)), 9, audit)
        admit(site, RunPlan(secure, model_hash(secure), str(tmp_path)), 10, audit)
        refusals = list(audit.records(action="federation.refuse"))

    assert err.value.reason == "secure-aggregation"
    assert [r.details["run_id"] for r in refusals] == [9]
    assert refusals[0].details["reason"] == "secure-aggregation"


# A run of three sites


@pytest.fixture(scope="module")
def secure_run(tmp_path_factory):
    """Three sites with their own datasets, FedAvg under SecAgg+, two rounds."""
    root = tmp_path_factory.mktemp("secure-aggregation")
    sites = {
        name: labelled_site(root / name, 40 + index, "secure aggregation labels")
        for index, name in enumerate(SITES)
    }
    return federation.simulate(
        sites=sites,
        rounds=2,
        config=secure_config(),
        out=root / "run",
        keep_replies=True,
    )


def _site_rounds(result, site, server_round):
    """The global weights a site received and the weights it trained, packed."""
    [folder] = glob.glob(
        str(result.sites[site] / "work" / "run-*" / f"round-{server_round:03d}-train")
    )
    received = load_arrays(f"{folder}/global.npz")["weights"]
    trained = load_arrays(f"{folder}/update.npz")["weights"]
    return received, trained


@pytest.mark.slow
def test_global_model_weighted_mean(secure_run):
    result = secure_run
    assert result.outcome.succeeded, result.outcome.details
    metrics = result.metrics
    per_site = metrics[(metrics.phase == "train") & (metrics.site != "all")]
    options = SecureAggregationOptions.from_privacy(secure_config().privacy)
    for server_round in (1, 2):
        rows = per_site[per_site["round"] == server_round].set_index("site")
        assert sorted(rows.index) == list(SITES)
        weights = {s: float(rows.loc[s, "num_examples"]) for s in SITES}
        expected = None
        for site in SITES:
            received, trained = _site_rounds(result, site, server_round)
            change = weights[site] * (trained - received) / sum(weights.values())
            expected = received + change if expected is None else expected + change
        checkpoint = load_arrays(
            result.output / "checkpoints" / f"round-{server_round:03d}.npz"
        )
        aggregate = pack(checkpoint)["weights"]
        # One quantization step of the smallest site's weighted update.
        step = (
            2
            * options.clipping_range
            / options.quantization_range
            * options.max_weight
            / min(weights.values())
        )
        assert np.abs(aggregate - expected).max() < step
        # The round moved the model by far more than that.
        assert np.abs(aggregate - received).max() > 100 * step


@pytest.mark.slow
def test_coordinator_receives_only_masked_updates(secure_run):
    from flwr.common import bytes_to_ndarray
    from flwr.common.secure_aggregation.secaggplus_constants import (
        RECORD_KEY_CONFIGS,
        Key,
    )
    from flwr.proto.recorddict_pb2 import RecordDict as RecordDictProto

    result = secure_run
    replies = result.output / "replies"
    stages = ("setup", "share_keys", "collect_masked_vectors", "unmask")
    for stage in stages:
        assert len(list(replies.glob(f"round-*-train-{stage}-node-*.content"))) == 6
    nodes = result.metrics.dropna(subset=["node_id"])
    site_of = {int(n): s for n, s in zip(nodes.node_id, nodes.site, strict=True)}
    for path in sorted(replies.glob("*.content")):
        content = RecordDictProto.FromString(path.read_bytes())
        for item in content.items:
            if item.WhichOneof("value") == "array_record":
                assert len(item.array_record.items) == 0, path.name
        if "collect_masked_vectors" not in path.name:
            continue
        server_round = int(path.name.split("-")[1])
        site = site_of[int(path.name.rsplit("-", 1)[1].split(".")[0])]
        [record] = [i for i in content.items if i.key == RECORD_KEY_CONFIGS]
        [masked] = [
            e for e in record.config_record.items if e.key == Key.MASKED_PARAMETERS
        ]
        weight, vector = (bytes_to_ndarray(v) for v in masked.value.bytes_list.vals)
        received, trained = _site_rounds(result, site, server_round)
        update = trained - received
        # The masked weight and update, with values spread over the modulus and
        # uncorrelated with the update.
        assert weight.size == 1
        assert vector.size == update.size
        assert vector.min() >= 0
        assert vector.max() < 2**32
        assert np.ptp(vector) > 2**31
        correlation = np.corrcoef(vector.astype(float), update)[0, 1]
        assert abs(correlation) < 0.2, (path.name, correlation)


@pytest.mark.slow
def test_each_round_audited_at_sites_and_coordinator(secure_run):
    result = secure_run
    for site in SITES:
        with open_audit_log(result.audit_log(site)) as audit:
            audit.verify()
            records = list(audit.records(action="federation.train"))
        assert [r.details["round"] for r in records] == [1, 2]
        assert all(r.details["secure_aggregation"] for r in records)
    metrics = result.metrics
    totals = metrics[(metrics.phase == "train") & (metrics.site == "all")]
    assert (totals.bytes_sent > 0).all()
    assert (totals.bytes_received > 0).all()

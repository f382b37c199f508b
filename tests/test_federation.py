"""Federated learning with real Flower processes on 127.0.0.1, TLS and site keys.

Sites A and B each ingest their own synthetic patients from their own Orthanc,
with their own workbench home (key and audit log). Site C's dataset comes from a
folder. One SuperLink (TLS, SuperNode authentication, SQLite state) and the
SuperNodes live for the whole module; each test submits its own run.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from federation_helpers import sphere_classifier
from ingest_helpers import ingest_folder, orthanc_credentials

from workbench.audit import open_audit_log
from workbench.dataset.reader import DatasetView
from workbench.errors import ConfigurationError
from workbench.federation.certs import SiteKeys, issue_certificates
from workbench.federation.deployment import Coordinator, SiteNode
from workbench.federation.plan import load_federation_config, model_hash
from workbench.federation.preflight import preflight
from workbench.federation.site import SiteConfig
from workbench.federation.weights import load_arrays
from workbench.home import init_home
from workbench.ingest import IngestConfig, run_ingest
from workbench.orthanc.server import start_orthanc, stop_orthanc
from workbench.orthanc.upload import upload_paths
from workbench.samples import generate_studies
from workbench.samples.labels import sphere_labels

pytestmark = pytest.mark.slow

CONFIG = """
[federation]
name = "chest-ct"
dataset = "chest-ct"
purpose = "federation acceptance test"
rounds = 3
min_sites = 2
local_epochs = 2
seed = 0
round_timeout_s = 300
site_wait_s = 120

""" + sphere_classifier(
    metric="roc_auc", features=8, blocks=(2, 2), validation_fraction=0.25
)
SITES = ("site-a", "site-b", "site-c")
RUN_TIMEOUT_S = 900


@contextlib.contextmanager
def workbench_home(home: Path):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WORKBENCH_HOME", str(home))
        yield home


def make_site(root: Path, name: str, seed: int, with_orthanc: bool) -> SimpleNamespace:
    """Give a site its home, its dataset (through its own Orthanc) and labels."""
    folder = root / name
    home = init_home(folder / "home")
    corpus = generate_studies(
        folder / "corpus",
        patients=4,
        studies_per_patient=1,
        ct_slices=8,
        mr_slices=1,
        rows=32,
        columns=32,
        seed=seed,
    )
    dataset = folder / "dataset"
    with workbench_home(home):
        if with_orthanc:
            orthanc_home = folder / "orthanc"
            server = start_orthanc(orthanc_home, port=_free_port())
            try:
                with server.client() as client:
                    assert upload_paths(client, [corpus.root], progress=False).ok
                with orthanc_credentials(server):
                    run_ingest(
                        IngestConfig(
                            out=dataset,
                            orthanc=server.url,
                            purpose="federation site data",
                            progress=False,
                        )
                    )
            finally:
                stop_orthanc(orthanc_home)
        else:
            ingest_folder(corpus.root, dataset)
        sphere_labels(dataset, folder / "labels.csv", purpose="site labels")
    return SimpleNamespace(
        name=name,
        folder=folder,
        home=home,
        dataset=dataset,
        labels=folder / "labels.csv",
    )


def _free_port() -> int:
    from workbench.federation.processes import free_port

    return free_port()


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """Certificates, three sites, a TLS SuperLink and SuperNodes for A and B."""
    started = time.monotonic()
    root = tmp_path_factory.mktemp("federation")
    config_path = root / "federation.toml"
    config_path.write_text(CONFIG)
    config = load_federation_config(config_path)
    certs = root / "certs"
    issue_certificates(certs, list(SITES), federation="chest-ct")
    sites = {
        "site-a": make_site(root, "site-a", 11, with_orthanc=True),
        "site-b": make_site(root, "site-b", 12, with_orthanc=True),
        "site-c": make_site(root, "site-c", 13, with_orthanc=False),
    }
    coordinator_home = init_home(root / "coordinator-home")
    coordinator = Coordinator(
        root / "coordinator",
        certs=certs,
        environment={"WORKBENCH_HOME": str(coordinator_home)},
    )
    nodes: dict[str, SiteNode] = {}
    try:
        coordinator.start()
        node_ids = coordinator.register_sites()
        for name, site in sites.items():
            SiteConfig(
                site=name,
                federation="chest-ct",
                datasets={"chest-ct": str(site.dataset)},
                labels={"chest-ct": str(site.labels)},
                accepted_model_hashes=[model_hash(config)],
                work=str(site.folder / "work"),
            ).save(site.folder / "site.json")
            nodes[name] = SiteNode(
                name,
                coordinator.address,
                site.folder / "site.json",
                site.folder / "node",
                keys=SiteKeys(name, certs / name),
                environment={"WORKBENCH_HOME": str(site.home)},
            )
        # Site C's trainer starts now too, so that it is warm when site C joins.
        for node in nodes.values():
            node.start_trainer()
        for name in ("site-a", "site-b"):
            nodes[name].start()
        yield SimpleNamespace(
            root=root,
            config=config,
            certs=certs,
            sites=sites,
            coordinator=coordinator,
            coordinator_home=coordinator_home,
            nodes=nodes,
            node_ids=node_ids,
            setup_seconds=time.monotonic() - started,
        )
    finally:
        for node in nodes.values():
            node.stop()
        coordinator.stop()


def site_records(site, action=None):
    with open_audit_log(site.home / "audit.sqlite") as audit:
        return audit.records(action=action)


def run_to_end(federation, config, name, **options):
    output = federation.root / "runs" / name
    run_id = federation.coordinator.submit(config, output, **options)
    outcome = federation.coordinator.wait(run_id, output, RUN_TIMEOUT_S)
    return run_id, output, outcome


@pytest.fixture(scope="module")
def tls_run(federation):
    """Three rounds of FedAvg over sites A and B, every reply archived.

    The coordinator evaluates the global model on site C's dataset, which stands
    for a validation dataset of its own.
    """
    started = time.monotonic()
    site_c = federation.sites["site-c"]
    run_id, output, outcome = run_to_end(
        federation,
        federation.config,
        "tls",
        sites=["site-a", "site-b"],
        keep_replies=True,
        validation_dataset=str(site_c.dataset),
        validation_labels=str(site_c.labels),
    )
    return SimpleNamespace(
        run_id=run_id,
        output=output,
        outcome=outcome,
        seconds=time.monotonic() - started,
    )


# The three-round run over TLS


def test_tls_run_completes(tls_run):
    assert tls_run.outcome.succeeded, tls_run.outcome.details
    assert tls_run.outcome.state["last_round"] == 3
    assert tls_run.outcome.state["status"] == "finished"


def test_global_metric_improves_over_round_one(tls_run):
    import pandas as pd

    metrics = pd.read_parquet(tls_run.output / "metrics.parquet")
    overall = metrics[(metrics.phase == "evaluate") & (metrics.site == "all")]
    by_round = overall.set_index("round")
    assert list(by_round.index) == [1, 2, 3]
    # ROC AUC on the phantom's slices can reach 1.0 in round 1 already, so it
    # must not fall and must end high.
    assert by_round.loc[3, "val_metric"] >= by_round.loc[1, "val_metric"]
    assert by_round.loc[3, "val_metric"] >= 0.9
    # The loss must fall on the coordinator's held-out dataset (32 slices); the
    # sites' validation splits hold 8 slices each, too few for a stable loss.
    server = metrics[metrics.phase == "server"].set_index("round")
    assert server.loc[3, "val_loss"] < server.loc[1, "val_loss"]
    assert server.loc[1, "val_loss"] < server.loc[0, "val_loss"]


def test_reports_and_checkpoints_written(tls_run):
    import pandas as pd

    for round_number in (1, 2, 3):
        assert (
            tls_run.output / "checkpoints" / f"round-{round_number:03d}.npz"
        ).is_file()
    assert (tls_run.output / "metrics.png").stat().st_size > 1000
    table = pd.read_csv(tls_run.output / "metrics.csv", dtype={"node_id": str})
    per_site = table[(table.phase == "train") & (table.site != "all")]
    assert sorted(set(per_site.site)) == ["site-a", "site-b"]
    assert (per_site.num_examples > 0).all()
    assert (per_site.bytes_received > 0).all()


def test_site_audit_logs_verify_and_hold_each_round(federation, tls_run):
    for name in ("site-a", "site-b"):
        site = federation.sites[name]
        with open_audit_log(site.home / "audit.sqlite") as audit:
            report = audit.verify()
            records = audit.records(action="federation.train")
            reads = audit.records(action="dataset.read")
            jobs = audit.records(action="job.start")
        assert report.record_count > 0
        mine = [r for r in records if r.details["run_id"] == tls_run.run_id]
        assert [r.details["round"] for r in mine] == [1, 2, 3]
        for record in mine:
            assert record.outcome == "ok"
            assert record.details["rows_read"] == 32
            assert record.details["dataset"] == str(site.dataset)
            assert record.details["model_hash"] == model_hash(federation.config)
        # The trainer records its own read of the dataset in every round.
        round_reads = [
            (r.details["job"], r.details["round"])
            for r in reads
            if r.details.get("run_id") == tls_run.run_id
        ]
        assert sorted(round_reads) == sorted(
            [("federated training", n) for n in (1, 2, 3)]
            + [("federated evaluation", n) for n in (1, 2, 3)]
        )
        assert {
            r.resource for r in reads if r.details.get("run_id") == tls_run.run_id
        } == {"dataset:dataset"}
        # One isolated trainer served every round: no one-off job per round.
        trainers = [j for j in jobs if j.details["job"] == "federated-trainer"]
        assert len(trainers) == 1
        assert trainers[0].details["policy"] == "namespaces"
        assert trainers[0].details["outputs"] == [str(site.folder / "work")]
        assert [d["path"] for d in trainers[0].details["datasets"]] == [
            str(site.dataset)
        ]
        assert [j for j in jobs if j.details["job"].startswith("federated-t")] == (
            trainers
        )


def test_server_side_evaluation_each_round(federation, tls_run):
    import pandas as pd

    metrics = pd.read_parquet(tls_run.output / "metrics.parquet")
    server = metrics[metrics.phase == "server"].set_index("round")
    assert list(server.index) == [0, 1, 2, 3]
    assert set(server.site) == {"coordinator"}
    assert (server.num_examples == 32).all()
    assert server.val_loss.notna().all()
    with open_audit_log(federation.coordinator_home / "audit.sqlite") as audit:
        jobs = [
            r
            for r in audit.records(action="job.start")
            if r.details["job"] == "federated-server-evaluation"
        ]
        reads = [
            r.details["round"]
            for r in audit.records(action="dataset.read")
            if r.details.get("run_id") == tls_run.run_id
        ]
    assert len([j for j in jobs if str(tls_run.output) in j.details["outputs"][0]]) == 1
    assert sorted(reads) == [0, 1, 2, 3]


def test_coordinator_log_records_runs_rounds_sites(federation, tls_run):
    with open_audit_log(federation.coordinator_home / "audit.sqlite") as audit:
        audit.verify()
        rounds = [
            r
            for r in audit.records(action="federation.round")
            if r.details["run_id"] == tls_run.run_id and r.details["phase"] == "train"
        ]
        starts = audit.records(action="federation.run.start")
        ends = audit.records(action="federation.run.end")
        registrations = audit.records(action="federation.site.register")
    assert [r.details["round"] for r in rounds] == [1, 2, 3]
    assert all(r.details["sites"] == ["site-a", "site-b"] for r in rounds)
    assert all("val-loss" in r.details["aggregate"] for r in rounds)
    assert any(r.details["run_id"] == tls_run.run_id for r in starts)
    assert any(
        r.details["run_id"] == tls_run.run_id and r.outcome == "ok" for r in ends
    )
    assert sorted(r.resource for r in registrations) == [f"site:{s}" for s in SITES]


def test_no_data_leaves_a_site(federation, tls_run):
    """Every reply holds only weights and numeric metrics, and no identifier."""
    from flwr.proto.message_pb2 import Message as MessageProto
    from flwr.proto.recorddict_pb2 import RecordDict as RecordDictProto

    replies = sorted((tls_run.output / "replies").glob("*.message"))
    assert len(replies) == 2 * 2 * 3  # two sites, train and evaluate, three rounds
    identifiers = set()
    for site in federation.sites.values():
        table = DatasetView.open(site.dataset).instances(
            columns=[
                "PatientID",
                "StudyInstanceUID",
                "SeriesInstanceUID",
                "SOPInstanceUID",
            ]
        )
        for column in table.column_names:
            identifiers.update(str(v) for v in table.column(column).to_pylist() if v)
        identifiers.update({str(site.dataset), site.dataset.name, str(site.labels)})
    assert len(identifiers) > 100
    final = load_arrays(tls_run.output / "global-final.npz")
    parameters = sum(value.size for value in final.values())
    for path in replies:
        raw = path.read_bytes()
        for identifier in identifiers:
            assert identifier.encode() not in raw, (path.name, identifier)
        message = MessageProto.FromString(raw)
        assert not message.HasField("error")
        content = RecordDictProto.FromString(path.with_suffix(".content").read_bytes())
        kinds = {item.WhichOneof("value") for item in content.items}
        names = {item.key for item in content.items}
        if "-train-" in path.name:
            assert kinds == {"array_record", "metric_record"}
            assert names == {"arrays", "metrics"}
        else:
            assert kinds == {"metric_record"}
            assert names == {"metrics"}
        for item in content.items:
            if item.WhichOneof("value") == "metric_record":
                for entry in item.metric_record.items:
                    assert entry.key in {
                        "num-examples",
                        "train-loss",
                        "val-loss",
                        "val-metric",
                        "validation-examples",
                    }
                    assert entry.value.WhichOneof("value") in {
                        "sint64",
                        "uint64",
                        "double",
                    }
            else:
                # The network's weights, packed into one float32 vector.
                [entry] = item.array_record.items
                assert entry.key == "weights"
                assert entry.value.dtype == "float32"
                assert list(entry.value.shape) == [parameters]
    assert all(k.startswith(("features.", "class_layers.")) for k in final)


# Site control and run submission


def test_refused_run_wrong_model_hash(federation):
    config = federation.config.with_overrides(rounds=1)
    changed = config.with_overrides(training={**config.training, "learning_rate": 0.1})
    assert model_hash(changed) != model_hash(config)
    run_id, _, outcome = run_to_end(
        federation, changed, "refused", sites=["site-a", "site-b"]
    )
    assert outcome.status == "finished:failed"
    assert outcome.state["reason_code"] == "too-few-replies"
    for name in ("site-a", "site-b"):
        site = federation.sites[name]
        refusals = [
            r
            for r in site_records(site, "federation.refuse")
            if r.details["run_id"] == run_id
        ]
        assert len(refusals) == 1
        assert refusals[0].outcome == "denied"
        assert refusals[0].details["reason"] == "model-hash"
        assert refusals[0].details["model_hash"] == model_hash(changed)
        reads = [
            r
            for r in site_records(site, "job.start")
            if f"run-{run_id}" in r.details["outputs"][0]
        ]
        assert reads == []


def test_impossible_minimum_refused_at_submission(federation):
    before = federation.coordinator.control.call("list", "workbench")["runs"]
    with pytest.raises(ConfigurationError, match=r"min_sites is 4 but only 3 sites"):
        federation.coordinator.submit(
            federation.config.with_overrides(min_sites=4), federation.root / "never"
        )
    after = federation.coordinator.control.call("list", "workbench")["runs"]
    assert len(after) == len(before)


def test_waiting_for_sites_has_a_deadline(federation):
    config = federation.config.with_overrides(rounds=1, min_sites=3, site_wait_s=4.0)
    _, _, outcome = run_to_end(federation, config, "deadline")
    assert outcome.status == "finished:failed"
    assert outcome.state["reason_code"] == "sites-unavailable"
    assert "only 2 of the 3 required sites" in outcome.details


def test_preflight_checks_names_key_and_version(federation):
    site = federation.sites["site-a"]
    keys = SiteKeys("site-a", federation.certs / "site-a")
    bundle = json.loads(keys.bundle.read_text())
    report = preflight(keys, bundle, federation.coordinator.address)
    assert "127.0.0.1" in report["certificate_names"]
    stranger = issue_certificates(federation.root / "other-ca", ["site-a"])
    foreign = SiteKeys("site-a", Path(stranger["sites"]["site-a"]))
    foreign.private_key.write_bytes(keys.private_key.read_bytes())
    foreign.public_key.write_bytes(keys.public_key.read_bytes())
    with pytest.raises(ConfigurationError, match="fails verification"):
        preflight(foreign, bundle, federation.coordinator.address)
    with pytest.raises(ConfigurationError, match=r"install flwr==0\.1"):
        preflight(
            keys, {**bundle, "flwr_version": "0.1"}, federation.coordinator.address
        )
    other = SiteKeys("site-b", federation.certs / "site-b")
    mixed = SiteKeys("site-a", site.folder / "mixed-keys")
    mixed.folder.mkdir(exist_ok=True)
    mixed.private_key.write_bytes(other.private_key.read_bytes())
    mixed.public_key.write_bytes(keys.public_key.read_bytes())
    mixed.ca.write_bytes(keys.ca.read_bytes())
    with pytest.raises(ConfigurationError, match="not the pair of the public key"):
        preflight(mixed, bundle, federation.coordinator.address)


# Faults


def test_site_dropping_mid_round_does_not_stop_it(federation):
    import pandas as pd

    site_c = federation.sites["site-c"]
    node_c = federation.nodes["site-c"].start()
    config = federation.config.with_overrides(
        rounds=1,
        min_sites=2,
        round_timeout_s=30.0,
        evaluate=False,
        strategy="fedprox",
        strategy_options={"proximal_mu": 0.01},
    )
    output = federation.root / "runs" / "drop"
    run_id = federation.coordinator.submit(config, output)

    # Kill site C (SuperNode and trainer) once its trainer has begun the round.
    deadline = time.monotonic() + 120
    started = []
    while time.monotonic() < deadline and not started:
        started = [
            r
            for r in site_records(site_c, "dataset.read")
            if r.details.get("run_id") == run_id
        ]
        time.sleep(0.1)
    assert started, "site C never began its round-1 training"
    node_c.kill()
    assert node_c.descendants() == []

    outcome = federation.coordinator.wait(run_id, output, RUN_TIMEOUT_S)
    assert outcome.succeeded, outcome.details
    metrics = pd.read_csv(output / "metrics.csv")
    round_one = metrics[(metrics["round"] == 1) & (metrics.phase == "train")]
    assert set(round_one[round_one.status == "ok"].site) == {"site-a", "site-b", "all"}
    aggregate = round_one[round_one.site == "all"].iloc[0]
    assert aggregate.num_examples == sum(
        round_one[round_one.site.isin(["site-a", "site-b"])].num_examples
    )


def test_restarted_site_rejoins_with_same_identity(federation):
    # Site C was killed by the previous test: the SuperLink holds its session
    # until the heartbeat expires, and start() tries again until then.
    node_c = federation.nodes["site-c"]
    node_c.start()
    try:
        listed = federation.coordinator.sites()
        assert listed["site-c"]["node_id"] == federation.node_ids["site-c"]
        assert listed["site-c"]["status"] == "online"
        config = federation.config.with_overrides(rounds=1, min_sites=3)
        run_id, _, outcome = run_to_end(federation, config, "rejoin")
    finally:
        node_c.stop()
    assert outcome.succeeded, outcome.details
    rounds = [
        r
        for r in site_records(federation.sites["site-c"], "federation.train")
        if r.details["run_id"] == run_id
    ]
    assert [(r.details["round"], r.outcome) for r in rounds] == [(1, "ok")]
    assert node_c.descendants() == []


def test_superlink_restart_fails_and_resumes_run(federation):
    coordinator = federation.coordinator
    config = federation.config.with_overrides(rounds=3, evaluate=False)
    output = federation.root / "runs" / "restart"
    run_id = coordinator.submit(config, output)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        state = json.loads((output / "state.json").read_text())
        if state.get("last_round", 0) >= 1:
            break
        time.sleep(0.2)
    superlink_processes = coordinator.process.descendants()
    coordinator.kill()
    assert coordinator.process.descendants() == []
    coordinator.start()
    assert coordinator.database.is_file()

    resumed = coordinator.recover(run_id, output, config)
    assert resumed is not None
    assert resumed != run_id
    old = coordinator.status(run_id)
    assert old["status"].startswith("finished:")
    assert not old["status"].endswith("completed")
    outcome = coordinator.wait(resumed, output, RUN_TIMEOUT_S)
    assert outcome.succeeded, outcome.details
    assert outcome.state["resumed_from_run"] == run_id
    assert outcome.state["last_round"] == 3
    with open_audit_log(federation.coordinator_home / "audit.sqlite") as audit:
        ends = [
            r
            for r in audit.records(action="federation.run.end")
            if r.details["run_id"] == run_id
        ]
        resumed_rounds = [
            r.details["round"]
            for r in audit.records(action="federation.round")
            if r.details["run_id"] == resumed and r.details["phase"] == "train"
        ]
    assert ends[-1].outcome == "error"
    assert ends[-1].details["reason"] == "superlink-restarted"
    last_round = ends[-1].details["last_round"]
    assert last_round >= 1
    assert resumed_rounds == list(range(last_round + 1, 4))
    assert len(superlink_processes) >= 2

"""Deployment: the coordinator's SuperLink, the sites' SuperNodes, runs via ``flwr``.

:class:`Coordinator` starts ``flower-superlink`` with TLS, SuperNode
authentication and runtime package installation off, keeps its state in a SQLite
file, registers the sites' public keys under their names, and submits, watches,
stops and resumes runs with the ``flwr`` command (its connection lives in a
private ``FLWR_HOME``). :class:`SiteNode` starts one site's ``flower-supernode``
with the site's key and config. Both listen on 127.0.0.1 unless given another
address, and end every process they started when stopped.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from workbench.audit import AuditEvent, open_audit_log
from workbench.errors import ConfigurationError
from workbench.federation.certs import SiteKeys
from workbench.federation.client import LOG_FILE_KEY, SITE_CONFIG_KEY
from workbench.federation.plan import (
    FederationConfig,
    RunPlan,
    check_minimums,
    model_hash,
)
from workbench.federation.processes import (
    FlowerProcess,
    FlowerProcessError,
    flower_environment,
    free_port,
    require_flower_command,
    wait_for_port,
)
from workbench.federation.reports import read_state, write_state
from workbench.federation.site import SiteConfig
from workbench.federation.trainer import PRELOAD, Trainer
from workbench.federation.weights import save_arrays

__all__ = [
    "APP_FOLDER",
    "Coordinator",
    "FlowerControl",
    "RunOutcome",
    "SiteNode",
]

log = logging.getLogger(__name__)

# The Flower app shipped with the workbench, next to the package's repository root.
APP_FOLDER = Path(__file__).resolve().parents[2] / "federation"
CONNECTION = "workbench"
START_TIMEOUT_S = 60.0
# Seconds between two tries of a SuperNode whose previous session is still open,
# and beyond the session's expiry before giving up.
REJOIN_RETRY_S = 2.0
REJOIN_MARGIN_S = 15.0
# Flower 1.42's API error code of a refused SuperNode activation
# (ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED).
ACTIVATION_FAILED = 2004
# Seconds between two status queries of a running run; each starts a `flwr`
# process. The run's state file is read every STATE_POLL_S seconds.
POLL_INTERVAL_S = 30.0
# Terminal colour and style sequences, which Rich may wrap around `flwr`'s JSON.
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
STATE_POLL_S = 0.25
# Seconds between two task polls of the coordinator's flower-superexec.
SERVERAPP_POLL_S = 2.0
FINISHED = "finished"
INSECURE_WARNING = (
    "INSECURE: %s runs without TLS and without SuperNode authentication; model"
    " updates travel in clear text and any process that reaches the port can join."
    " Use this only for tests on 127.0.0.1."
)


@dataclass(frozen=True)
class RunOutcome:
    """The final status of a run, from Flower's run list and the coordinator's state."""

    run_id: int
    status: str
    details: str
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def succeeded(self) -> bool:
        """Whether Flower reports the run as completed."""
        return self.status == "finished:completed"


class FlowerControl:
    """The ``flwr`` command against one SuperLink, with its own ``FLWR_HOME``."""

    def __init__(
        self,
        home: Path,
        address: str,
        *,
        root_certificates: str | None,
        insecure: bool,
    ) -> None:
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        connection: dict[str, Any] = {"address": address}
        if insecure:
            connection["insecure"] = True
        else:
            connection["root-certificates"] = root_certificates
        import tomli_w

        text = tomli_w.dumps(
            {"superlink": {"default": CONNECTION, CONNECTION: connection}}
        )
        (home / "config.toml").write_text(text, encoding="utf-8")

    def call(self, *arguments: str, timeout: float = 120.0) -> dict[str, Any]:
        """Run ``flwr ARGUMENTS --format json`` and return its JSON output.

        Raises
        ------
        FlowerProcessError
            When the command fails or reports ``success: false``.
        """
        command = [require_flower_command("flwr"), *arguments, "--format", "json"]
        try:
            completed = subprocess.run(
                command,
                env=flower_environment(self.home),
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise FlowerProcessError(
                f"`flwr {' '.join(arguments[:2])}` did not respond within"
                f" {timeout:.0f} s"
            ) from exc
        output = ANSI_ESCAPE.sub("", completed.stdout)
        try:
            document = json.loads(output[output.index("{") :])
        except ValueError:
            document = {"success": False, "error-message": output.strip()}
        if completed.returncode != 0 or not document.get("success", False):
            message = document.get("error-message") or completed.stderr.strip()
            raise FlowerProcessError(
                f"`flwr {' '.join(arguments[:2])}` failed"
                f" (exit {completed.returncode}):"
                f" {message}"
            )
        return dict(document)

    def register(self, public_key: Path, name: str) -> int:
        """Register a SuperNode's public key under ``name``; return its node id."""
        document = self.call(
            "supernode", "register", str(public_key), CONNECTION, "--name", name
        )
        return int(document["node-id"])

    def nodes(self) -> list[dict[str, Any]]:
        """Return the registered SuperNodes as the ``flwr supernode list`` rows."""
        document = self.call("supernode", "list", CONNECTION)
        return list(document.get("nodes", []))

    def submit(self, app: Path, plan: RunPlan, folder: Path) -> int:
        """Start a run of ``app`` with ``plan``; return the run id."""
        import tomli_w

        overrides = folder / "run-config.toml"
        overrides.write_text(tomli_w.dumps({"plan": plan.to_json()}), encoding="utf-8")
        document = self.call(
            "run", str(app), CONNECTION, "--run-config", str(overrides)
        )
        return int(document["run-id"])

    def run(self, run_id: int) -> dict[str, Any]:
        """Return the run's row of ``flwr list``."""
        document = self.call("list", CONNECTION, "--run-id", str(run_id))
        runs = document.get("runs", [])
        if not runs:
            raise FlowerProcessError(f"the SuperLink knows no run {run_id}")
        return dict(runs[0])

    def stop(self, run_id: int) -> None:
        """Stop a run."""
        self.call("stop", str(run_id), CONNECTION)


@dataclass
class Coordinator:
    """The coordinator's SuperLink and the runs submitted to it.

    Parameters
    ----------
    state
        Folder for the SuperLink database, ``FLWR_HOME``, logs and run outputs.
    certs
        The folder written by ``workbench federation certs``; None only with
        ``insecure``.
    host, port
        Address the SuperLink listens on; 127.0.0.1 unless given.
    insecure
        No TLS and no SuperNode authentication, for local tests only.
    environment
        Extra environment of the SuperLink and its ServerApps, such as
        ``WORKBENCH_HOME`` for the coordinator's audit log.
    """

    state: Path
    certs: Path | None = None
    host: str = "127.0.0.1"
    port: int = 0
    insecure: bool = False
    environment: dict[str, str] = field(default_factory=dict)
    process: FlowerProcess | None = None
    control: FlowerControl | None = None

    def __post_init__(self) -> None:
        self.state = Path(self.state).expanduser().resolve()
        if self.certs is not None:
            self.certs = Path(self.certs).expanduser().resolve()
        if not self.insecure and self.certs is None:
            raise ConfigurationError(
                "the SuperLink needs TLS certificates: pass the folder of `workbench"
                " federation certs`, or --insecure for a local test"
            )
        if self.port == 0:
            self.port = free_port()

    @property
    def address(self) -> str:
        """``host:port`` of the SuperLink."""
        return f"{self.host}:{self.port}"

    @property
    def database(self) -> Path:
        """The SuperLink's state database."""
        return self.state / "superlink.db"

    def start(self) -> Coordinator:
        """Start the SuperLink and wait until it listens."""
        self.state.mkdir(parents=True, exist_ok=True)
        command = [
            require_flower_command("flower-superlink"),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--database",
            str(self.database),
            "--disable-runtime-dependency-installation",
        ]
        if self.insecure:
            log.warning(INSECURE_WARNING, "the SuperLink")
            command.append("--insecure")
        else:
            assert self.certs is not None
            command += [
                "--ssl-ca-certfile",
                str(self.certs / "ca.pem"),
                "--ssl-certfile",
                str(self.certs / "server.pem"),
                "--ssl-keyfile",
                str(self.certs / "server.key"),
                "--enable-supernode-auth",
            ]
        environment = flower_environment(self.state / "flwr-home", self.environment)
        # The coordinator's flower-superexec starts one ServerApp a run, so it can
        # look for tasks rarely; it takes CPU from the training otherwise.
        environment["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(SERVERAPP_POLL_S)
        self.process = FlowerProcess(
            "SuperLink", command, environment, self.state / "superlink.log"
        ).start()
        try:
            wait_for_port(self.host, self.port, START_TIMEOUT_S, self.process)
        except FlowerProcessError:
            self.process.stop()
            raise
        self.control = FlowerControl(
            self.state / "flwr-cli",
            self.address,
            root_certificates=None if self.insecure else str(self.certs / "ca.pem"),
            insecure=self.insecure,
        )
        self._wait_until_answering()
        return self

    def stop(self) -> None:
        """End the SuperLink and every process it started."""
        if self.process is not None:
            self.process.stop()
            log.info("SuperLink %s stopped", self.address)

    def kill(self) -> None:
        """Kill the SuperLink and its processes at once, as a crash would."""
        if self.process is not None:
            self.process.kill()

    def restart(self) -> Coordinator:
        """Stop and start the SuperLink on the same address and database."""
        self.stop()
        return self.start()

    def register_sites(self, names: list[str] | None = None) -> dict[str, int]:
        """Register the public keys of ``names`` (default: every site in ``certs``).

        Sites registered before keep their node id. Flower's node list carries no
        site names, so the coordinator keeps its own record of names and node ids
        in ``STATE/sites.json``.
        """
        control = self._control()
        if self.insecure:
            return {}
        assert self.certs is not None
        registry = json.loads((self.certs / "sites.json").read_text(encoding="utf-8"))
        wanted = names or sorted(registry)
        known = self.sites()
        ids = {}
        with self._audit() as audit:
            for name in wanted:
                if name not in registry:
                    raise ConfigurationError(
                        f"site {name!r} has no key in {self.certs}; issue one with"
                        f" `workbench federation certs --sites {name}`"
                    )
                if name in known:
                    ids[name] = int(known[name]["node_id"])
                    continue
                ids[name] = control.register(
                    SiteKeys(name, self.certs / name).public_key, name
                )
                self._record_site(name, ids[name])
                audit.append(
                    AuditEvent(
                        action="federation.site.register",
                        resource=f"site:{name}",
                        purpose="federation membership",
                        details={
                            "node_id": ids[name],
                            "fingerprint": registry[name]["fingerprint"],
                        },
                    )
                )
        return ids

    def sites(self) -> dict[str, dict[str, Any]]:
        """Return the registered sites: name to ``node_id`` and Flower's ``status``.

        The status is ``registered`` (never connected), ``online`` or ``offline``.
        """
        recorded = self._recorded_sites()
        status = {
            int(node["node-id"]): str(node.get("status", ""))
            for node in self._control().nodes()
        }
        return {
            name: {"node_id": node_id, "status": status[node_id]}
            for name, node_id in sorted(recorded.items())
            if status.get(node_id, "unregistered") not in ("unregistered", "deleted")
        }

    def submit(
        self,
        config: FederationConfig,
        output: Path,
        *,
        sites: list[str] | None = None,
        keep_replies: bool = False,
        validation_dataset: str | None = None,
        validation_labels: str | None = None,
        start_round: int = 1,
        initial_weights: str | None = None,
        app: Path = APP_FOLDER,
    ) -> int:
        """Check the run's minimums, then submit it; return the run id.

        Without ``initial_weights``, a new model is built here, seeded, and its
        weights are written to ``OUTPUT/global-initial.npz`` for the ServerApp.

        Raises
        ------
        ConfigurationError
            When ``min_sites`` exceeds the registered sites, or server-side
            evaluation is asked of a federation that is not ``monai`` (the run is
            not submitted).
        """
        from workbench.federation.server import new_global_weights

        control = self._control()
        registered = sites if sites is not None else self._registered_names()
        if not self.insecure or sites is not None:
            check_minimums(config, len(registered))
        if validation_dataset and config.kind != "monai":
            raise ConfigurationError(
                f"server-side evaluation works for monai federations; federation"
                f" {config.name} is {config.kind}: leave out the validation dataset"
            )
        output = Path(output).expanduser().resolve()
        output.mkdir(parents=True, exist_ok=True)
        if initial_weights is None:
            initial_weights = str(
                save_arrays(output / "global-initial.npz", new_global_weights(config))
            )
        plan = RunPlan(
            config=config,
            model_hash=model_hash(config),
            output=str(output),
            sites=sorted(registered),
            start_round=start_round,
            initial_weights=initial_weights,
            keep_replies=keep_replies,
            validation_dataset=validation_dataset,
            validation_labels=validation_labels,
        )
        run_id = control.submit(stage_app(app, self.state / "app"), plan, output)
        write_state(
            output,
            run_id=run_id,
            status="submitted",
            plan=json.loads(plan.to_json()),
        )
        with self._audit() as audit:
            audit.append(
                AuditEvent(
                    action="federation.run.submit",
                    resource=f"federation:{config.name}",
                    purpose=config.purpose,
                    details={
                        "run_id": run_id,
                        "model_hash": plan.model_hash,
                        "rounds": config.rounds,
                        "start_round": start_round,
                        "min_sites": config.min_sites,
                        "sites": plan.sites,
                        "output": str(output),
                    },
                )
            )
        log.info("submitted run %d of federation %s", run_id, config.name)
        return run_id

    def status(self, run_id: int) -> dict[str, Any]:
        """Return Flower's row for the run."""
        return self._control().run(run_id)

    def wait(self, run_id: int, output: Path, timeout: float) -> RunOutcome:
        """Wait until the run finishes; return its outcome.

        Raises
        ------
        FlowerProcessError
            When the run is still going after ``timeout`` seconds, or the SuperLink
            died.
        """
        deadline = time.monotonic() + timeout
        next_query = 0.0
        while True:
            if self.process is None or not self.process.alive():
                raise FlowerProcessError(
                    f"the SuperLink ended while run {run_id} was going:"
                    f"\n{self.process.log_tail() if self.process else ''}"
                )
            # Each status query starts a `flwr` process: query Flower when the
            # ServerApp's state file says the run ended, and now and then besides
            # (a ServerApp that crashed writes no state).
            state = read_state(Path(output)) or {}
            ended = state.get("run_id") == run_id and state.get("status") in (
                "finished",
                "failed",
            )
            if not ended and time.monotonic() < next_query:
                time.sleep(STATE_POLL_S)
                continue
            next_query = time.monotonic() + POLL_INTERVAL_S
            row = self.status(run_id)
            status = str(row.get("status", ""))
            if status.startswith(FINISHED):
                state = read_state(Path(output)) or {}
                if not status.endswith("completed") and state.get("status") != "failed":
                    # The ServerApp ended before it could record why.
                    write_state(
                        Path(output),
                        status="failed",
                        reason=str(row.get("status-details", "")),
                    )
                    state = read_state(Path(output)) or {}
                return RunOutcome(
                    run_id, status, str(row.get("status-details", "")), state
                )
            if time.monotonic() > deadline:
                raise FlowerProcessError(
                    f"run {run_id} still {row.get('status')} after {timeout:.0f} s"
                )
            time.sleep(STATE_POLL_S)

    def recover(
        self, run_id: int, output: Path, config: FederationConfig
    ) -> int | None:
        """After a SuperLink restart: fail an orphaned run and resume it.

        A run that Flower still lists as unfinished lost its ServerApp with the old
        SuperLink. It is stopped and marked failed (reason ``superlink-restarted``)
        in ``state.json`` and the audit log. When a round was checkpointed, a new
        run continues from the round after it; its id is returned. Without a
        checkpoint, None is returned and the run stays failed.
        """
        output = Path(output).expanduser().resolve()
        row = self.status(run_id)
        if str(row.get("status", "")).startswith(FINISHED) and not str(
            row["status"]
        ).endswith("failed"):
            return None
        if not str(row.get("status", "")).startswith(FINISHED):
            self._control().stop(run_id)
        state = read_state(output) or {}
        last_round = int(state.get("last_round", 0))
        reason = (
            f"the SuperLink restarted while run {run_id} was going; last finished"
            f" round: {last_round}"
        )
        write_state(
            output, status="failed", reason=reason, reason_code="superlink-restarted"
        )
        with self._audit() as audit:
            audit.append(
                AuditEvent(
                    action="federation.run.end",
                    resource=f"federation:{config.name}",
                    purpose=config.purpose,
                    outcome="error",
                    details={
                        "run_id": run_id,
                        "reason": "superlink-restarted",
                        "last_round": last_round,
                    },
                )
            )
        if last_round < 1 or last_round >= config.rounds:
            return None
        plan = state.get("plan", {})
        resumed = self.submit(
            config,
            output,
            sites=plan.get("sites"),
            keep_replies=bool(plan.get("keep_replies", False)),
            validation_dataset=plan.get("validation_dataset"),
            validation_labels=plan.get("validation_labels"),
            start_round=last_round + 1,
            initial_weights=str(output / "global-last.npz"),
        )
        write_state(output, resumed_from_run=run_id)
        return resumed

    def _registered_names(self) -> list[str]:
        return sorted(self.sites())

    def _recorded_sites(self) -> dict[str, int]:
        path = self.state / "sites.json"
        if not path.is_file():
            return {}
        return {k: int(v) for k, v in json.loads(path.read_text("utf-8")).items()}

    def _record_site(self, name: str, node_id: int) -> None:
        recorded = {**self._recorded_sites(), name: node_id}
        path = self.state / "sites.json"
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text(json.dumps(recorded, indent=2, sort_keys=True) + "\n")
        os.replace(temporary, path)

    def _control(self) -> FlowerControl:
        if self.control is None:
            raise FlowerProcessError("the SuperLink is not started; call start()")
        return self.control

    def _wait_until_answering(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                self._control().call("list", CONNECTION, timeout=30)
                return
            except FlowerProcessError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def _audit(self) -> Any:
        url = self.environment.get("WORKBENCH_AUDIT_URL")
        if url:
            return open_audit_log(url)
        home = self.environment.get("WORKBENCH_HOME")
        if home:
            return open_audit_log(Path(home) / "audit.sqlite")
        return open_audit_log()


@dataclass
class SiteNode:
    """One site's SuperNode and trainer.

    Parameters
    ----------
    name
        The site's name.
    superlink
        ``host:port`` of the coordinator's SuperLink.
    site_config
        The site's config file (:class:`~workbench.federation.site.SiteConfig`).
    state
        Folder for the SuperNode's log and ``FLWR_HOME``.
    keys
        The site's folder from ``workbench federation certs``; None only with
        ``insecure``.
    insecure
        No TLS and no authentication, for local tests only.
    environment
        Extra environment, such as the site's ``WORKBENCH_HOME`` (its audit log).
    port
        Port of the SuperNode's local runtime API on 127.0.0.1.
    preload
        Modules the trainer imports before it answers: PyTorch and MONAI by
        default, ``PRELOAD["gemma-lora"]`` of :mod:`~workbench.federation.trainer`
        for a site that trains Gemma.
    """

    name: str
    superlink: str
    site_config: Path
    state: Path
    keys: SiteKeys | None = None
    insecure: bool = False
    environment: dict[str, str] = field(default_factory=dict)
    port: int = 0
    preload: tuple[str, ...] = PRELOAD["monai"]
    process: FlowerProcess | None = None
    trainer: Trainer | None = None

    def start_trainer(self) -> Trainer:
        """Start the site's trainer (an isolated job) unless it runs already.

        :meth:`start` waits until it answers; starting the trainers of several
        sites first lets their imports overlap.
        """
        if self.trainer is not None and self.trainer.alive():
            return self.trainer
        site = SiteConfig.load(self.site_config)
        self.trainer = Trainer(
            f"site {self.name}",
            Path(site.work),
            sorted(site.datasets.values()),
            purpose=f"federated training at site {site.site} for federation"
            f" {site.federation}",
            policy=site.isolation,
            environment=self.environment,
            preload=self.preload,
        ).start()
        return self.trainer

    def start(self, wait_connected: float = START_TIMEOUT_S) -> SiteNode:
        """Start the trainer and the SuperNode; wait until the SuperLink accepts it.

        A SuperNode that ended without saying goodbye (killed, or its machine
        lost) stays online at the SuperLink until its heartbeat expires, and the
        SuperLink refuses a new session with the same key until then. The
        SuperNode is started again until that session has expired.

        Raises
        ------
        FlowerProcessError
            When the SuperNode exits, or is not accepted within ``wait_connected``
            seconds (plus the heartbeat expiry of an earlier session): for
            example, its key is not registered.
        TrainerError
            When the trainer does not start.
        """
        if not self.insecure and self.keys is None:
            raise ConfigurationError(
                f"site {self.name} needs its key folder from `workbench federation"
                " certs`, or --insecure for a local test"
            )
        self.state = Path(self.state).expanduser().resolve()
        self.state.mkdir(parents=True, exist_ok=True)
        if self.port == 0:
            self.port = free_port()
        self.start_trainer().wait_ready()
        try:
            self._start_supernode(wait_connected)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """End the SuperNode, the trainer and every process they started."""
        if self.process is not None:
            self.process.stop()
        if self.trainer is not None:
            self.trainer.stop()

    def kill(self) -> None:
        """Kill the SuperNode, the trainer and their processes, as a crash would."""
        if self.process is not None:
            self.process.kill()
        if self.trainer is not None:
            self.trainer.kill()

    def descendants(self) -> list[int]:
        """Return the PIDs of this site's processes that still run."""
        running = []
        for process in (self.process, self.trainer and self.trainer.process):
            if process is not None:
                running += process.descendants()
        return running

    def _start_supernode(self, wait_connected: float) -> None:
        from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE

        # Flower's flower-supernode, with a shorter idle wait between its polls.
        require_flower_command("flower-supernode")
        command = [
            sys.executable,
            "-m",
            "workbench.federation.supernode",
            "--superlink",
            self.superlink,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--node-config",
            f'{SITE_CONFIG_KEY}="{Path(self.site_config).resolve()}"'
            f' {LOG_FILE_KEY}="{self.state / "clientapp.log"}"',
        ]
        if self.insecure:
            log.warning(INSECURE_WARNING, f"the SuperNode of site {self.name}")
            command.append("--insecure")
        else:
            assert self.keys is not None
            command += [
                "--root-certificates",
                str(self.keys.ca),
                "--auth-supernode-private-key",
                str(self.keys.private_key),
            ]
        log_path = self.state / "supernode.log"
        session_expiry = HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL
        retry_until = time.monotonic() + session_expiry + REJOIN_MARGIN_S
        while True:
            offset = log_path.stat().st_size if log_path.exists() else 0
            self.process = FlowerProcess(
                f"SuperNode {self.name}",
                command,
                flower_environment(self.state / "flwr-home", self.environment),
                log_path,
            ).start()
            try:
                self._wait_connected(log_path, offset, wait_connected)
                return
            except _SessionStillOpenError:
                if time.monotonic() > retry_until:
                    raise FlowerProcessError(
                        f"the SuperLink refused to activate site {self.name} for"
                        f" {session_expiry + REJOIN_MARGIN_S:.0f} s: its key is not"
                        " registered (ask the coordinator to register site"
                        f" {self.name}), or another SuperNode with this site's key"
                        " is running"
                    ) from None
                log.info(
                    "site %s: the SuperLink refused to activate this site; if the"
                    " site's previous SuperNode ended without leaving, its session"
                    " expires at most %d s after its last heartbeat; trying again",
                    self.name,
                    session_expiry,
                )
                time.sleep(REJOIN_RETRY_S)

    def _wait_connected(self, log_path: Path, offset: int, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with log_path.open("rb") as handle:
                handle.seek(offset)
                text = handle.read().decode("utf-8", "replace")
            if "SuperNode ID:" in text:
                log.info("site %s connected to %s", self.name, self.superlink)
                return
            if not self.process.alive():
                break
            time.sleep(0.3)
        with log_path.open("rb") as handle:
            handle.seek(offset)
            text = handle.read().decode("utf-8", "replace")
        self.process.stop()
        if f"[code: {ACTIVATION_FAILED}]" in text:
            raise _SessionStillOpenError
        tail = "\n".join(text.splitlines()[-30:])
        hint = ""
        if "activat" in tail.lower() or "401" in tail or "auth" in tail.lower():
            hint = (
                "; the SuperLink did not accept this site's key: ask the coordinator"
                f" to register site {self.name}"
            )
        raise FlowerProcessError(
            f"the SuperNode of site {self.name} did not connect to {self.superlink}"
            f" within {timeout:.0f} s{hint}:\n{tail}"
        )


class _SessionStillOpenError(Exception):
    """The SuperLink refused to activate the SuperNode.

    Flower 1.42 gives one code for an unregistered key and for a key whose
    previous session is still online, so both are retried until the session
    would have expired.
    """


def stage_app(app: Path, staging: Path) -> Path:
    """Copy the app's ``pyproject.toml`` and Python modules to ``staging``; return it.

    Only these files go into the bundle sent to the sites, so no federation config,
    certificate or key lying in the app folder can travel with it.
    """
    import shutil

    app = Path(app).resolve()
    if staging.exists():
        shutil.rmtree(staging)
    (staging / "federated_app").mkdir(parents=True)
    shutil.copy2(app / "pyproject.toml", staging / "pyproject.toml")
    for module in sorted((app / "federated_app").glob("*.py")):
        shutil.copy2(module, staging / "federated_app" / module.name)
    return staging


def site_environment(home: str | os.PathLike[str]) -> dict[str, str]:
    """Return the environment of a site whose workbench home is ``home``."""
    return {"WORKBENCH_HOME": os.fspath(Path(home).resolve())}


def with_rounds(config: FederationConfig, **changes: Any) -> FederationConfig:
    """Return ``config`` with settings changed (None leaves a setting as it is)."""
    return replace(config, **{k: v for k, v in changes.items() if v is not None})

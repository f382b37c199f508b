"""The coordinator's and the sites' commands, run as a user runs them.

``workbench federation certs``, ``hash``, ``serve`` and two ``join`` processes,
each site with its own workbench home, on 127.0.0.1 with TLS and site keys. The
run must finish, and every process the commands started must end with them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from federation_helpers import labelled_site, sphere_classifier

from workbench.audit import open_audit_log
from workbench.federation.processes import free_port
from workbench.home import init_home

pytestmark = pytest.mark.slow

CONFIG = """
[federation]
name = "chest-ct"
dataset = "chest-ct"
purpose = "federation command test"
rounds = 1
min_sites = 2
local_epochs = 1
seed = 0
round_timeout_s = 300
site_wait_s = 240
evaluate = true

""" + sphere_classifier()
SITES = ("site-a", "site-b")
TIMEOUT_S = 600


def workbench_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "workbench.cli", *args]


def environment(home: Path) -> dict[str, str]:
    return {**os.environ, "WORKBENCH_HOME": str(home), "PYTHONUNBUFFERED": "1"}


def wait_for_line(path: Path, text: str, process: subprocess.Popen, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        assert process.poll() is None, path.read_text(errors="replace")[-3000:]
        time.sleep(0.3)
    raise AssertionError(f"{text!r} not in {path} within {timeout} s")


def process_tree(process: subprocess.Popen) -> list[psutil.Process]:
    try:
        parent = psutil.Process(process.pid)
        return [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A coordinator's ``serve`` and two sites' ``join``, until the run ends."""
    root = tmp_path_factory.mktemp("federation-cli")
    config = root / "chest-ct.toml"
    config.write_text(CONFIG)
    homes = {"coordinator": init_home(root / "coordinator-home")}
    sites = {}
    for index, name in enumerate(SITES):
        homes[name] = init_home(root / name / "home")
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("WORKBENCH_HOME", str(homes[name]))
            sites[name] = labelled_site(root / name, 40 + index)["dataset"]

    certs = root / "certs"
    subprocess.run(
        workbench_command(
            "federation",
            "certs",
            "--out",
            str(certs),
            "--sites",
            *SITES,
            "--federation",
            "chest-ct",
        ),
        check=True,
        capture_output=True,
        env=environment(homes["coordinator"]),
        timeout=120,
    )
    digest = subprocess.run(
        workbench_command("federation", "hash", "--config", str(config)),
        check=True,
        capture_output=True,
        text=True,
        env=environment(homes["coordinator"]),
        timeout=120,
    ).stdout.strip()

    port = free_port()
    serve_log = root / "serve.log"
    processes: dict[str, subprocess.Popen] = {}
    trees: dict[str, list[psutil.Process]] = {}
    try:
        with serve_log.open("w") as log:
            processes["serve"] = subprocess.Popen(
                workbench_command(
                    "federation",
                    "serve",
                    "--config",
                    str(config),
                    "--rounds",
                    "2",
                    "--min-sites",
                    "2",
                    "--certs",
                    str(certs),
                    "--state",
                    str(root / "coordinator"),
                    "--port",
                    str(port),
                    "--timeout",
                    str(TIMEOUT_S),
                ),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environment(homes["coordinator"]),
            )
        wait_for_line(serve_log, "sites registered", processes["serve"], 180)
        for name in SITES:
            with (root / f"{name}.log").open("w") as log:
                processes[name] = subprocess.Popen(
                    workbench_command(
                        "federation",
                        "join",
                        "--superlink",
                        f"127.0.0.1:{port}",
                        "--site",
                        name,
                        "--dataset",
                        str(sites[name]),
                        "--labels",
                        str(root / name / "labels.csv"),
                        "--certs",
                        str(certs / name),
                        "--accept-model",
                        digest,
                        "--state",
                        str(root / name / "state"),
                    ),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=environment(homes[name]),
                )
        for name in SITES:
            wait_for_line(root / f"{name}.log", "joined", processes[name], 300)
            trees[name] = process_tree(processes[name])
        trees["serve"] = process_tree(processes["serve"])
        serve_status = processes["serve"].wait(TIMEOUT_S)
        # A site leaves on SIGTERM, as a service manager stops it.
        site_status = {}
        for name in SITES:
            processes[name].send_signal(signal.SIGTERM)
            site_status[name] = processes[name].wait(60)
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait(30)
    yield {
        "root": root,
        "homes": homes,
        "digest": digest,
        "serve_status": serve_status,
        "site_status": site_status,
        "serve_log": serve_log.read_text(),
        "trees": trees,
    }


def test_serve_runs_the_rounds_and_exits_zero(served):
    assert served["serve_status"] == 0, served["serve_log"][-3000:]
    summary = json.loads(served["serve_log"].strip().splitlines()[-1])
    assert summary["status"] == "finished:completed"
    assert summary["last_round"] == 2
    output = served["root"] / "coordinator" / "runs" / "chest-ct"
    assert (output / "checkpoints" / "round-002.npz").is_file()
    assert (output / "metrics.png").stat().st_size > 1000


def test_sites_trained_each_round_and_logged_it(served):
    for name in SITES:
        assert served["site_status"][name] == 0
        with open_audit_log(served["homes"][name] / "audit.sqlite") as audit:
            audit.verify()
            rounds = audit.records(action="federation.train")
        assert [(r.details["round"], r.outcome) for r in rounds] == [
            (1, "ok"),
            (2, "ok"),
        ]
        assert {r.details["model_hash"] for r in rounds} == {served["digest"]}


def test_every_started_process_ends(served):
    """No SuperLink, SuperNode, trainer or ``flower-superexec`` outlives its command."""
    assert len(served["trees"]["serve"]) >= 3
    for name in SITES:
        # The command, its SuperNode and the site's trainer, at least.
        assert len(served["trees"][name]) >= 3
    left = [
        process.pid
        for tree in served["trees"].values()
        for process in tree
        if process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    ]
    assert left == []

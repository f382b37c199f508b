"""The ``workbench federation`` commands: certs, hash, serve, join.

Coordinator::

    workbench federation certs --out federation/certs --sites site-a site-b
    workbench federation hash --config federation/chest-ct.toml
    workbench federation serve --rounds 5 --min-sites 2 \\
        --config federation/chest-ct.toml

Partner site::

    workbench federation join --superlink HOST:PORT --site site-a \\
        --dataset datasets/chest-ct --labels labels.csv \\
        --certs federation/certs/site-a --accept-model sha256:...
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

from workbench.errors import ConfigurationError

__all__ = ["register"]

log = logging.getLogger(__name__)

DEFAULT_PORT = 9092


def register(subparsers: Any) -> None:
    """Add the ``federation`` command group."""
    parser = subparsers.add_parser(
        "federation", help="federated learning across partner sites (Flower)"
    )
    commands = parser.add_subparsers(dest="federation_command", metavar="COMMAND")
    commands.required = True

    certs = commands.add_parser(
        "certs", help="issue the CA, server certificate and site keys"
    )
    certs.add_argument("--out", type=Path, required=True, help="output folder")
    certs.add_argument("--sites", nargs="+", required=True, help="site names")
    certs.add_argument(
        "--host",
        action="append",
        default=[],
        help="another name or IP address of the SuperLink (repeatable)",
    )
    certs.add_argument("--federation", default="default", help="federation name")
    certs.set_defaults(handler=_certs)

    digest = commands.add_parser("hash", help="print the model hash sites must accept")
    digest.add_argument("--config", type=Path, required=True, help="federation TOML")
    digest.set_defaults(handler=_hash)

    serve = commands.add_parser("serve", help="run the SuperLink and a federated run")
    serve.add_argument("--config", type=Path, required=True, help="federation TOML")
    serve.add_argument("--rounds", type=int, help="number of rounds (default: config)")
    serve.add_argument("--min-sites", type=int, help="minimum sites per round")
    serve.add_argument("--certs", type=Path, default=Path("federation/certs"))
    serve.add_argument("--state", type=Path, default=Path("federation-state"))
    serve.add_argument(
        "--output", type=Path, help="run output (default: STATE/runs/NAME)"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="port to listen on"
    )
    serve.add_argument("--timeout", type=float, default=24 * 3600.0, help="seconds")
    serve.add_argument(
        "--insecure",
        action="store_true",
        help="no TLS and no site authentication: local tests only",
    )
    serve.set_defaults(handler=_serve)

    join = commands.add_parser("join", help="run this site's SuperNode")
    join.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    join.add_argument("--site", required=True, help="this site's name")
    join.add_argument("--dataset", type=Path, required=True, help="dataset folder")
    join.add_argument(
        "--labels", type=Path, help="labels table, where the task needs one"
    )
    join.add_argument("--certs", type=Path, help="this site's folder from `certs`")
    join.add_argument(
        "--accept-model",
        action="append",
        default=[],
        metavar="HASH",
        help="a model hash this site agrees to train (repeatable)",
    )
    join.add_argument(
        "--require-secure-aggregation",
        action="store_true",
        help="reject runs whose updates are not securely aggregated (SecAgg+)",
    )
    join.add_argument("--federation", help="federation name (default: from --certs)")
    join.add_argument("--dataset-name", help="the federation's name of the dataset")
    join.add_argument(
        "--state",
        type=Path,
        help="site state folder: logs, round folders (default: federation-state/SITE)",
    )
    join.add_argument(
        "--insecure", action="store_true", help="no TLS: local tests only"
    )
    join.set_defaults(handler=_join)


def _certs(args: argparse.Namespace) -> int:
    from workbench.federation.certs import issue_certificates

    result = issue_certificates(
        args.out, args.sites, hosts=args.host, federation=args.federation
    )
    print(json.dumps(result, indent=2))
    print(
        f"Send each site only its own folder ({args.out}/SITE); keep ca.key offline.",
        file=sys.stderr,
    )
    return 0


def _hash(args: argparse.Namespace) -> int:
    from workbench.federation.plan import load_federation_config, model_hash

    print(model_hash(load_federation_config(args.config)))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from workbench.federation.deployment import Coordinator
    from workbench.federation.plan import load_federation_config
    from workbench.federation.reports import read_state

    config = load_federation_config(args.config).with_overrides(
        rounds=args.rounds, min_sites=args.min_sites
    )
    if args.insecure:
        print(
            "WARNING: --insecure: no TLS, no site authentication. Local tests only.",
            file=sys.stderr,
        )
    state = args.state.expanduser().resolve()
    output = (args.output or state / "runs" / config.name).expanduser().resolve()
    coordinator = Coordinator(
        state,
        certs=None if args.insecure else args.certs,
        host=args.host,
        port=args.port,
        insecure=args.insecure,
    )
    with _Stopping(coordinator) as stopping:
        coordinator.start()
        sites = coordinator.register_sites()
        previous = read_state(output) or {}
        run_id = None
        if previous.get("status") in ("submitted", "running") and previous.get(
            "run_id"
        ):
            run_id = coordinator.recover(int(previous["run_id"]), output, config)
        if run_id is None:
            run_id = coordinator.submit(config, output)
        print(f"run {run_id}: {len(sites)} sites registered, output {output}")
        outcome = coordinator.wait(run_id, output, args.timeout)
    if stopping.terminated:
        print("stopped on SIGTERM before the run ended", file=sys.stderr)
        return 1
    print(
        json.dumps(
            {
                "run_id": outcome.run_id,
                "status": outcome.status,
                "details": outcome.details,
                "last_round": outcome.state.get("last_round"),
            }
        )
    )
    return 0 if outcome.succeeded else 1


def _join(args: argparse.Namespace) -> int:
    from workbench.federation.certs import read_site_bundle
    from workbench.federation.deployment import SiteNode
    from workbench.federation.preflight import preflight
    from workbench.federation.site import SiteConfig

    keys, bundle = None, {}
    if not args.insecure:
        if args.certs is None:
            raise ConfigurationError(
                "--certs is required: the folder `workbench federation certs` wrote"
                " for this site (or --insecure for a local test)"
            )
        keys, bundle = read_site_bundle(args.certs)
        report = preflight(keys, bundle, args.superlink)
        print(json.dumps(report, indent=2))
    else:
        print(
            "WARNING: --insecure: no TLS, no authentication. Local tests only.",
            file=sys.stderr,
        )
    federation = args.federation or bundle.get("federation")
    if not federation:
        raise ConfigurationError("--federation is required with --insecure")
    if not args.accept_model:
        log.warning(
            "no --accept-model given: this site rejects every run; each rejection is"
            " audit-logged with the hash the run asked for"
        )
    state = (args.state or Path("federation-state") / args.site).expanduser().resolve()
    site = SiteConfig(
        site=args.site,
        federation=federation,
        datasets={args.dataset_name or federation: str(args.dataset.resolve())},
        labels={args.dataset_name or federation: str(args.labels.resolve())}
        if args.labels
        else {},
        accepted_model_hashes=list(args.accept_model),
        work=str(state / "work"),
        require_secure_aggregation=args.require_secure_aggregation,
    )
    node = SiteNode(
        args.site,
        args.superlink,
        site.save(state / "site.json"),
        state,
        keys=keys,
        insecure=args.insecure,
    )
    with _Stopping(node) as stopping:
        node.start()
        print(f"site {args.site} joined {args.superlink}; Ctrl-C to leave")
        while node.process is not None and node.process.alive():
            time.sleep(1.0)
        tail = node.process.log_tail() if node.process is not None else ""
    if stopping.terminated:
        return 0
    print(
        f"the SuperNode of site {args.site} ended by itself:\n{tail}", file=sys.stderr
    )
    return 1


class _Stopping:
    """Stop a coordinator or site node on exit, SIGTERM or Ctrl-C.

    SIGTERM, as a service manager sends it, ends the ``with`` block without an
    error; ``terminated`` then says so.
    """

    def __init__(self, target: Any) -> None:
        self.target = target
        self.terminated = False

    def __enter__(self) -> _Stopping:
        signal.signal(signal.SIGTERM, self._terminate)
        return self

    def __exit__(self, kind: type[BaseException] | None, *_exc: object) -> bool:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        self.target.stop()
        if kind is _TerminatedError:
            self.terminated = True
            log.info("stopped on SIGTERM")
            return True
        return False

    @staticmethod
    def _terminate(_number: int, _frame: Any) -> None:
        raise _TerminatedError


class _TerminatedError(Exception):
    """The process received SIGTERM."""

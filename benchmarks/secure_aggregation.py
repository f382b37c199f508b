"""Round time and traffic of secure aggregation (SecAgg+) against plain FedAvg.

In one run, three sites with their own small synthetic CT datasets train the
test suite's small DenseNet for ``--rounds`` rounds twice, in loopback
deployments (``federation.simulate``): once with plain FedAvg, once with
``secure_aggregation = true``. Both runs use the same data, seed and model; the
report gives each run's mean round time and bytes, and their ratios. SecAgg+
adds three exchanges a round (keys, key shares, unmasking), so the difference
is mostly Flower's per-message cost, not the cryptography.

Run it from the project root::

    .venv/bin/python benchmarks/secure_aggregation.py     # about five minutes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY / "tests"))


def main() -> None:
    """Run the plain and the secure federation; print their round times."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from federation_helpers import labelled_site, sphere_classifier_config

    from workbench import federation
    from workbench.home import init_home

    root = Path(tempfile.mkdtemp(prefix="secure-aggregation-benchmark-"))
    os.environ["WORKBENCH_HOME"] = str(init_home(root / "home"))
    sites = {
        name: labelled_site(root / name, 60 + index, "benchmark labels")
        for index, name in enumerate(("a", "b", "c"))
    }
    report: dict[str, dict[str, float]] = {}
    for mode, secure in (("plain", False), ("secure", True)):
        config = sphere_classifier_config(
            name="benchmark",
            purpose="secure aggregation benchmark",
            rounds=args.rounds,
            min_sites=3,
            evaluate=False,
            privacy={
                "mode": "none",
                "secure_aggregation": secure,
                "secagg_max_weight": 100.0,
            },
        )
        result = federation.simulate(
            sites=sites, rounds=args.rounds, config=config, out=root / mode
        )
        if not result.outcome.succeeded:
            raise SystemExit(f"{mode} run failed: {result.outcome.details}")
        metrics = result.metrics
        rounds = metrics[(metrics.phase == "train") & (metrics.site == "all")]
        seconds = [float(v) for v in rounds.seconds]
        report[mode] = {
            "round_s": [round(v, 2) for v in seconds],
            # The first round also reads the data.
            "mean_round_s": round(statistics.mean(seconds[1:] or seconds), 2),
            "bytes_sent_per_round": int(rounds.bytes_sent.mean()),
            "bytes_received_per_round": int(rounds.bytes_received.mean()),
        }
    plain, secure = report["plain"], report["secure"]
    report["ratio"] = {
        "round_time": round(secure["mean_round_s"] / plain["mean_round_s"], 2),
        "bytes_sent": round(
            secure["bytes_sent_per_round"] / plain["bytes_sent_per_round"], 2
        ),
        "bytes_received": round(
            secure["bytes_received_per_round"] / plain["bytes_received_per_round"], 2
        ),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

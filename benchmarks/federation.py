"""Per-round time of federated training against the same training run locally.

In one run, on one synthetic CT dataset and a DenseNet169 (2D, about 12.5 M
parameters, the closest MONAI network to 10 M):

- local: the site's training code (:class:`workbench.federation.local_round.
  SiteRounds`) called directly in this process, ``--epochs`` epochs a round from
  the previous round's weights, with the data read once and kept in memory as a
  local training run keeps it; the reference;
- federated: one site in a loopback deployment (SuperLink with TLS, SuperNode,
  the site's isolated trainer), the same epochs per round; the round time is
  the coordinator's, from sending the weights to aggregating the reply.

The overhead of a round is ``(federated - local) / local``: Flower's polling
and ClientApp process, the weights' serialisation and transfers, and the
hand-over to the trainer through files. The target is below 25 %.
Run it from the project root::

    .venv/bin/python benchmarks/federation.py              # about ten minutes
    .venv/bin/python benchmarks/federation.py --quick      # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY / "tests"))

CONFIG = """
[federation]
name = "benchmark"
dataset = "ct"
purpose = "federation benchmark"
rounds = {rounds}
min_sites = 1
local_epochs = {epochs}
seed = 0
round_timeout_s = 3600
site_wait_s = 120
evaluate = false

[data]
level = "slice"
where = {{ Modality = "CT" }}
label_column = "sphere"

[task]
type = "classification"
metric = "accuracy"
classes = [false, true]

[model]
name = "{model}"
args = {{ spatial_dims = 2, in_channels = 1, out_channels = 2 }}

[[transforms]]
name = "ScaleIntensityRanged"
args = {{ keys = ["image"], a_min = -1000.0, a_max = 1000.0, b_min = 0.0, \
b_max = 1.0, clip = true }}

[training]
batch_size = 16
learning_rate = 1e-3
validation_fraction = 0.2
seed = 0
"""


def main() -> None:
    """Measure and print the local and federated round times."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=6)
    parser.add_argument("--slices", type=int, default=24)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="DenseNet169")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round")
    args = parser.parse_args()
    if args.quick:
        args.patients, args.slices, args.size, args.epochs, args.rounds = 3, 6, 32, 1, 1
        args.model = "DenseNet121"

    from ingest_helpers import ingest_folder

    from workbench import federation
    from workbench.federation.local_round import SiteRounds, initial_weights
    from workbench.federation.plan import load_federation_config
    from workbench.federation.weights import save_arrays
    from workbench.home import init_home
    from workbench.samples import generate_studies
    from workbench.samples.labels import sphere_labels

    root = Path(tempfile.mkdtemp(prefix="federation-benchmark-"))
    os.environ["WORKBENCH_HOME"] = str(init_home(root / "home"))
    corpus = generate_studies(
        root / "corpus",
        patients=args.patients,
        studies_per_patient=1,
        ct_slices=args.slices,
        mr_slices=1,
        rows=args.size,
        columns=args.size,
    )
    dataset = root / "dataset"
    ingest_folder(corpus.root, dataset)
    labels = root / "labels.csv"
    sphere_labels(dataset, labels, purpose="benchmark labels")
    config_path = root / "benchmark.toml"
    config_path.write_text(
        CONFIG.format(rounds=args.rounds, epochs=args.epochs, model=args.model)
    )
    config = load_federation_config(config_path)
    parameters = sum(
        value.size for value in initial_weights(config.training, 0).values()
    )

    # 1. Local: the same training code in this process, the data read once.
    weights = root / "local-weights.npz"
    save_arrays(weights, initial_weights(config.training, 0))
    rounds_here = SiteRounds()
    local = []
    for round_number in range(1, args.rounds + 1):
        started = time.perf_counter()
        rounds_here.train(
            training=config.training,
            dataset=str(dataset),
            labels=str(labels),
            weights_in=str(weights),
            weights_out=str(weights),
            epochs=args.epochs,
            seed=0,
            server_round=round_number,
            purpose="benchmark, local",
        )
        local.append(time.perf_counter() - started)

    # 2. Federated: one site over loopback, the same epochs per round.
    result = federation.simulate(
        sites={"site": {"dataset": dataset, "labels": labels}},
        rounds=args.rounds,
        config=config,
        out=root / "simulation",
    )
    if not result.outcome.succeeded:
        raise SystemExit(f"federated run failed: {result.outcome.details}")
    metrics = result.metrics
    rounds = metrics[(metrics.phase == "train") & (metrics.site == "all")]
    federated = [float(v) for v in rounds.seconds]
    bytes_per_round = int(rounds.bytes_sent.iloc[0] + rounds.bytes_received.iloc[0])

    # Both first rounds also read the data; later rounds train from memory.
    local_mean = statistics.mean(local[1:] or local)
    federated_mean = statistics.mean(federated[1:] or federated)
    report = {
        "model": args.model,
        "parameters": int(parameters),
        "train_slices": int(metrics[metrics.phase == "train"].num_examples.iloc[0]),
        "epochs_per_round": args.epochs,
        "local_round_s": [round(v, 2) for v in local],
        "federated_round_s": [round(v, 2) for v in federated],
        "local_mean_s": round(local_mean, 2),
        "federated_mean_s": round(federated_mean, 2),
        "overhead": round((federated_mean - local_mean) / local_mean, 3),
        "bytes_per_round": bytes_per_round,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

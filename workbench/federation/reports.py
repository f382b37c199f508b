"""The coordinator's record of a run: metrics by round and site, a plot, checkpoints.

The ServerApp writes into the run's output folder::

    out/
      checkpoints/round-001.npz ...   global weights after each round
      global-last.npz                 the latest global weights
      metrics.csv  metrics.parquet    one row per round, phase and site (site "all"
                                      for the aggregate, "coordinator" for the
                                      server-side evaluation): examples, losses,
                                      metric, bytes sent and received, seconds, and
                                      each site's privacy budget under local DP
      metrics.png                     validation metric and losses by round
      state.json                      run id, last finished round, status, reason
      server.log                      the ServerApp's log
      server-evaluation/              weights and log of the server-side evaluation
      replies/                        every reply as received (keep_replies only)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "METRIC_COLUMNS",
    "RunRecorder",
    "metrics_figure",
    "plot_metrics",
    "read_state",
    "write_state",
]

METRIC_COLUMNS = (
    "run_id",
    "round",
    "phase",
    "site",
    "node_id",
    "status",
    "num_examples",
    "train_loss",
    "val_loss",
    "val_metric",
    "bytes_sent",
    "bytes_received",
    "seconds",
    "dp_epsilon_round",
    "dp_epsilon_total",
)
STATE_FILE = "state.json"


class RunRecorder:
    """Collects a run's metric rows; rewrites the table and plot after each round."""

    def __init__(self, out: Path, run_id: int, metric_name: str) -> None:
        self.out = out
        self.run_id = run_id
        self.metric_name = metric_name
        self.rows: list[dict[str, Any]] = []
        existing = out / "metrics.csv"
        if existing.is_file():
            # A resumed run continues the table of the run it resumes.
            import pandas as pd

            self.rows = pd.read_csv(
                existing, dtype={"run_id": str, "node_id": str}
            ).to_dict("records")

    def add(self, **values: Any) -> None:
        """Add one row; missing columns stay empty."""
        row = {column: values.get(column) for column in METRIC_COLUMNS}
        row["run_id"] = str(self.run_id)
        if row["node_id"] is not None:
            row["node_id"] = str(row["node_id"])
        self.rows.append(row)

    def write(self) -> None:
        """Write ``metrics.csv``, ``metrics.parquet`` and ``metrics.png``."""
        import pandas as pd

        frame = pd.DataFrame(self.rows, columns=list(METRIC_COLUMNS))
        for column in ("run_id", "node_id"):
            frame[column] = frame[column].astype("string")
        _atomic_frame(frame, self.out / "metrics.csv", "csv")
        _atomic_frame(frame, self.out / "metrics.parquet", "parquet")
        plot_metrics(self.out / "metrics.png", self.rows, self.metric_name)


def plot_metrics(path: Path, rows: Sequence[Mapping[str, Any]], metric: str) -> None:
    """Write the figure of :func:`metrics_figure` to ``path`` as a PNG, atomically."""
    figure = metrics_figure(rows, metric)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    figure.savefig(temporary, format="png")
    os.replace(temporary, path)


def metrics_figure(rows: Sequence[Mapping[str, Any]], metric: str) -> Any:
    """Draw the aggregate losses and metric by round, and each site's metric.

    Returns a :class:`matplotlib.figure.Figure` made without pyplot, so a notebook
    shows it once, as the value of a cell.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    metric_axes = axes.twinx()

    def series(phase: str, site: str, column: str) -> tuple[list[int], list[float]]:
        chosen = [
            row
            for row in rows
            if row["phase"] == phase and row["site"] == site and _number(row[column])
        ]
        return [int(r["round"]) for r in chosen], [float(r[column]) for r in chosen]

    rounds, values = series("train", "all", "train_loss")
    axes.plot(rounds, values, "o-", label="train loss (all sites)")
    rounds, values = series("evaluate", "all", "val_loss")
    axes.plot(rounds, values, "o-", label="validation loss (all sites)")
    rounds, values = series("evaluate", "all", "val_metric")
    metric_axes.plot(rounds, values, "s-", color="tab:green", label=f"{metric} (all)")
    rounds, values = series("server", "coordinator", "val_metric")
    if values:
        metric_axes.plot(
            rounds, values, "s-", color="black", label=f"{metric} (server)"
        )
    sites = sorted(
        {
            str(r["site"])
            for r in rows
            if r["phase"] == "evaluate" and r["site"] != "all"
        }
    )
    for site in sites:
        rounds, values = series("evaluate", site, "val_metric")
        metric_axes.plot(rounds, values, ":", alpha=0.7, label=f"{metric} ({site})")
    axes.set_xlabel("round")
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.set_ylabel("loss")
    metric_axes.set_ylabel(f"validation {metric}")
    lines = axes.get_lines() + metric_axes.get_lines()
    axes.legend(lines, [line.get_label() for line in lines], loc="best", fontsize=7)
    figure.tight_layout()
    return figure


def write_state(out: Path, **values: Any) -> None:
    """Merge ``values`` into the run's ``state.json``, atomically."""
    state = read_state(out) or {}
    state.update(values)
    temporary = out / f".{STATE_FILE}.tmp-{os.getpid()}"
    temporary.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    os.replace(temporary, out / STATE_FILE)


def read_state(out: Path) -> dict[str, Any] | None:
    """Return the run's ``state.json``, or None when there is none."""
    path = Path(out) / STATE_FILE
    if not path.is_file():
        return None
    return dict(json.loads(path.read_text(encoding="utf-8")))


def _atomic_frame(frame: Any, path: Path, kind: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if kind == "csv":
        frame.to_csv(temporary, index=False)
    else:
        frame.to_parquet(temporary, index=False)
    os.replace(temporary, path)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(float(value))

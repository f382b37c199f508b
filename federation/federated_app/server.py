"""The ServerApp: runs the rounds of the plan in the run config at the coordinator."""

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from workbench.federation.plan import RunPlan
from workbench.federation.server import SERVER_LOG, run_server

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation's rounds, checkpoints and reports."""
    # This app is an entry point, and Flower discards its standard error: the
    # workbench's log lines go to a file in the run's output folder.
    output = Path(RunPlan.from_json(str(context.run_config["plan"])).output)
    output.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(output / SERVER_LOG, encoding="utf-8")
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logger = logging.getLogger("workbench")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        run_server(grid, context)
    finally:
        logger.removeHandler(handler)
        handler.close()

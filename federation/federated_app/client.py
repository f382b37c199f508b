"""The ClientApp: answers train and evaluate messages at a partner site."""

import logging
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from workbench.federation.client import LOG_FILE_KEY, handle_message
from workbench.federation.secure_aggregation import secure_aggregation_mod

app = ClientApp(mods=[secure_aggregation_mod])


@app.train()
def train(message: Message, context: Context) -> Message:
    """Train the global model on this site's data in the site's trainer."""
    _log_to_file(context)
    return handle_message(message, context, "train")


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Evaluate the global model on this site's validation split."""
    _log_to_file(context)
    return handle_message(message, context, "evaluate")


def _log_to_file(context: Context) -> None:
    # This app is an entry point, and Flower discards its standard error: the
    # workbench's log lines go to the file the SuperNode's node config names.
    path = context.node_config.get(LOG_FILE_KEY)
    logger = logging.getLogger("workbench")
    if not path or any(not isinstance(h, logging.NullHandler) for h in logger.handlers):
        return
    handler = logging.FileHandler(Path(str(path)), encoding="utf-8")
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)

"""Flower's ``flower-supernode`` command with a shorter idle wait between polls.

Flower 1.42's SuperNode requests a message from the SuperLink and, when none is
waiting, sleeps 3 s, a constant in ``flwr.supernode.start_client_internal``. A
round's weights therefore wait 1.5 s on average before the site receives them,
and a securely aggregated round waits so once per stage. This entry point runs the
same command with that wait shortened to :data:`IDLE_POLL_S`, and with the 0.5 s
wait between two looks for the ClientApp's reply (in the SuperNode's memory)
shortened to :data:`REPLY_POLL_S`. The SuperLink gets one more small request a
second from each idle site. The log lines also get their times.

Run it as ``python -m workbench.federation.supernode ARGS``, with the arguments
of ``flower-supernode``. :func:`idle_wait_found` tells whether the installed
Flower still has the wait this entry point shortens.
"""

from __future__ import annotations

import inspect
import logging
import sys
import time
from typing import Any

__all__ = ["IDLE_POLL_S", "REPLY_POLL_S", "idle_wait_found", "main"]

# The SuperNode's idle wait in Flower 1.42, and the wait this entry point uses.
FLOWER_IDLE_POLL_S = 3
IDLE_POLL_S = 0.5
# Its wait for the ClientApp's reply, a look at its own memory, and the wait used.
FLOWER_REPLY_POLL_S = 0.5
REPLY_POLL_S = 0.1
SHORTER_WAITS = {FLOWER_IDLE_POLL_S: IDLE_POLL_S, FLOWER_REPLY_POLL_S: REPLY_POLL_S}


class _ShortIdleWait:
    """The ``time`` module that the SuperNode's loop uses, with shorter waits."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        """Sleep ``seconds``, shortened for the two waits this module replaces."""
        time.sleep(SHORTER_WAITS.get(seconds, seconds))


def idle_wait_found() -> bool:
    """Return whether the installed SuperNode still sleeps the wait shortened here."""
    from flwr.supernode import start_client_internal

    loop = inspect.getsource(start_client_internal.start_client_internal)
    push = inspect.getsource(start_client_internal._push_messages)
    return (
        f"time.sleep({FLOWER_IDLE_POLL_S})" in loop
        and f"time.sleep({FLOWER_REPLY_POLL_S})" in push
    )


def main() -> None:
    """Run ``flower-supernode`` with the arguments of this process."""
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli import flower_supernode

    start_client_internal.time = _ShortIdleWait()  # type: ignore[assignment]
    # The SuperNode's log is a file: times help, colour codes do not.
    for handler in logging.getLogger("flwr").handlers:
        if hasattr(handler, "timestamps") and hasattr(handler, "colored"):
            handler.timestamps = True
            handler.colored = False
    sys.argv[0] = "flower-supernode"
    sys.exit(flower_supernode())


if __name__ == "__main__":
    main()

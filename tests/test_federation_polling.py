"""How often the coordinator and the sites look for messages."""

from __future__ import annotations

import time

import pytest

from workbench.federation import supernode
from workbench.federation.server import REPLY_POLL_S, _next_wait
from workbench.federation.supernode import _ShortIdleWait, idle_wait_found


def test_installed_supernode_has_both_waits():
    # A Flower release that changes its SuperNode loop fails here, not silently.
    assert idle_wait_found()


@pytest.mark.parametrize(
    ("flower_wait", "low", "high"),
    [
        (supernode.FLOWER_IDLE_POLL_S, supernode.IDLE_POLL_S, 1.0),
        (supernode.FLOWER_REPLY_POLL_S, supernode.REPLY_POLL_S, 0.4),
        (0.05, 0.05, 0.4),  # any other wait keeps its length
    ],
)
def test_supernode_waits_shortened(flower_wait, low, high):
    clock = _ShortIdleWait()

    started = time.monotonic()
    clock.sleep(flower_wait)
    waited = time.monotonic() - started

    assert low <= waited < high
    assert clock.monotonic() > 0


@pytest.mark.parametrize(
    ("delay", "elapsed", "expected", "wait"),
    [
        (1.5, 4.0, None, 1.5),  # first exchange of its kind: back off
        (2.0, 4.0, 20.0, 2.0),  # far from the expected end
        (2.0, 15.5, 20.0, 0.5),  # wake up at 80 % of the expected time
        (2.0, 16.1, 20.0, REPLY_POLL_S),  # past it: look often
        (2.0, 25.0, 20.0, REPLY_POLL_S),  # late replies: keep looking often
    ],
)
def test_reply_wait_follows_the_previous_exchange(delay, elapsed, expected, wait):
    assert _next_wait(delay, elapsed, expected) == pytest.approx(wait)

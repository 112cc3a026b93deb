"""Crash points for the reliability tests.

With ``SHIMHUB_CRASH_AT=<point>`` in its environment, shimhub kills itself with
SIGKILL when it reaches that point, as a power cut or an OOM kill would. The
points sit between the steps of the RPCs that change the node, so the tests can
check that a restart completes or rolls back every half-done change. Unset (as
on every real node), a crash point costs one string comparison.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

#: The point this process dies at ("" for none), read once at startup.
CRASH_AT = os.environ.get("SHIMHUB_CRASH_AT", "")


def crash_point(name: str) -> None:
    """Die here if SHIMHUB_CRASH_AT names this point."""
    if name == CRASH_AT:
        log.critical("SHIMHUB_CRASH_AT=%s: killing shimhub", name)
        os.kill(os.getpid(), signal.SIGKILL)

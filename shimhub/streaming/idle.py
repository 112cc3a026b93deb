"""Idle sessions: a session with no traffic either way for the configured time is closed."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from shimhub.streaming.hangup import Hangup

log = logging.getLogger(__name__)


class Activity:
    """When a session last moved data, in either direction."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def touch(self) -> None:
        self.last = time.monotonic()

    def idle_for(self) -> float:
        return time.monotonic() - self.last


def close_when_idle(activity: Activity, timeout: float, close: Callable[[], None], ended: Hangup) -> None:
    """Call `close` once the session has been idle for `timeout` seconds (0: never); stop when it `ended`."""
    if timeout <= 0:
        return

    def watch() -> None:
        while not ended.wait(min(timeout / 4, 5.0)):
            if activity.idle_for() >= timeout:
                log.info("closing a streaming session idle for %.0f s", activity.idle_for())
                close()
                return

    threading.Thread(target=watch, name="streaming-idle", daemon=True).start()

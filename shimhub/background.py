"""Work that a request asks for but need not wait for: run on a thread of its own, requests coalesced."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Coalesced:
    """Runs `work` on its own thread after each `request()`; requests made while it runs make one more run."""

    def __init__(self, work: Callable[[], None], name: str) -> None:
        self._work = work
        self._name = name
        self._changed = threading.Condition()
        self._pending = False
        self._running = False
        threading.Thread(target=self._loop, name=name, daemon=True).start()

    def request(self) -> None:
        """Ask for a run soon (returns at once)."""
        with self._changed:
            self._pending = True
            self._changed.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no run is asked for or running; False if `timeout` passed first."""
        with self._changed:
            return self._changed.wait_for(lambda: not (self._pending or self._running), timeout)

    def _loop(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._pending)
                self._pending, self._running = False, True
            try:
                self._work()
            except Exception:
                log.exception("%s failed; it runs again at the next request", self._name)
            finally:
                with self._changed:
                    self._running = False
                    self._changed.notify_all()

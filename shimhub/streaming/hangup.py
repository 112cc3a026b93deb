"""Hangup: the moment a session's client goes away, and the work that has to stop then."""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)


class Hangup:
    """Set once, when a session's client has gone away or the session was torn down.

    Besides an Event's set / is_set / wait, work that must stop when the
    client goes away registers a callback for as long as it runs (`calls`),
    so that no thread waits for the whole session on its behalf.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._keys = itertools.count()

    def set(self) -> None:
        """Mark the hangup and run the callbacks registered now (on this thread)."""
        with self._lock:
            if self._event.is_set():
                return
            self._event.set()
            callbacks = list(self._callbacks.values())
            self._callbacks.clear()
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("stopping work after a hangup failed")

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)

    @contextlib.contextmanager
    def calls(self, callback: Callable[[], None]) -> Iterator[None]:
        """Within the block, `callback` runs (once) if the client goes away; at once if it already has."""
        key = next(self._keys)
        with self._lock:
            gone = self._event.is_set()
            if not gone:
                self._callbacks[key] = callback
        if gone:
            callback()
        try:
            yield
        finally:
            with self._lock:
                self._callbacks.pop(key, None)

"""One lock per pod or container, so unrelated objects never wait for each other."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class KeyedLocks:
    """Re-entrant locks created on demand, one per key."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, threading.RLock] = {}

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        """Hold the lock of `key` for the duration of the block."""
        with self._guard:
            lock = self._locks.setdefault(key, threading.RLock())
        with lock:
            yield

    def forget(self, key: str) -> None:
        """Drop the lock of a removed object."""
        with self._guard:
            self._locks.pop(key, None)

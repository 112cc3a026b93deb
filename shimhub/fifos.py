"""Reading the FIFOs a runtime writes processes' output to, for any number of processes, on one thread.

A runtime that holds a process's stdio itself (a containerd shim, a VM agent
relay) is given FIFO paths to write the output into. `OutputRelay.watch`
opens their read ends and calls a sink with every chunk, and with b"" once
the runtime closed its write end: the output is then complete.

Until the runtime has opened its write end a FIFO would read as closed, so
`watch` also holds a write end of its own until `Watch.writers_connected`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import stat
import threading
from collections.abc import Callable
from pathlib import Path

CHUNK = 64 * 1024
Sink = Callable[[bytes], None]
log = logging.getLogger(__name__)


def make(path: Path) -> str:
    """Create FIFO `path` (mode 0600) unless it exists; return it as a string."""
    try:
        os.mkfifo(path, 0o600)
    except FileExistsError:
        if not stat.S_ISFIFO(path.stat().st_mode):
            raise
    return str(path)


def write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to `fd`, however many writes it takes."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class Watch:
    """The FIFOs of one process being read."""

    def __init__(self, relay: OutputRelay, sinks: dict[int, Sink], holders: list[int]) -> None:
        self._relay = relay
        self._sinks = sinks
        self._holders = holders
        self._open = set(sinks)
        self._ended = threading.Event()
        if not sinks:
            self._ended.set()

    def writers_connected(self) -> None:
        """The runtime has opened its write ends: from now on, their closing ends the output."""
        holders, self._holders = self._holders, []
        for fd in holders:
            os.close(fd)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every FIFO reached its end; False if `timeout` passed first."""
        return self._ended.wait(timeout)

    def close(self) -> None:
        """Stop reading and close the FIFOs' read ends (what they still hold is dropped). Idempotent."""
        self.writers_connected()
        with self._relay.lock:
            for fd in list(self._open):
                self._finish(fd, notify=False)
        self._ended.set()

    def _read(self, fd: int) -> None:
        """Deliver one chunk of what FIFO `fd` holds (called when the relay saw it readable)."""
        if fd not in self._open:
            return  # finished since the relay looked
        try:
            data = os.read(fd, CHUNK)
        except BlockingIOError:
            return
        except OSError as exc:
            log.warning("reading a process's output failed: %s", exc)
            data = b""
        if data:
            self._sinks[fd](data)
        else:
            self._finish(fd, notify=True)

    def _finish(self, fd: int, notify: bool) -> None:
        self._open.discard(fd)
        self._relay.selector.unregister(fd)
        os.close(fd)
        if notify:
            self._sinks[fd](b"")
        if not self._open:
            self._ended.set()


class OutputRelay:
    """One thread reading every watched FIFO as data arrives."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.selector = selectors.DefaultSelector()
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.selector.register(self._wake_read, selectors.EVENT_READ, None)
        threading.Thread(target=self._run, name="output relay", daemon=True).start()

    def watch(self, fifos: dict[str, Sink]) -> Watch:
        """Read FIFO path -> sink for each entry until its writer closes it."""
        sinks: dict[int, Sink] = {}
        holders: list[int] = []
        try:
            for path, sink in fifos.items():
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                sinks[fd] = sink
                holders.append(os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC))
        except OSError:
            for fd in [*sinks, *holders]:
                os.close(fd)
            raise
        watch = Watch(self, sinks, holders)
        with self.lock:
            for fd in sinks:
                self.selector.register(fd, selectors.EVENT_READ, watch)
        os.write(self._wake_write, b"\0")
        return watch

    def _run(self) -> None:
        while True:
            ready = self.selector.select()
            with self.lock:
                for key, _events in ready:
                    if key.data is None:
                        with contextlib.suppress(BlockingIOError):
                            os.read(self._wake_read, 4096)
                        continue
                    watch: Watch = key.data
                    watch._read(key.fd)

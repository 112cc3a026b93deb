"""A container's output fanned out: every chunk into its CRI log and to each attached client.

Runtimes that receive a container's output themselves (from FIFOs, from a VM's
agent) write it here; an attached client reads its own `Attachment`. A client
that falls more than `ATTACH_BACKLOG` bytes behind misses output (the CRI log
has it all) rather than holding memory the node needs.
"""

from __future__ import annotations

import queue
import threading

from shimhub.crilog import LogFile
from shimhub.hooktypes import STDERR, STDOUT

#: Bytes an attached client may fall behind before newer output is dropped for it.
ATTACH_BACKLOG = 4 * 1024 * 1024
#: Bytes of an exec's output its streaming client may fall behind before newer output is dropped for it.
EXEC_BACKLOG = 64 * 1024 * 1024
#: What `Attachment.read` returns once the output ended.
END = (STDOUT, b"")
STREAM_NAMES = {STDOUT: "stdout", STDERR: "stderr"}


class Attachment:
    """One client's view of a container's output from the moment it attached."""

    def __init__(self, streams: int, backlog: int = ATTACH_BACKLOG) -> None:
        self._chunks: queue.SimpleQueue[tuple[int, bytes]] = queue.SimpleQueue()
        self._streams = streams
        self._backlog = backlog
        self._held = 0
        self._lock = threading.Lock()

    def put(self, stream: int, data: bytes) -> None:
        """Queue a chunk (b"": `stream` ended; never dropped) unless the client is too far behind."""
        if data:
            with self._lock:
                if self._held + len(data) > self._backlog:
                    return
                self._held += len(data)
        self._chunks.put((stream, data))

    def read(self) -> tuple[int, bytes]:
        """The next chunk, blocking; END once every stream ended."""
        while self._streams > 0:
            stream, data = self._chunks.get()
            if data:
                with self._lock:
                    self._held -= len(data)
                return stream, data
            self._streams -= 1
        return END

    def end(self) -> None:
        """End this client's output now (a reader blocked in `read` gets END)."""
        for _ in range(max(self._streams, 1)):
            self._chunks.put(END)


class OutputFanout:
    """A container's output streams (2, or 1 with a terminal) into its CRI log and to attached clients."""

    def __init__(self, log_path: str, streams: int = 2) -> None:
        self.log = LogFile(log_path)
        self.streams = streams
        self._open = streams
        self._ended = threading.Event()
        self._attached: list[Attachment] = []
        self._lock = threading.Lock()

    def write(self, stream: int, data: bytes) -> None:
        """A chunk of `stream`; b"" when the stream ended."""
        if data:
            self.log.write(STREAM_NAMES[stream], data)
        with self._lock:
            for attachment in self._attached:
                attachment.put(stream, data)
            if not data:
                self._open -= 1
                if self._open <= 0:
                    self._ended.set()

    def end(self) -> None:
        """Every stream ended at once (a source that reports one end for all)."""
        with self._lock:
            remaining, self._open = max(self._open, 0), 0
            for attachment in self._attached:
                for _ in range(remaining):
                    attachment.put(STDOUT, b"")
            self._ended.set()

    def wait_ended(self, timeout: float | None) -> bool:
        """Wait until every stream ended; False if `timeout` passed first."""
        return self._ended.wait(timeout)

    def attach(self) -> Attachment:
        """The output from now on, for one client (already ended if the output has)."""
        with self._lock:
            if self._ended.is_set():
                return Attachment(streams=0)
            attachment = Attachment(self.streams)
            self._attached.append(attachment)
            return attachment

    def detach(self, attachment: Attachment) -> None:
        """Stop delivering to `attachment` and end it."""
        with self._lock:
            if attachment in self._attached:
                self._attached.remove(attachment)
        attachment.end()

    def close(self) -> None:
        """End every attachment and close the log. Idempotent."""
        with self._lock:
            attached, self._attached = self._attached, []
        for attachment in attached:
            attachment.end()
        self.log.close()

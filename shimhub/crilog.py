"""Writing a container's log in the kubelet's CRI format.

Each line is ``<RFC 3339 time with nanoseconds> <stdout|stderr> <F|P> <text>``:
F ends a line the container wrote, P marks a piece of a line whose rest
follows in later lines. What a read returns is written at once (a trailing
piece without its newline as P), so nothing waits in memory for a newline.
"""

from __future__ import annotations

import threading
import time
from typing import BinaryIO

from shimhub import logpaths


def timestamp(ns: int) -> bytes:
    """`ns` since the epoch as RFC 3339 UTC with nine fractional digits."""
    seconds, fraction = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)).encode() + b".%09dZ" % fraction


def format_lines(stream: str, data: bytes, now_ns: int) -> bytes:
    """CRI log lines for `data` read from `stream` ("stdout" or "stderr")."""
    prefix = timestamp(now_ns) + b" " + stream.encode() + b" "
    lines = data.split(b"\n")
    out = [prefix + b"F " + line + b"\n" for line in lines[:-1]]
    if lines[-1]:
        out.append(prefix + b"P " + lines[-1] + b"\n")
    return b"".join(out)


class LogFile:
    """A container's CRI log file, appended to from any thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._file: BinaryIO | None = self._open()

    def _open(self) -> BinaryIO | None:
        if not self.path:
            return None
        return open(logpaths.open_for_append(self.path), "ab", buffering=0)

    def write(self, stream: str, data: bytes) -> None:
        """Append what the container wrote to `stream`."""
        if not data:
            return
        with self._lock:
            if self._file is not None:
                self._file.write(format_lines(stream, data, time.time_ns()))

    def reopen(self) -> None:
        """Start writing to a new file at the same path (the kubelet rotated the old one)."""
        with self._lock:
            if self._file is not None:
                self._file.close()
            self._file = self._open()

    def close(self) -> None:
        """Close the file. Idempotent."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

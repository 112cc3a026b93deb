"""The message protocol between shimhub and the agent in a VM: JSON objects in length-prefixed frames.

One byte stream (a virtio-serial port in the guest, a unix socket on the
host) carries every message both ways. A frame is the magic ``SHV1``, a 4-byte
big-endian length and that many bytes of a UTF-8 JSON object. A frame is at
most 32 KiB, what the guest's virtio-serial driver moves in one write; should
a host connection break off mid-frame, the next reader skips to the next magic.
Messages:

* host -> agent: ``{"id": N, "call": NAME, "args": {...}}`` and stream input
  ``{"stream": SID, "data": BASE64}`` / ``{"stream": SID, "close": true}``;
* agent -> host: ``{"id": N, "result": ...}`` or ``{"id": N, "error": {"code": CODE, "message": TEXT}}``,
  stream output ``{"stream": SID, "fd": 1|2, "data": BASE64}``,
  and ``{"stream": SID, "eof": true}`` once a process's output ended.

Standard library only: the agent imports this module inside the guest.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import threading
from typing import Any

MAGIC = b"SHV1"
#: Largest frame either side sends or accepts (the guest driver's largest write).
MAX_FRAME = 32 * 1024 - 8
#: Largest piece of stream data per frame (base64 grows it by a third).
CHUNK = 16 * 1024
_HEADER = struct.Struct(">4sI")


class ChannelClosed(Exception):
    """The other side went away (or sent something that is not a frame)."""


def encode(data: bytes) -> str:
    return base64.b64encode(data).decode()


def decode(text: str) -> bytes:
    return base64.b64decode(text)


class Channel:
    """Framed JSON messages over one file descriptor: `send` from any thread, `receive` from one."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._send_lock = threading.Lock()
        self._buffer = b""

    def send(self, message: dict[str, Any]) -> None:
        body = json.dumps(message, separators=(",", ":")).encode()
        if len(body) > MAX_FRAME:
            raise ValueError(f"message of {len(body)} bytes exceeds the {MAX_FRAME}-byte frame limit")
        frame = memoryview(_HEADER.pack(MAGIC, len(body)) + body)
        with self._send_lock:
            while frame:
                try:
                    written = os.write(self.fd, frame)
                except OSError as exc:
                    raise ChannelClosed(str(exc)) from None
                frame = frame[written:]

    def _read(self, size: int) -> bytes:
        while len(self._buffer) < size:
            try:
                data = os.read(self.fd, max(65536, size - len(self._buffer)))
            except OSError as exc:
                raise ChannelClosed(str(exc)) from None
            if not data:
                raise ChannelClosed("end of stream")
            self._buffer += data
        piece, self._buffer = self._buffer[:size], self._buffer[size:]
        return piece

    def reset(self) -> None:
        """Forget buffered input (the other side reconnected)."""
        self._buffer = b""

    def receive(self) -> dict[str, Any]:
        """The next message; ChannelClosed at the end of the stream or on a malformed frame."""
        header = self._read(_HEADER.size)
        while not header.startswith(MAGIC):  # the rest of a frame a broken-off connection left: skip ahead
            self._buffer = header[1:] + self._buffer
            header = self._read(_HEADER.size)
        _, size = _HEADER.unpack(header)
        if size > MAX_FRAME:
            raise ChannelClosed(f"frame of {size} bytes exceeds the {MAX_FRAME}-byte limit")
        try:
            message = json.loads(self._read(size))
        except ValueError as exc:
            raise ChannelClosed(f"malformed frame: {exc}") from None
        if not isinstance(message, dict):
            raise ChannelClosed("malformed frame: not an object")
        return message

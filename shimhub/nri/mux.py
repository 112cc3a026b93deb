"""Several connections over one stream socket, framed as NRI multiplexes them.

A frame is the connection's id and the length of the data (big-endian 32-bit
unsigned integers each), then the data. Connection ids need no opening: each
side uses the ones it knows (NRI: 1 for the plugin's service, 2 for the
runtime's). A connection's data is a byte stream to its reader; one that
takes more than `BUFFER_LIMIT` bytes unread ends the whole socket.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from types import TracebackType

from shimhub import ttrpc

HEADER = struct.Struct(">II")
#: The largest frame: one whole ttrpc message.
MAX_PAYLOAD = ttrpc.HEADER.size + ttrpc.MAX_DATA
#: Unread bytes one connection may hold.
BUFFER_LIMIT = 4 * MAX_PAYLOAD


class Connection:
    """One multiplexed connection: `sendall` and a blocking reader, as ttrpc needs."""

    def __init__(self, trunk: Trunk, connection_id: int) -> None:
        self.trunk = trunk
        self.id = connection_id
        self._buffer = bytearray()
        self._ended = False
        self._changed = threading.Condition()

    def sendall(self, data: bytes, /) -> None:
        self.trunk.send(self.id, data)

    def makefile(self, mode: str) -> Connection:
        """The connection itself, which reads as a binary stream."""
        return self

    def read(self, size: int) -> bytes:
        """`size` bytes, fewer only at the end of the connection."""
        with self._changed:
            self._changed.wait_for(lambda: len(self._buffer) >= size or self._ended)
            data = bytes(self._buffer[:size])
            del self._buffer[:size]
            return data

    def feed(self, data: bytes) -> bool:
        """Data for the reader; False when it overflows the buffer."""
        with self._changed:
            if len(self._buffer) + len(data) > BUFFER_LIMIT:
                return False
            self._buffer += data
            self._changed.notify_all()
        return True

    def end(self) -> None:
        """No more data: the reader gets what is left, then the end."""
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def shutdown(self, how: int, /) -> None:
        self.end()

    def close(self) -> None:
        self.end()

    def __enter__(self) -> Connection:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.end()


class Trunk:
    """The socket carrying the connections; `start` begins reading it."""

    def __init__(self, stream: socket.socket, name: str) -> None:
        self.socket = stream
        self.name = name
        self._write = threading.Lock()
        self._connections: dict[int, Connection] = {}
        self._closed = threading.Event()

    def open(self, connection_id: int) -> Connection:
        """Connection `connection_id` (the same object each time)."""
        if connection_id not in self._connections:
            self._connections[connection_id] = Connection(self, connection_id)
        return self._connections[connection_id]

    def start(self) -> None:
        """Read and sort incoming frames on a thread of its own until the socket ends."""
        threading.Thread(target=self._read, name=f"nri {self.name}", daemon=True).start()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def send(self, connection_id: int, data: bytes) -> None:
        """One frame per MAX_PAYLOAD bytes of `data`; OSError once the socket is gone."""
        with self._write:
            for start in range(0, max(len(data), 1), MAX_PAYLOAD):
                chunk = data[start : start + MAX_PAYLOAD]
                self.socket.sendall(HEADER.pack(connection_id, len(chunk)) + chunk)

    def _read(self) -> None:
        with contextlib.suppress(OSError), self.socket.makefile("rb") as stream:
            while len(header := stream.read(HEADER.size)) == HEADER.size:
                connection_id, length = HEADER.unpack(header)
                if length > MAX_PAYLOAD:
                    break  # not NRI's framing: the peer cannot be trusted further
                data = stream.read(length)
                if len(data) < length:
                    break
                connection = self._connections.get(connection_id)
                if connection is not None and not connection.feed(data):
                    break
        self.close()

    def close(self) -> None:
        """End every connection and the socket. Idempotent."""
        self._closed.set()
        for connection in list(self._connections.values()):
            connection.end()
        with contextlib.suppress(OSError):
            self.socket.shutdown(socket.SHUT_RDWR)
        self.socket.close()

"""Client sides of the Kubernetes streaming protocols, for the tests: SPDY/3.1 and WebSocket.

The SPDY client reuses shimhub's frame and header-block codec (pinned byte
for byte in test_spdy.py); the WebSocket client is the websockets library's.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
import time
from urllib.parse import urlsplit

from websockets.sync.client import connect as websocket_connect

from shimhub.streaming import spdy

TIMEOUT = 20.0


def upgrade_request(url: str, headers: dict[str, list[str]]) -> tuple[socket.socket, int, dict[str, str], bytes]:
    """Send a POST upgrade request; return the socket, status code, response headers and any body read."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=TIMEOUT)
    lines = [f"POST {parts.path}{'?' + parts.query if parts.query else ''} HTTP/1.1", f"Host: {parts.netloc}"]
    lines += [f"{name}: {value}" for name, values in headers.items() for value in values]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(4096)
        if not chunk:
            break
        received += chunk
    head, _, rest = received.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    answer = {name.strip().lower(): value.strip() for name, _, value in (h.partition(":") for h in header_lines)}
    return sock, int(status_line.split(" ")[1]), answer, rest


class ClientStream:
    def __init__(self, session: SpdyClient, stream_id: int) -> None:
        self.session, self.stream_id = session, stream_id
        self.inbox = spdy.Inbox()
        self.replied = threading.Event()

    def write(self, data: bytes) -> None:
        self.session.send(spdy.data_frame(self.stream_id, 0, data))

    def close(self) -> None:
        self.session.send(spdy.data_frame(self.stream_id, spdy.FLAG_FIN, b""))

    def read_all(self, timeout: float = TIMEOUT) -> bytes:
        deadline, chunks = time.monotonic() + timeout, []
        while chunk := self.inbox.read(timeout=max(0.01, deadline - time.monotonic())):
            chunks.append(chunk)
        return b"".join(chunks)

    def read_until(self, wanted: bytes, timeout: float = TIMEOUT) -> bytes:
        deadline, seen = time.monotonic() + timeout, b""
        while wanted not in seen:
            chunk = self.inbox.read(timeout=max(0.01, deadline - time.monotonic()))
            if not chunk:
                break
            seen += chunk
        return seen


class SpdyClient:
    """A SPDY/3.1 client session over an upgraded connection, as kubectl's would be."""

    def __init__(self, url: str, protocols: list[str]) -> None:
        headers = {"Connection": ["Upgrade"], "Upgrade": ["SPDY/3.1"], "X-Stream-Protocol-Version": protocols}
        self.sock, self.status, self.headers, _ = upgrade_request(url, headers)
        self.sock.settimeout(None)
        self.compressor = spdy.HeaderCompressor()
        self.decompressor = spdy.HeaderDecompressor()
        self.streams: dict[int, ClientStream] = {}
        self.next_id = 1
        self.lock = threading.Lock()
        self.goaway = threading.Event()
        if self.status == 101:
            threading.Thread(target=self._read, daemon=True).start()

    @property
    def protocol(self) -> str:
        return self.headers.get("x-stream-protocol-version", "")

    def send(self, frame: bytes) -> None:
        with self.lock:
            self.sock.sendall(frame)

    def open(self, headers: dict[str, str]) -> ClientStream:
        with self.lock:
            stream = ClientStream(self, self.next_id)
            self.streams[stream.stream_id] = stream
            block = self.compressor.compress({name: [value] for name, value in headers.items()})
            payload = struct.pack(">IIBB", stream.stream_id, 0, 0, 0) + block
            self.sock.sendall(spdy.control_frame(spdy.SYN_STREAM, 0, payload))
            self.next_id += 2
        assert stream.replied.wait(TIMEOUT), "no SYN_REPLY"
        return stream

    def _read(self) -> None:
        try:
            while True:
                frame = spdy.read_frame(self.sock)
                if frame.kind == 0:
                    stream = self.streams[frame.stream_id]
                    stream.inbox.feed(frame.payload)
                    if frame.flags & spdy.FLAG_FIN:
                        stream.inbox.end()
                elif frame.kind == spdy.SYN_REPLY:
                    stream_id = struct.unpack_from(">I", frame.payload)[0]
                    self.decompressor.decompress(frame.payload[4:])
                    self.streams[stream_id].replied.set()
                elif frame.kind == spdy.RST_STREAM:
                    self.streams[struct.unpack_from(">I", frame.payload)[0]].inbox.end()
                elif frame.kind == spdy.GOAWAY:
                    self.goaway.set()
        except (EOFError, OSError, spdy.ProtocolError):
            pass
        finally:
            for stream in self.streams.values():
                stream.inbox.end()
            self.sock.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


def exit_code(status_document: bytes) -> int:
    """The exit code a v4/v5 status document reports (0 for success)."""
    status = json.loads(status_document)
    if status["status"] == "Success":
        return 0
    causes = status.get("details", {}).get("causes", [])
    return next(int(cause["message"]) for cause in causes if cause.get("reason") == "ExitCode")


class WebSocketClient:
    """A channel.k8s.io WebSocket session, demultiplexed by channel."""

    def __init__(self, url: str, protocols: list[str]) -> None:
        self.connection = websocket_connect(
            url.replace("http://", "ws://", 1), subprotocols=protocols, open_timeout=TIMEOUT, max_size=None, legacy=True
        )
        self.protocol = self.connection.subprotocol
        self.received: dict[int, bytes] = {}
        self.closed = threading.Event()
        self.arrived = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for message in self.connection:
                data = message if isinstance(message, bytes) else message.encode()
                with self.arrived:
                    self.received[data[0]] = self.received.get(data[0], b"") + data[1:]
                    self.arrived.notify_all()
        except Exception:  # noqa: BLE001 - a closed connection ends the reading
            pass
        finally:
            with self.arrived:
                self.closed.set()
                self.arrived.notify_all()

    def send(self, channel: int, data: bytes) -> None:
        self.connection.send(bytes([channel]) + data)

    def wait_for(self, channel: int, wanted: bytes, timeout: float = TIMEOUT) -> bytes:
        with self.arrived:
            self.arrived.wait_for(
                lambda: wanted in self.received.get(channel, b"") or self.closed.is_set(), timeout=timeout
            )
            return self.received.get(channel, b"")

    def wait_closed(self, timeout: float = TIMEOUT) -> dict[int, bytes]:
        assert self.closed.wait(timeout), "the server did not end the session"
        return self.received

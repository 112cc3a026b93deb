"""SPDY/3.1 as the Kubernetes streaming protocols use it: frames, header blocks, sessions.

The kubelet, kubectl and crictl multiplex an exec, attach or port-forward
session over one upgraded HTTP connection with SPDY/3.1 (the draft spec's
framing, with zlib-compressed header blocks seeded with the spec's
dictionary). No maintained Python library speaks it, so this module keeps to
the part those clients use:

* the client opens streams (SYN_STREAM) and the server answers each with a
  SYN_REPLY; the server never opens streams of its own;
* DATA frames carry bytes, the FIN flag ends one direction of a stream;
* PING is echoed, RST_STREAM ends a stream, GOAWAY or EOF ends the session.

Flow control: the Kubernetes peers (moby/spdystream) neither send nor honour
WINDOW_UPDATE, so neither does this session; WINDOW_UPDATE and SETTINGS frames
are read and ignored.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import zlib
from collections import deque
from collections.abc import Callable, Mapping

from attrs import define, field

from shimhub.streaming.hangup import Hangup
from shimhub.streaming.idle import Activity

log = logging.getLogger(__name__)

VERSION = 3
SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS, PING, GOAWAY, HEADERS, WINDOW_UPDATE = 1, 2, 3, 4, 6, 7, 8, 9
FLAG_FIN = 0x01
#: RST_STREAM status codes used here.
PROTOCOL_ERROR, REFUSED_STREAM, CANCEL = 1, 3, 5
#: Largest frame payload accepted from a peer (the field allows 16 MiB - 1).
MAX_FRAME = 1 << 20
#: Largest decompressed header block: a client's real headers are a few hundred bytes, and ~1 KB of
#: compressed zeros would otherwise decompress to a megabyte each.
MAX_HEADER_BLOCK = 64 << 10
#: Most streams one session may hold; a stream past it is refused (exec uses five, a port forward two a port).
MAX_STREAMS = 128
#: Largest DATA payload sent in one frame.
MAX_DATA = 32 * 1024
#: Bytes a stream holds for a consumer that reads slower than the client sends.
INBOX_LIMIT = 1 << 20
#: Seconds a closing session waits for the peer to close its end.
CLOSE_GRACE = 5.0


def _dictionary() -> bytes:
    """The header-compression dictionary of the SPDY/3 draft (section 2.6.10.1)."""
    words = (
        "options", "head", "post", "put", "delete", "trace", "accept", "accept-charset", "accept-encoding",
        "accept-language", "accept-ranges", "age", "allow", "authorization", "cache-control", "connection",
        "content-base", "content-encoding", "content-language", "content-length", "content-location",
        "content-md5", "content-range", "content-type", "date", "etag", "expect", "expires", "from", "host",
        "if-match", "if-modified-since", "if-none-match", "if-range", "if-unmodified-since", "last-modified",
        "location", "max-forwards", "pragma", "proxy-authenticate", "proxy-authorization", "range", "referer",
        "retry-after", "server", "te", "trailer", "transfer-encoding", "upgrade", "user-agent", "vary", "via",
        "warning", "www-authenticate", "method", "get", "status", "200 OK", "version", "HTTP/1.1", "url",
        "public", "set-cookie", "keep-alive", "origin",
    )  # fmt: skip
    codes = "100 101 201 202 205 206 300 302 303 304 305 306 307 402 405 406 407 408 409 410 411 412 413 414 415 416"
    tail = (
        "".join(codes.split())
        + "417502504505"
        + "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request401 Unauthorized"
        "403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented503 Service Unavailable"
        "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT"
        "chunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,"
        "text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0."
    )
    return b"".join(struct.pack(">I", len(word)) + word.encode() for word in words) + tail.encode()


DICTIONARY = _dictionary()


class ProtocolError(Exception):
    """The peer sent something SPDY/3.1 does not allow."""


Headers = dict[str, list[str]]


def encode_headers(headers: Mapping[str, list[str]]) -> bytes:
    """An uncompressed name/value block; names are lower-cased, several values joined by NUL."""
    parts = [struct.pack(">I", len(headers))]
    for name, values in headers.items():
        key, value = name.lower().encode(), "\0".join(values).encode()
        parts += [struct.pack(">I", len(key)), key, struct.pack(">I", len(value)), value]
    return b"".join(parts)


def decode_headers(block: bytes) -> Headers:
    """Parse an uncompressed name/value block."""
    try:
        (count,) = struct.unpack_from(">I", block)
        offset, headers = 4, {}
        for _ in range(count):
            (size,) = struct.unpack_from(">I", block, offset)
            name = block[offset + 4 : offset + 4 + size].decode()
            offset += 4 + size
            (size,) = struct.unpack_from(">I", block, offset)
            value = block[offset + 4 : offset + 4 + size].decode()
            offset += 4 + size
            headers.setdefault(name, []).extend(value.split("\0"))
    except (struct.error, UnicodeDecodeError) as exc:
        raise ProtocolError(f"malformed header block: {exc}") from None
    if offset != len(block):
        raise ProtocolError("malformed header block: trailing bytes")
    return headers


class HeaderCompressor:
    """One direction's header compression: a zlib stream seeded with the dictionary, flushed per block."""

    def __init__(self) -> None:
        self._zlib = zlib.compressobj(zdict=DICTIONARY)

    def compress(self, headers: Mapping[str, list[str]]) -> bytes:
        return self._zlib.compress(encode_headers(headers)) + self._zlib.flush(zlib.Z_SYNC_FLUSH)


class HeaderDecompressor:
    """The other direction: one zlib stream across all blocks of the session."""

    def __init__(self) -> None:
        self._zlib = zlib.decompressobj(zdict=DICTIONARY)

    def decompress(self, data: bytes) -> Headers:
        try:
            block = self._zlib.decompress(data, MAX_HEADER_BLOCK)
        except zlib.error as exc:
            raise ProtocolError(f"header block does not decompress: {exc}") from None
        if self._zlib.unconsumed_tail:
            raise ProtocolError("header block too large")
        return decode_headers(block)


def control_frame(kind: int, flags: int, payload: bytes) -> bytes:
    """A control frame: control bit, version, type, flags, 24-bit length, payload."""
    return struct.pack(">HHI", 0x8000 | VERSION, kind, (flags << 24) | len(payload)) + payload


def data_frame(stream_id: int, flags: int, payload: bytes) -> bytes:
    """A DATA frame of `stream_id`."""
    return struct.pack(">II", stream_id & 0x7FFFFFFF, (flags << 24) | len(payload)) + payload


@define
class Frame:
    """One frame as read: `kind` is 0 for DATA, else the control frame type."""

    kind: int
    flags: int
    payload: bytes
    stream_id: int = 0


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    chunks, wanted = [], size
    while wanted:
        chunk = sock.recv(min(wanted, 1 << 16))
        if not chunk:
            if wanted == size:
                raise EOFError
            raise ProtocolError("connection closed inside a frame")
        chunks.append(chunk)
        wanted -= len(chunk)
    return b"".join(chunks)


def read_frame(sock: socket.socket) -> Frame:
    """Read one frame; EOFError at a clean end of the connection."""
    first, second = struct.unpack(">II", _read_exactly(sock, 8))
    flags, length = second >> 24, second & 0xFFFFFF
    if length > MAX_FRAME:
        raise ProtocolError(f"frame of {length} bytes is larger than {MAX_FRAME}")
    payload = _read_exactly(sock, length) if length else b""
    if first & 0x80000000:
        version, kind = (first >> 16) & 0x7FFF, first & 0xFFFF
        if version != VERSION:
            raise ProtocolError(f"SPDY version {version}; only 3 is spoken")
        return Frame(kind=kind, flags=flags, payload=payload)
    return Frame(kind=0, flags=flags, payload=payload, stream_id=first & 0x7FFFFFFF)


class Inbox:
    """Bytes a peer sent on one stream or channel, read in order; b"" once it ended.

    At most `limit` bytes wait unread: feeding more blocks the feeder (the
    connection's reading thread) until the consumer catches up, which pushes
    back on the client through TCP, as the Kubernetes implementations do.
    Once nobody will read any more, `abandon()` drops what waits and all
    that comes later, so the feeder never blocks on it.
    """

    def __init__(self, limit: int = INBOX_LIMIT) -> None:
        self.limit = limit
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._ended = False
        self._abandoned = False
        self._changed = threading.Condition()

    def feed(self, data: bytes) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self._size < self.limit or self._ended or self._abandoned)
            if data and not (self._ended or self._abandoned):
                self._chunks.append(data)
                self._size += len(data)
                self._changed.notify_all()

    def end(self) -> None:
        """No more data will come; what was fed can still be read."""
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def abandon(self) -> None:
        """Nobody will read: drop what waits and whatever comes."""
        with self._changed:
            self._abandoned = self._ended = True
            self._chunks.clear()
            self._size = 0
            self._changed.notify_all()

    @property
    def ended(self) -> bool:
        return self._ended

    def read(self, timeout: float | None = None) -> bytes:
        """The next chunk, b"" at the end; raises TimeoutError after `timeout` seconds without data."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._chunks or self._ended, timeout):
                raise TimeoutError("no data")
            if not self._chunks:
                return b""
            chunk = self._chunks.popleft()
            self._size -= len(chunk)
            self._changed.notify_all()
            return chunk


@define(eq=False)
class Stream:
    """One client-opened stream: what the client sent (`inbox`), and a way to answer."""

    session: Session
    stream_id: int
    headers: Headers
    inbox: Inbox = field(factory=Inbox)
    closed: bool = False

    def header(self, name: str) -> str:
        return (self.headers.get(name.lower()) or [""])[0]

    def write(self, data: bytes) -> None:
        """Send `data` to the client (nothing once this side is closed)."""
        for start in range(0, len(data), MAX_DATA):
            if self.closed:
                return
            self.session.send(data_frame(self.stream_id, 0, data[start : start + MAX_DATA]))

    def close(self) -> None:
        """End this side of the stream (FIN)."""
        if not self.closed:
            self.closed = True
            self.session.send(data_frame(self.stream_id, FLAG_FIN, b""))

    def reset(self, status: int = CANCEL) -> None:
        """Abort the stream (and forget it: the session holds at most MAX_STREAMS)."""
        self.closed = True
        self.inbox.end()
        self.session.streams.pop(self.stream_id, None)
        self.session.send(control_frame(RST_STREAM, 0, struct.pack(">II", self.stream_id, status)))


class Session:
    """The server side of one SPDY/3.1 connection.

    `serve()` reads frames until the connection ends, handing every new
    stream to `on_stream` (on the reading thread: it must not block); set it
    before serving.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.on_stream: Callable[[Stream], None] = lambda stream: stream.reset(REFUSED_STREAM)
        self.streams: dict[int, Stream] = {}
        self._send_lock = threading.Lock()
        self._compressor = HeaderCompressor()
        self._decompressor = HeaderDecompressor()
        self._last_stream = 0
        self._write_closed = False
        self.activity = Activity()
        #: Set once the peer's side has ended (EOF, GOAWAY, an error) or the session was torn down.
        self.closed = Hangup()

    def send(self, frame: bytes) -> None:
        with self._send_lock:
            self._send_locked(frame)

    def _send_locked(self, frame: bytes) -> None:
        if self._write_closed:
            return
        self.activity.touch()
        try:
            self.sock.sendall(frame)
        except OSError:
            self._write_closed = True  # the peer is gone; `serve` will notice

    def serve(self) -> None:
        """Read and dispatch frames until EOF, GOAWAY or an error; then end every stream."""
        try:
            while not self.closed.is_set():
                if not self._dispatch(read_frame(self.sock)):
                    break
        except EOFError:
            pass
        except (OSError, ProtocolError) as exc:
            if not self.closed.is_set():
                log.info("SPDY session ended: %s", exc)
        finally:
            for stream in list(self.streams.values()):
                stream.inbox.end()
            self.closed.set()

    def _dispatch(self, frame: Frame) -> bool:
        self.activity.touch()
        if frame.kind == 0:
            stream = self.streams.get(frame.stream_id)
            if stream is not None:
                stream.inbox.feed(frame.payload)
                if frame.flags & FLAG_FIN:
                    stream.inbox.end()
        elif frame.kind == SYN_STREAM:
            self._open(frame)
        elif frame.kind == RST_STREAM:
            if len(frame.payload) < 8:
                raise ProtocolError("RST_STREAM too short")
            stream_id = struct.unpack_from(">I", frame.payload)[0] & 0x7FFFFFFF
            stream = self.streams.pop(stream_id, None)
            if stream is not None:
                stream.closed = True
                stream.inbox.end()
        elif frame.kind == PING:
            self.send(control_frame(PING, 0, frame.payload))
        elif frame.kind == GOAWAY:
            return False
        elif frame.kind == HEADERS:
            if len(frame.payload) < 4:
                raise ProtocolError("HEADERS too short")
            self._decompressor.decompress(frame.payload[4:])  # keeps the zlib stream in step
        return True  # SETTINGS, WINDOW_UPDATE and unknown control frames are ignored

    def _open(self, frame: Frame) -> None:
        if len(frame.payload) < 10:
            raise ProtocolError("SYN_STREAM too short")
        stream_id = struct.unpack_from(">I", frame.payload)[0] & 0x7FFFFFFF
        headers = self._decompressor.decompress(frame.payload[10:])
        if stream_id % 2 == 0 or stream_id <= self._last_stream:
            self.send(control_frame(RST_STREAM, 0, struct.pack(">II", stream_id, PROTOCOL_ERROR)))
            return
        if len(self.streams) >= MAX_STREAMS:
            self._last_stream = stream_id
            self.send(control_frame(RST_STREAM, 0, struct.pack(">II", stream_id, REFUSED_STREAM)))
            return
        self._last_stream = stream_id
        stream = Stream(session=self, stream_id=stream_id, headers=headers)
        self.streams[stream_id] = stream
        with self._send_lock:  # the compressor's state must follow the order frames go out in
            self._send_locked(control_frame(SYN_REPLY, 0, struct.pack(">I", stream_id) + self._compressor.compress({})))
        if frame.flags & FLAG_FIN:
            stream.inbox.end()
        self.on_stream(stream)

    def close(self, grace: float = CLOSE_GRACE) -> None:
        """End the session: GOAWAY and our end of the connection, then up to `grace` seconds
        for the peer to close its end (closing with unread data would reset what is still in flight)."""
        for stream in list(self.streams.values()):
            stream.inbox.abandon()  # our side is done reading; a reader blocked feeding one goes on
        with self._send_lock:
            if not self._write_closed:
                self._send_locked(control_frame(GOAWAY, 0, struct.pack(">II", self._last_stream, 0)))
                self._write_closed = True
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_WR)
        if not self.closed.wait(grace):
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)

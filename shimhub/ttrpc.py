"""A ttrpc client: the small RPC protocol containerd shims serve on a unix socket.

A frame is a 10-byte header (data length and stream id as big-endian uint32,
then a message type byte and a flags byte) followed by at most 4 MiB of data.
A call is a Request frame on a new odd stream id carrying a ``Request``
message; the server answers with one Response frame on the same stream id
carrying a ``Response`` whose status uses the gRPC codes. Calls are
multiplexed: one connection serves any number of threads at once, and a
long call (a shim's Wait) does not hold up short ones.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import struct
import threading
from collections.abc import Callable
from typing import BinaryIO, Protocol, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from shimhub import errors
from shimhub_proto.ttrpc import ttrpc_pb2

HEADER = struct.Struct(">IIBB")
MAX_DATA = 4 << 20
#: Message types (ttrpc's Data frames, 3, belong to streaming calls, which are not made).
REQUEST, RESPONSE = 1, 2
CONNECT_TIMEOUT = 5.0
M = TypeVar("M", bound=Message)


def encode_frame(stream_id: int, kind: int, data: bytes, flags: int = 0) -> bytes:
    """One frame: header and data."""
    if len(data) > MAX_DATA:
        raise errors.InvalidArgument(f"ttrpc message of {len(data)} bytes exceeds the {MAX_DATA}-byte limit")
    return HEADER.pack(len(data), stream_id, kind, flags) + data


def read_frame(stream: BinaryIO) -> tuple[int, int, bytes] | None:
    """The next frame as (stream id, message type, data); None at the end of the connection.

    Raises ValueError for a frame over the size limit: the connection cannot be trusted further.
    """
    header = stream.read(HEADER.size)
    if len(header) < HEADER.size:
        return None
    length, stream_id, kind, _flags = HEADER.unpack(header)
    if length > MAX_DATA:
        raise ValueError(f"the peer sent a {length}-byte frame, over the {MAX_DATA}-byte limit")
    data = stream.read(length)
    return (stream_id, kind, data) if len(data) == length else None


def socket_path(address: str) -> str:
    """The socket path of a shim address: "unix:///run/x.sock", "/run/x.sock", or "unix://@name" (abstract)."""
    path = address.removeprefix("unix://")
    return "\0" + path[1:] if path.startswith("@") else path


class _Pending:
    """A call waiting for its Response frame."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.data = b""
        self.failure: errors.ShimhubError | None = None


class Connection(Protocol):
    """What a ttrpc peer needs of its connection: a socket, or one connection of a multiplexed socket."""

    def sendall(self, data: bytes, /) -> None: ...

    def makefile(self, mode: str) -> BinaryIO: ...

    def shutdown(self, how: int, /) -> None: ...

    def close(self) -> None: ...


class Client:
    """One connection to a ttrpc server; `call` may be used from many threads.

    `connection`, when given, is used instead of connecting to `address` (which then only names it).
    """

    def __init__(
        self, address: str, connect_timeout: float = CONNECT_TIMEOUT, connection: Connection | None = None
    ) -> None:
        self.address = address
        if connection is None:
            unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            unix.settimeout(connect_timeout)
            try:
                unix.connect(socket_path(address))
            except OSError as exc:
                unix.close()
                raise errors.Unavailable(f"cannot connect to {address}: {exc.strerror or exc}") from None
            unix.settimeout(None)
            connection = unix
        self._socket: Connection = connection
        self._ids = itertools.count(1, 2)
        self._lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._lost: str = ""
        threading.Thread(target=self._read, name=f"ttrpc {address}", daemon=True).start()

    @property
    def connected(self) -> bool:
        """False once the server closed the connection (or `close` was called)."""
        return not self._lost

    def call(self, service: str, method: str, request: Message, response: type[M], timeout: float | None) -> M:
        """Call `service`/`method` and return its decoded result; raise the matching ShimhubError on failure.

        `timeout` None waits as long as the call takes (or until the connection is lost).
        """
        envelope = ttrpc_pb2.Request(
            service=service,
            method=method,
            payload=request.SerializeToString(),
            timeout_nano=int(timeout * 1e9) if timeout is not None else 0,
        )
        pending = _Pending()
        with self._lock:
            if self._lost:
                raise errors.Unavailable(f"{method}: {self._lost}")
            stream_id = next(self._ids)
            self._pending[stream_id] = pending
            try:
                self._socket.sendall(encode_frame(stream_id, REQUEST, envelope.SerializeToString()))
            except OSError as exc:
                del self._pending[stream_id]
                raise errors.Unavailable(f"{method}: cannot send to {self.address}: {exc.strerror or exc}") from None
        if not pending.done.wait(timeout):
            with self._lock:
                self._pending.pop(stream_id, None)
            raise errors.DeadlineExceeded(f"{method}: no answer from {self.address} within {timeout:g} s")
        if pending.failure is not None:
            raise pending.failure
        result = ttrpc_pb2.Response.FromString(pending.data)
        if result.status.code != grpc.StatusCode.OK.value[0]:
            raise errors.from_status(result.status.code, f"{method}: {result.status.message}")
        return response.FromString(result.payload)

    def close(self) -> None:
        """Close the connection; calls in flight fail with UNAVAILABLE. Idempotent."""
        self._fail("connection closed")
        with contextlib.suppress(OSError):
            self._socket.shutdown(socket.SHUT_RDWR)
        self._socket.close()

    def _read(self) -> None:
        reason = "the server closed the connection"
        try:
            with self._socket.makefile("rb") as stream:
                while (frame := read_frame(stream)) is not None:
                    stream_id, kind, data = frame
                    if kind != RESPONSE:
                        continue  # no streaming calls are made: stray data frames are ignored
                    with self._lock:
                        pending = self._pending.pop(stream_id, None)
                    if pending is not None:
                        pending.data = data
                        pending.done.set()
        except (OSError, ValueError) as exc:
            reason = f"connection lost: {exc}"
        self._fail(reason)

    def _fail(self, reason: str) -> None:
        with self._lock:
            if not self._lost:
                self._lost = f"{self.address}: {reason}"
            pending, self._pending = self._pending, {}
        for waiting in pending.values():
            waiting.failure = errors.Unavailable(self._lost)
            waiting.done.set()


def serve(connection: Connection, answer: Callable[[ttrpc_pb2.Request], ttrpc_pb2.Response]) -> None:
    """Answer the Request frames arriving on `connection` with `answer`'s Responses, one at a time, until the
    peer closes it. A request that cannot be decoded is answered INVALID_ARGUMENT."""
    with connection.makefile("rb") as stream, contextlib.suppress(OSError, ValueError):
        while (frame := read_frame(stream)) is not None:
            stream_id, kind, data = frame
            if kind != REQUEST:
                continue
            try:
                response = answer(ttrpc_pb2.Request.FromString(data))
            except DecodeError:
                response = failure(grpc.StatusCode.INVALID_ARGUMENT, "the request cannot be decoded")
            connection.sendall(encode_frame(stream_id, RESPONSE, response.SerializeToString()))


def failure(code: grpc.StatusCode, message: str) -> ttrpc_pb2.Response:
    """A Response carrying an error status."""
    response = ttrpc_pb2.Response()
    response.status.code = code.value[0]
    response.status.message = message
    return response


class Receiver:
    """A ttrpc server that answers every call with an empty success, handing each request to `handle`.

    Shims publish their task events to such an endpoint (containerd's events
    service); a shim whose events find no listener keeps retrying them, and
    lingers after its Shutdown until it gives up.
    """

    def __init__(self, address: str, handle: Callable[[ttrpc_pb2.Request], None]) -> None:
        self.path = socket_path(address)
        self._handle = handle
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if not self.path.startswith("\0"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self._socket.bind(self.path)
        if not self.path.startswith("\0"):
            os.chmod(self.path, 0o600)
        self._socket.listen(64)
        threading.Thread(target=self._accept, name=f"ttrpc receiver {address}", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._socket.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(connection,), name="ttrpc receiver", daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        def acknowledge(request: ttrpc_pb2.Request) -> ttrpc_pb2.Response:
            self._handle(request)
            return ttrpc_pb2.Response()

        with connection:
            serve(connection, acknowledge)

    def close(self) -> None:
        """Stop accepting connections and remove the socket."""
        self._socket.close()
        if not self.path.startswith("\0"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

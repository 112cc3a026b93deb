"""The Kubernetes port-forward protocol over SPDY streams or WebSocket channels.

Every forwarded connection is a pair: a data stream carrying the bytes both
ways and an error stream on which a failure (nothing listening, say) is
reported as text. Over SPDY the client opens a pair per connection, matched
by the requestID header and naming the port in the port header; over a
WebSocket the ports come from the URL's ``port`` parameters, channel 2i
carries data for the i-th port and 2i+1 its errors, and each channel starts
with the port number as two little-endian bytes.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
from collections.abc import Callable
from urllib.parse import parse_qs

from shimhub.errors import InvalidArgument, ShimhubError
from shimhub.streaming.hangup import Hangup
from shimhub.streaming.remotecommand import Writer
from shimhub.streaming.requests import PortForwardRequest
from shimhub.streaming.spdy import Inbox, Stream
from shimhub.streaming.websocket import ChannelConnection

log = logging.getLogger(__name__)

SPDY_PROTOCOLS = ("portforward.k8s.io",)
WEBSOCKET_PROTOCOLS = ("v4.channel.k8s.io", "v4.base64.channel.k8s.io", "channel.k8s.io", "base64.channel.k8s.io")
CHUNK = 32 * 1024


def is_port(port: int) -> bool:
    """Whether `port` is a TCP port number (1-65535)."""
    return 0 < port < 65536


def parse_port(text: str) -> int:
    """A TCP port from a header or query value."""
    if not text.strip().isdigit() or not is_port(int(text)):
        raise InvalidArgument(f"{text!r} is not a TCP port (1-65535)")
    return int(text)


def check_port(request: PortForwardRequest, port: int) -> None:
    if request.ports and port not in request.ports:
        raise InvalidArgument(f"port {port} was not part of the PortForward request ({request.ports})")


def forward(
    port: int,
    *,
    inbox: Inbox,
    data: Writer,
    error: Writer,
    connect: Callable[[int], socket.socket],
    hangup: Hangup,
) -> None:
    """Relay one connection to `port` until both directions end or the client goes away."""
    try:
        target = connect(port)
    except ShimhubError as exc:
        error.write(exc.message.encode())
        data.close()
        error.close()
        return
    closed = threading.Event()

    def shut() -> None:
        closed.set()
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_RDWR)

    def upstream() -> None:
        try:
            while chunk := inbox.read():
                target.sendall(chunk)
            target.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    threading.Thread(target=upstream, name="portforward-up", daemon=True).start()
    try:
        with hangup.calls(shut):
            while chunk := target.recv(CHUNK):
                data.write(chunk)
    except OSError as exc:
        if not closed.is_set():
            error.write(f"reading from port {port} failed: {exc.strerror}".encode())
    finally:
        inbox.abandon()  # the client may keep sending; nobody forwards it any more
        target.close()
        data.close()
        error.close()


class SpdyPairs:
    """Matches the data and error streams a SPDY client opens into connections, and forwards each."""

    def __init__(self, request: PortForwardRequest, hangup: Hangup) -> None:
        self.request = request
        self.hangup = hangup
        self.pending: dict[str, dict[str, Stream]] = {}
        self.lock = threading.Lock()

    def add(self, stream: Stream) -> None:
        """Take a new stream; start forwarding once its pair is complete."""
        kind = stream.header("streamType")
        request_id = stream.header("requestID") or str(stream.stream_id - (2 if kind == "data" else 0))
        if kind not in ("data", "error"):
            stream.reset()
            return
        with self.lock:
            pair = self.pending.setdefault(request_id, {})
            pair[kind] = stream
            if len(pair) < 2:
                return
            del self.pending[request_id]
        threading.Thread(target=self._forward, args=(pair,), name="portforward", daemon=True).start()

    def _forward(self, pair: dict[str, Stream]) -> None:
        try:
            port = parse_port(pair["data"].header("port"))
            check_port(self.request, port)
        except ShimhubError as exc:
            pair["error"].write(exc.message.encode())
            pair["error"].close()
            pair["data"].close()
            return
        forward(
            port,
            inbox=pair["data"].inbox,
            data=pair["data"],
            error=pair["error"],
            connect=self.request.connect,
            hangup=self.hangup,
        )


def websocket_ports(request: PortForwardRequest, query: str) -> list[int]:
    """The ports of a WebSocket session: the URL's port parameters, else the request's."""
    values = parse_qs(query).get("port", [])
    ports = [parse_port(part) for value in values for part in value.split(",")] or list(request.ports)
    if not ports:
        raise InvalidArgument("port forwarding needs a port: add ?port=N to the URL")
    for port in ports:
        check_port(request, port)
    return ports


def websocket_inputs(ports: list[int]) -> list[int]:
    """The channels a WebSocket client writes to: the data channel of each port."""
    return [2 * index for index in range(len(ports))]


def run_websocket(connection: ChannelConnection, request: PortForwardRequest, ports: list[int], hangup: Hangup) -> None:
    """Forward each port on its channel pair until every one has ended."""
    workers = []
    for index, port in enumerate(ports):
        data, error = connection.writer(2 * index), connection.writer(2 * index + 1)
        prefix = struct.pack("<H", port)
        data.write(prefix)
        error.write(prefix)
        worker = threading.Thread(
            target=forward,
            args=(port,),
            kwargs={
                "inbox": connection.inboxes[2 * index],
                "data": data,
                "error": error,
                "connect": request.connect,
                "hangup": hangup,
            },
            name="portforward",
            daemon=True,
        )
        worker.start()
        workers.append(worker)
    for worker in workers:
        worker.join()

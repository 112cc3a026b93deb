"""StreamingServer: the HTTP endpoint behind the URLs that Exec, Attach and PortForward return.

A client connects to ``/exec/<token>``, ``/attach/<token>`` or
``/portforward/<token>`` and asks for an upgrade: ``Upgrade: SPDY/3.1`` (with
the protocol versions it speaks in ``X-Stream-Protocol-Version``) or
``Upgrade: websocket`` (with subprotocols). An unknown, used or expired token
gets 404. Each connection has a thread of its own.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
import time
from urllib.parse import urlsplit

from websockets.exceptions import NegotiationError
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.sync.server import Server, ServerConnection

from shimhub.config import StreamingConfig, split_address
from shimhub.errors import ConfigError, ShimhubError
from shimhub.streaming import portforward, remotecommand
from shimhub.streaming.hangup import Hangup
from shimhub.streaming.idle import close_when_idle
from shimhub.streaming.requests import CommandRequest, RequestCache, StreamRequest
from shimhub.streaming.spdy import Session, Stream
from shimhub.streaming.websocket import ChannelConnection

log = logging.getLogger(__name__)

MAX_HEAD = 16 * 1024
HEAD_TIMEOUT = 10.0
MAX_CONNECTIONS = 256
#: Connections whose request head has not come yet (no valid URL shown): a budget of their own, the oldest
#: closed when a new one comes, so dribbling clients cannot keep holders of valid URLs out.
MAX_PENDING = 64
PATHS = ("exec", "attach", "portforward")


class BadRequest(Exception):
    """A request refused with an HTTP status before any upgrade."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


class HttpHead:
    """The request line and headers of an upgrade request."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        lines = raw.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise BadRequest(400, "Bad Request", "not an HTTP/1.1 request")
        self.method, target = parts[0], urlsplit(parts[1])
        self.path, self.query = target.path, target.query
        self.headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if colon:
                self.headers.append((name.strip().lower(), value.strip()))

    def values(self, name: str) -> list[str]:
        """Every value of header `name`, comma-separated lists split."""
        return [part.strip() for key, value in self.headers if key == name for part in value.split(",") if part.strip()]

    def has_token(self, name: str, token: str) -> bool:
        return token.lower() in (value.lower() for value in self.values(name))


def _read_head(sock: socket.socket) -> HttpHead:
    """Peek at the request head without consuming it (a WebSocket handshake reads it again).

    The whole head must come within HEAD_TIMEOUT. Between peeks the socket's low-water mark is one
    byte past what is buffered, so each peek sleeps in the kernel until more arrives: a client
    dribbling its head costs no polling.
    """
    deadline = time.monotonic() + HEAD_TIMEOUT
    buffered = 0
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BadRequest(408, "Request Timeout", "request head not received in time")
            sock.settimeout(remaining)
            try:
                data = sock.recv(MAX_HEAD, socket.MSG_PEEK)
            except TimeoutError:
                raise BadRequest(408, "Request Timeout", "request head not received in time") from None
            end = data.find(b"\r\n\r\n")
            if end >= 0:
                return HttpHead(data[: end + 4])
            if len(data) <= buffered:  # no more than before, past the low-water mark: the client has closed
                raise BadRequest(400, "Bad Request", "connection closed before the request ended")
            buffered = len(data)
            if len(data) >= MAX_HEAD:
                raise BadRequest(431, "Request Header Fields Too Large", "request head too large")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, len(data) + 1)
    finally:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)


def _respond(sock: socket.socket, code: int, reason: str, message: str) -> None:
    body = (message + "\n").encode()
    head = (
        f"HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    with contextlib.suppress(OSError):
        sock.sendall(head.encode() + body)


def _negotiate(offered: list[str], supported: tuple[str, ...]) -> str:
    """The first of the client's protocols that is supported; "" when it offered none."""
    if not offered:
        return ""
    for protocol in offered:
        if protocol in supported:
            return protocol
    served = ", ".join(supported)
    raise BadRequest(
        403, "Forbidden", f"no common protocol: the client offered {', '.join(offered)}; {served} are served"
    )


class StreamingServer:
    """Serves streaming sessions on `config.address` and issues the URLs that lead to them."""

    def __init__(self, config: StreamingConfig) -> None:
        self.config = config
        self.requests = RequestCache(ttl=config.token_ttl)
        host, port = split_address(config.address) or ("127.0.0.1", 0)
        try:
            listener = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        except OSError as exc:
            raise ConfigError(f"streaming.address {config.address}: cannot listen there: {exc.strerror}") from None
        bound_host, bound_port = listener.getsockname()[:2]
        if bound_host in ("0.0.0.0", "::"):
            bound_host = "127.0.0.1" if bound_host == "0.0.0.0" else "::1"
        self.base_url = f"http://{f'[{bound_host}]' if ':' in bound_host else bound_host}:{bound_port}"
        self.server = Server(listener, self._handle, logger=log)
        self.thread = threading.Thread(target=self.server.serve_forever, name="streaming-server", daemon=True)
        self.sessions: set[Session] = set()
        self.lock = threading.Lock()
        #: Sessions served at once (their URL was valid); one more is answered 503 and closed.
        self.connections = threading.BoundedSemaphore(MAX_CONNECTIONS)
        #: Connections still sending their request head, oldest first.
        self.pending: dict[socket.socket, None] = {}

    def start(self) -> None:
        self.thread.start()
        log.info("streaming server on %s", self.base_url)

    def stop(self) -> None:
        """Stop accepting, end every session, wait for their threads."""
        with self.lock:
            sessions = list(self.sessions)
        for session in sessions:
            session.close()
        self.server.shutdown()

    def url(self, kind: str, request: StreamRequest) -> str:
        """A single-use URL for `request`; `kind` is "exec", "attach" or "portforward"."""
        return f"{self.base_url}/{kind}/{self.requests.put(kind, request)}"

    # -- one connection ------------------------------------------------------------------

    def _wait_for_head(self, sock: socket.socket) -> HttpHead:
        """The request head, read under the budget of connections still sending theirs."""
        with self.lock:
            if len(self.pending) >= MAX_PENDING:
                oldest = next(iter(self.pending))
                del self.pending[oldest]
                with contextlib.suppress(OSError):
                    oldest.shutdown(socket.SHUT_RDWR)  # its read ends; its thread answers and closes it
            self.pending[sock] = None
        try:
            return _read_head(sock)
        finally:
            with self.lock:
                self.pending.pop(sock, None)

    def _handle(self, sock: socket.socket, _address: object) -> None:
        admitted = False
        try:
            head = self._wait_for_head(sock)
            admitted = self.connections.acquire(blocking=False)
            if not admitted:
                raise BadRequest(503, "Service Unavailable", f"{MAX_CONNECTIONS} streaming sessions are open")
            websocket, spdy = head.has_token("upgrade", "websocket"), head.has_token("upgrade", "SPDY/3.1")
            if not (websocket or spdy):  # checked first: a plain GET must not use up the URL
                raise BadRequest(400, "Bad Request", "streaming needs an upgrade to SPDY/3.1 or websocket")
            kind, _, token = head.path.strip("/").partition("/")
            request = self.requests.take(kind, token) if kind in PATHS and token and "/" not in token else None
            if request is None:
                raise BadRequest(404, "Not Found", "unknown or expired streaming URL; ask for a new one")
            if websocket:
                self._serve_websocket(sock, head, request)
            else:
                self._serve_spdy(sock, head, request)
        except BadRequest as exc:
            _respond(sock, exc.code, exc.reason, exc.message)
        except ShimhubError as exc:
            _respond(sock, 400, "Bad Request", exc.message)
        except OSError as exc:
            log.info("streaming connection failed: %s", exc)
        except Exception:
            log.exception("streaming session failed")
        finally:
            if admitted:
                self.connections.release()
            sock.close()
            with self.server.lock:
                self.server.handler_threads.discard(threading.current_thread())

    def _serve_websocket(self, sock: socket.socket, head: HttpHead, request: StreamRequest) -> None:
        if isinstance(request, CommandRequest):
            supported, ports = remotecommand.WEBSOCKET_PROTOCOLS, []
        else:
            supported, ports = portforward.WEBSOCKET_PROTOCOLS, portforward.websocket_ports(request, head.query)

        def select(_protocol: ServerProtocol, offered: list[str]) -> str | None:
            try:
                return _negotiate(list(offered), supported) or None
            except BadRequest as exc:
                raise NegotiationError(exc.message) from None

        sock.settimeout(None)
        connection = ServerConnection(sock, ServerProtocol(select_subprotocol=select), self.server, ping_interval=None)
        connection.handshake(server_header=None, timeout=HEAD_TIMEOUT)
        if connection.protocol.state is not State.OPEN:
            return
        protocol = connection.subprotocol or ""
        if isinstance(request, CommandRequest):
            inputs = remotecommand.websocket_inputs(request)
        else:
            inputs = portforward.websocket_inputs(ports)
        channels = ChannelConnection(connection, protocol, inputs)
        hangup = Hangup()
        with self.server.lock:  # so that stopping the server closes it
            self.server.all_connections.add(connection)

        def receive() -> None:
            channels.serve()
            hangup.set()

        threading.Thread(target=receive, name="websocket-receive", daemon=True).start()
        close_when_idle(channels.activity, self.config.idle_timeout, channels.close, hangup)
        try:
            if isinstance(request, CommandRequest):
                streams = remotecommand.websocket_streams(channels, request, protocol)
                remotecommand.run(request, streams, hangup)
            else:
                portforward.run_websocket(channels, request, ports, hangup)
        finally:
            connection.close()
            hangup.set()
            with self.server.lock:
                self.server.all_connections.discard(connection)

    def _serve_spdy(self, sock: socket.socket, head: HttpHead, request: StreamRequest) -> None:
        supported = remotecommand.SPDY_PROTOCOLS if isinstance(request, CommandRequest) else portforward.SPDY_PROTOCOLS
        protocol = _negotiate(head.values("x-stream-protocol-version"), supported)
        if not head.has_token("connection", "upgrade"):
            raise BadRequest(400, "Bad Request", "unable to upgrade: missing upgrade headers in request")
        sock.recv(len(head.raw))  # the head was only peeked at
        sock.settimeout(None)
        answer = "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
        if protocol:
            answer += f"X-Stream-Protocol-Version: {protocol}\r\n"
        sock.sendall((answer + "\r\n").encode())
        session = Session(sock)
        if isinstance(request, CommandRequest):
            arrived: queue.SimpleQueue[Stream] = queue.SimpleQueue()
            session.on_stream = arrived.put
        else:
            session.on_stream = portforward.SpdyPairs(request, session.closed).add
        with self.lock:
            self.sessions.add(session)
        reader = threading.Thread(target=session.serve, name="spdy-session", daemon=True)
        reader.start()
        close_when_idle(session.activity, self.config.idle_timeout, session.close, session.closed)
        try:
            if isinstance(request, CommandRequest):
                streams = self._await_streams(arrived, request, protocol)
                if streams is not None:
                    remotecommand.run(request, remotecommand.spdy_streams(streams, protocol), session.closed)
            else:
                session.closed.wait()
        finally:
            session.close()
            reader.join()
            with self.lock:
                self.sessions.discard(session)

    def _await_streams(
        self, arrived: queue.SimpleQueue[Stream], request: CommandRequest, protocol: str
    ) -> dict[str, Stream] | None:
        """The streams the client opens for this session, by type; None if they do not all come in time."""
        wanted = remotecommand.expected_spdy_streams(request, protocol)
        found: dict[str, Stream] = {}
        deadline = time.monotonic() + self.config.stream_creation_timeout
        while not wanted <= found.keys():
            try:
                stream = arrived.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                log.info("%s session: the client opened %s of %s in time", request.kind, sorted(found), sorted(wanted))
                return None
            found[stream.header("streamType")] = stream
        return found

"""Pending streaming requests, each behind a single-use token that expires."""

from __future__ import annotations

import secrets
import socket
import threading
import time
from collections.abc import Callable

from attrs import define, field

from shimhub.errors import ResourceExhausted
from shimhub.hooktypes import StreamedProcess

#: Requests waiting for their client at once; more are refused until some are used or expire.
MAX_PENDING = 1000


@define
class CommandRequest:
    """An Exec or Attach waiting for its client."""

    #: "exec" or "attach".
    kind: str
    stdin: bool
    stdout: bool
    stderr: bool
    tty: bool
    #: Starts the process (exec) or connects to the container (attach) when the client arrives.
    open_process: Callable[[], StreamedProcess]


@define
class PortForwardRequest:
    """A PortForward waiting for its client."""

    #: Ports the kubelet named (a WebSocket client without ?port= gets these); empty = any.
    ports: list[int]
    #: Connects to a port inside the pod.
    connect: Callable[[int], socket.socket]


StreamRequest = CommandRequest | PortForwardRequest


@define
class _Entry:
    kind: str
    request: StreamRequest
    expires: float


@define
class RequestCache:
    """Tokens for pending requests: unguessable, used once, valid for `ttl` seconds."""

    ttl: float
    limit: int = MAX_PENDING
    clock: Callable[[], float] = time.monotonic
    _entries: dict[str, _Entry] = field(factory=dict, init=False)
    _lock: threading.Lock = field(factory=threading.Lock, init=False)

    def put(self, kind: str, request: StreamRequest) -> str:
        """Store `request` for URLs of `kind`; return its token. ResourceExhausted when too many are pending."""
        with self._lock:
            self._expire()
            if len(self._entries) >= self.limit:
                raise ResourceExhausted(
                    f"{self.limit} streaming requests are waiting for their clients; try again shortly"
                )
            token = secrets.token_urlsafe(24)
            self._entries[token] = _Entry(kind, request, self.clock() + self.ttl)
            return token

    def take(self, kind: str, token: str) -> StreamRequest | None:
        """The request behind `token`, removing it; None for an unknown, used or expired token, or one of
        another kind (which stays usable for its own)."""
        with self._lock:
            entry = self._entries.get(token)
            if entry is None or entry.kind != kind:
                return None
            del self._entries[token]
        return entry.request if entry.expires >= self.clock() else None

    def _expire(self) -> None:
        now = self.clock()
        for token in [token for token, entry in self._entries.items() if entry.expires < now]:
            del self._entries[token]

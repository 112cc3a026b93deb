"""shimhub's end of the channel to a VM's agent: calls, and the output streams of the VM's processes."""

from __future__ import annotations

import contextlib
import itertools
import logging
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shimhub.sdk import DeadlineExceeded, Unavailable, error_from_status
from shimhub_vm import channel, qemu

#: Receives one stream's output: (1 for stdout / 2 for stderr, data); b"" once the output ended.
OutputSink = Callable[[int, bytes], None]
CONNECT_TIMEOUT = 5.0
#: How many calls measure the guest clock's offset (the quickest one counts).
CLOCK_SAMPLES = 3
LOG = logging.getLogger(__name__)


class _Pending:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.reply: dict[str, Any] = {}


class AgentClient:
    """One connection to a VM's agent through QEMU's socket for the agent's port (in the VM's `directory`);
    usable from many threads."""

    def __init__(self, directory: Path, call_timeout: float) -> None:
        self.directory = directory
        self.call_timeout = call_timeout
        self._socket: socket.socket | None = None
        self._channel: channel.Channel | None = None
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._sinks: dict[str, OutputSink] = {}
        self._lost = ""

    def connect(self, timeout: float) -> None:
        """Connect and wait until the agent answers (it may still be booting), at most `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._open()
                self.call("ping", timeout=max(0.1, min(2.0, deadline - time.monotonic())))
                break
            except (Unavailable, DeadlineExceeded) as exc:
                if time.monotonic() >= deadline:
                    raise DeadlineExceeded(f"the VM's agent did not answer within {timeout:g} s: {exc}") from None
                time.sleep(0.1)
        self._set_guest_clock()

    def _set_guest_clock(self) -> None:
        """Step the guest's wall clock to the host's, so the times the agent reports (a container's start and
        finish) compare with the host's. The offset is measured as NTP does, from the quickest of a few calls:
        its error is at most half that call's round trip."""
        samples = []
        for _ in range(CLOCK_SAMPLES):
            sent = time.time_ns()
            guest = self.call("clock")["now_ns"]
            received = time.time_ns()
            samples.append((received - sent, (sent + received) // 2 - guest))
        round_trip, step = min(samples)
        self.call("clock", step_ns=step)
        LOG.debug(
            "VM %s: guest clock stepped by %+.1f ms (within %.1f ms)",
            self.directory.name[:12],
            step / 1e6,
            round_trip / 2e6,
        )

    def _open(self) -> None:
        with self._lock:
            if self._channel is not None and not self._lost:
                return
            try:
                connection = qemu.connect(self.directory, qemu.AGENT_SOCKET, CONNECT_TIMEOUT)
            except OSError as exc:
                raise Unavailable(f"cannot reach the VM's agent: {exc.strerror or exc}") from None
            self._socket, self._channel, self._lost = connection, channel.Channel(connection.fileno()), ""
            threading.Thread(
                target=self._read, args=(self._channel,), name=f"agent {self.directory.name[:12]}", daemon=True
            ).start()

    @property
    def connected(self) -> bool:
        return self._channel is not None and not self._lost

    def call(self, name: str, timeout: float | None = None, **args: Any) -> Any:
        """Call the agent; its result, or the ShimhubError matching the agent's error code.

        A call that itself waits (an argument `seconds`) gets that much longer to answer.
        """
        self._open()
        timeout = (self.call_timeout if timeout is None else timeout) + float(args.get("seconds", 0))
        pending = _Pending()
        with self._lock:
            call_id = next(self._ids)
            self._pending[call_id] = pending
            current = self._channel
        assert current is not None
        try:
            current.send({"id": call_id, "call": name, "args": args})
        except channel.ChannelClosed as exc:
            self._fail(current, str(exc))
        if not pending.done.wait(timeout):
            with self._lock:
                self._pending.pop(call_id, None)
            raise DeadlineExceeded(f"the VM's agent did not answer {name} within {timeout:g} s")
        reply = pending.reply
        if "error" in reply:
            raise error_from_status(reply["error"].get("code", ""), f"in the VM: {reply['error'].get('message', '')}")
        return reply.get("result")

    def subscribe(self, sid: str, sink: OutputSink) -> None:
        """Deliver stream `sid`'s output to `sink` (subscribe before the process starts writing)."""
        with self._lock:
            self._sinks[sid] = sink

    def unsubscribe(self, sid: str) -> None:
        with self._lock:
            self._sinks.pop(sid, None)

    def write_input(self, sid: str, data: bytes) -> None:
        """Send `data` to stream `sid`'s input (a process's stdin or a forwarded port)."""
        self._open()
        assert self._channel is not None
        for start in range(0, len(data), channel.CHUNK):
            self._channel.send({"stream": sid, "data": channel.encode(data[start : start + channel.CHUNK])})

    def close_input(self, sid: str) -> None:
        with contextlib.suppress(Unavailable, channel.ChannelClosed):
            self._open()
            assert self._channel is not None
            self._channel.send({"stream": sid, "close": True})

    def close(self) -> None:
        """Drop the connection (the VM keeps running). Idempotent."""
        with self._lock:
            current = self._channel
        if current is not None:
            self._fail(current, "connection closed")

    def _read(self, current: channel.Channel) -> None:
        reason = "the VM closed the connection"
        try:
            while True:
                message = current.receive()
                if "stream" in message:
                    sink = self._sinks.get(message["stream"])
                    if sink is not None:
                        sink(
                            message.get("fd", 1), b"" if message.get("eof") else channel.decode(message.get("data", ""))
                        )
                elif "id" in message:
                    with self._lock:
                        pending = self._pending.pop(message["id"], None)
                    if pending is not None:
                        pending.reply = message
                        pending.done.set()
        except channel.ChannelClosed as exc:
            reason = f"the connection to the VM broke: {exc}"
        finally:
            self._fail(current, reason)

    def _fail(self, current: channel.Channel, reason: str) -> None:
        """Fail every call in flight on `current` with UNAVAILABLE, end every stream, forget the connection."""
        with self._lock:
            if current is not self._channel or self._lost:
                return
            self._lost = reason
            pending, self._pending = self._pending, {}
            sinks = dict(self._sinks)
            connection = self._socket
        for waiting in pending.values():
            waiting.reply = {"error": {"code": "UNAVAILABLE", "message": reason}}
            waiting.done.set()
        for sink in sinks.values():  # whoever reads a stream learns it ended
            sink(1, b"")
        if connection is not None:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
            connection.close()

"""The Kubernetes remote-command protocol (exec and attach) over SPDY streams or WebSocket channels.

The client's stdin and terminal sizes come in, the process's stdout and
stderr go out, and the outcome goes out on the error stream: a metav1.Status
JSON document in the v4 and v5 protocols (exit code in its details), only
the error text in older ones.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol

from attrs import define

from shimhub.errors import ShimhubError
from shimhub.hooktypes import STDERR, StreamedProcess
from shimhub.streaming.hangup import Hangup
from shimhub.streaming.requests import CommandRequest
from shimhub.streaming.spdy import Inbox, Stream
from shimhub.streaming.websocket import ChannelConnection

log = logging.getLogger(__name__)
#: Longest terminal-size document kept while it is incomplete.
MAX_RESIZE_DOCUMENT = 4096

#: Versions offered over SPDY, newest first (the X-Stream-Protocol-Version header).
SPDY_PROTOCOLS = ("v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io", "channel.k8s.io")
#: WebSocket subprotocols, newest first.
WEBSOCKET_PROTOCOLS = (
    "v5.channel.k8s.io",
    "v4.channel.k8s.io",
    "v4.base64.channel.k8s.io",
    "channel.k8s.io",
    "base64.channel.k8s.io",
)
#: WebSocket channel numbers.
STDIN_CHANNEL, STDOUT_CHANNEL, STDERR_CHANNEL, ERROR_CHANNEL, RESIZE_CHANNEL = range(5)


class Writer(Protocol):
    """Where output goes: a SPDY stream or a WebSocket channel."""

    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...


@define
class CommandStreams:
    """One session's streams, whichever transport carries them."""

    error: Writer
    #: Whether the error stream carries a metav1.Status document (v4 and later).
    status_json: bool
    stdin: Inbox | None = None
    stdout: Writer | None = None
    stderr: Writer | None = None
    resize: Inbox | None = None


def status(exit_code: int | None = 0, message: str = "") -> dict[str, Any]:
    """The metav1.Status for an outcome: success, a non-zero exit code, or an error `message`."""
    if not message and not exit_code:
        return {"metadata": {}, "status": "Success"}
    if exit_code:
        return {
            "metadata": {},
            "status": "Failure",
            "message": f"command terminated with non-zero exit code: exit status {exit_code}",
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": str(exit_code)}]},
        }
    return {
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": "InternalError",
        "details": {"causes": [{"message": message}]},
        "code": 500,
    }


def _write_status(streams: CommandStreams, outcome: dict[str, Any]) -> None:
    if streams.status_json:
        streams.error.write(json.dumps(outcome).encode())
    elif outcome["status"] != "Success":
        streams.error.write(outcome["message"].encode())


def _pump_stdin(inbox: Inbox, process: StreamedProcess) -> None:
    while chunk := inbox.read():
        process.write_input(chunk)
    process.close_input()


def _pump_resizes(inbox: Inbox, process: StreamedProcess) -> None:
    """Apply each {"Width": w, "Height": h} document as it arrives (they may share or split chunks).

    An unfinished document longer than MAX_RESIZE_DOCUMENT is dropped: real ones are about 30 bytes.
    """
    decoder, pending = json.JSONDecoder(), ""
    while chunk := inbox.read():
        pending += chunk.decode(errors="replace")
        while pending.strip():
            try:
                size, end = decoder.raw_decode(pending.lstrip())
            except ValueError:
                break  # an incomplete document: wait for the rest
            pending = pending.lstrip()[end:]
            if isinstance(size, dict):
                try:
                    process.resize(int(size.get("Width", 0)), int(size.get("Height", 0)))
                except (TypeError, ValueError, OSError) as exc:
                    log.info("ignoring terminal size %r: %s", size, exc)
        if len(pending) > MAX_RESIZE_DOCUMENT:
            log.info("dropping %d bytes of a terminal-size document that does not end", len(pending))
            pending = ""


def _background(target: Callable[..., None], *args: object) -> None:
    threading.Thread(target=target, args=args, name=target.__name__, daemon=True).start()


def run(request: CommandRequest, streams: CommandStreams, hangup: Hangup) -> None:
    """Run one exec or attach session to its end, or until the client hangs up."""
    try:
        process = request.open_process()
    except ShimhubError as exc:
        _write_status(streams, status(message=exc.message))
        return

    def client_left() -> None:
        """A client that leaves ends the session: closing the process wakes the output loop."""
        log.info("%s session: the client went away; ending it", request.kind)
        process.close()

    try:
        with hangup.calls(client_left):
            if streams.stdin is not None:
                _background(_pump_stdin, streams.stdin, process)
            if streams.resize is not None:
                _background(_pump_resizes, streams.resize, process)
            while True:
                source, data = process.read_output()
                if not data:
                    break
                target = streams.stderr if source == STDERR else streams.stdout
                if target is not None:
                    target.write(data)
            exit_code = process.wait()
        _write_status(streams, status(exit_code or 0))
    except OSError as exc:
        _write_status(streams, status(message=f"{request.kind} failed: {exc}"))
    finally:
        process.close()
        for inbox in (streams.stdin, streams.resize):
            if inbox is not None:
                inbox.abandon()
        for writer in (streams.stdout, streams.stderr, streams.error):
            if writer is not None:
                writer.close()


# -- SPDY --------------------------------------------------------------------------------


def expected_spdy_streams(request: CommandRequest, protocol: str) -> set[str]:
    """The stream types a client opens for `request` under `protocol` (the streamType header)."""
    version = int(protocol[1]) if protocol.startswith("v") else 1
    wanted = {"error"}
    if request.stdin:
        wanted.add("stdin")
    if request.stdout:
        wanted.add("stdout")
    if request.tty:
        if version >= 3:
            wanted.add("resize")
    elif request.stderr:
        wanted.add("stderr")
    return wanted


def spdy_streams(by_type: dict[str, Stream], protocol: str) -> CommandStreams:
    """The session's streams from the SPDY streams the client opened, keyed by streamType."""
    return CommandStreams(
        error=by_type["error"],
        status_json=protocol.startswith("v4."),
        stdin=by_type["stdin"].inbox if "stdin" in by_type else None,
        stdout=by_type.get("stdout"),
        stderr=by_type.get("stderr"),
        resize=by_type["resize"].inbox if "resize" in by_type else None,
    )


# -- WebSocket ------------------------------------------------------------------------------


def websocket_inputs(request: CommandRequest) -> list[int]:
    """The channels a WebSocket client writes to."""
    return [STDIN_CHANNEL, RESIZE_CHANNEL] if request.stdin else [RESIZE_CHANNEL]


def websocket_streams(connection: ChannelConnection, request: CommandRequest, protocol: str) -> CommandStreams:
    """The session's streams as WebSocket channels; the first output channel gets an empty message
    so the client knows the session is up."""
    streams = CommandStreams(
        error=connection.writer(ERROR_CHANNEL),
        status_json=protocol.startswith(("v4.", "v5.")),
        stdin=connection.inboxes.get(STDIN_CHANNEL),
        stdout=connection.writer(STDOUT_CHANNEL) if request.stdout else None,
        stderr=connection.writer(STDERR_CHANNEL) if request.stderr and not request.tty else None,
        resize=connection.inboxes[RESIZE_CHANNEL] if request.tty else None,
    )
    (streams.stdout or streams.stderr or streams.error).write(b"")
    return streams

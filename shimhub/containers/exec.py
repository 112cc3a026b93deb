"""ExecSync, and the Exec and Attach requests a streaming client completes."""

from __future__ import annotations

import logging
import threading

from shimhub.containers.base import ContainerBase
from shimhub.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument
from shimhub.hooktypes import STDERR, STDOUT, ExecResult, StreamedProcess
from shimhub.streaming.requests import CommandRequest
from shimhub_proto.cri.v1 import api_pb2 as cri

log = logging.getLogger(__name__)

#: Most output ExecSync returns per stream; the rest is dropped (as the CRI asks). Both streams together
#: stay under the 16 MiB message limit of the kubelet's CRI client.
EXEC_OUTPUT_LIMIT = 8 * 1024 * 1024 - 64 * 1024


def collect(process: StreamedProcess, timeout: float | None, limit: int) -> ExecResult:
    """Read an exec'd process's output until it ends, keeping at most `limit` bytes a stream; its exit code.

    Past `timeout` seconds the process is closed (killed, and gone when close returns) and the result
    says it timed out.
    """
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        process.close()

    timer = threading.Timer(timeout, expire) if timeout is not None else None
    if timer is not None:
        timer.daemon = True
    kept = {STDOUT: bytearray(), STDERR: bytearray()}
    code: int | None = None
    try:
        if timer is not None:
            timer.start()
        while True:
            stream, data = process.read_output()
            if not data:
                break
            room = limit - len(kept[stream])
            if room > 0:
                kept[stream] += data[:room]
        if not expired.is_set():
            code = process.wait()
    except Exception:
        if not expired.is_set():  # a process closed for its timeout may be gone, or half gone, already
            raise
    finally:
        if timer is not None:
            timer.cancel()
            if expired.is_set():
                timer.join()  # the kill under way on the timer's thread ends before the answer goes out
        process.close()
    if expired.is_set():
        return ExecResult(exit_code=-1, timed_out=True)
    return ExecResult(exit_code=code or 0, stdout=bytes(kept[STDOUT]), stderr=bytes(kept[STDERR]))


def _check_streams(request: cri.ExecRequest | cri.AttachRequest) -> None:
    if not (request.stdin or request.stdout or request.stderr):
        raise InvalidArgument("one of stdin, stdout and stderr must be requested")
    if request.tty and request.stderr:
        raise InvalidArgument("tty and stderr cannot both be requested: a terminal has a single output")


class Exec(ContainerBase):
    """ExecSync, Exec and Attach."""

    def exec_sync(self, container_id: str, cmd: list[str], timeout: int) -> ExecResult:
        """Run `cmd` in a running container and wait for it; past `timeout` it is killed, with all it started,
        before DEADLINE_EXCEEDED is answered. Output past EXEC_OUTPUT_LIMIT per stream is read and dropped."""
        if not cmd:
            raise InvalidArgument("ExecSync needs a command")
        sandbox, record, plugin = self._running(container_id)
        seconds = float(timeout) if timeout > 0 else None
        if plugin.implements("runtime_exec"):
            process = plugin.call(
                "runtime_exec", sandbox=sandbox, container=record, cmd=list(cmd), tty=False, stdin=False
            )
            result = collect(process, seconds, EXEC_OUTPUT_LIMIT)
        else:
            result = plugin.call("runtime_exec_sync", sandbox=sandbox, container=record, cmd=list(cmd), timeout=seconds)
        if result.timed_out:
            raise DeadlineExceeded(f"command {cmd[0][:64]!r} in container {record.id} timed out after {timeout} s")
        return ExecResult(
            exit_code=result.exit_code,
            stdout=result.stdout[:EXEC_OUTPUT_LIMIT],
            stderr=result.stderr[:EXEC_OUTPUT_LIMIT],
        )

    def exec_request(self, request: cri.ExecRequest) -> CommandRequest:
        """Check an Exec and prepare what runs when its streaming client connects."""
        if not request.cmd:
            raise InvalidArgument("Exec needs a command")
        _check_streams(request)
        _, record, plugin = self._running(request.container_id)
        plugin.require_hook("runtime_exec")
        cmd = list(request.cmd)

        def open_process() -> StreamedProcess:
            sandbox, container, runtime = self._running(record.id)  # it may have exited since
            return runtime.call(
                "runtime_exec", sandbox=sandbox, container=container, cmd=cmd, tty=request.tty, stdin=request.stdin
            )

        return CommandRequest("exec", request.stdin, request.stdout, request.stderr, request.tty, open_process)

    def attach_request(self, request: cri.AttachRequest) -> CommandRequest:
        """Check an Attach and prepare the connection made when its streaming client connects."""
        _check_streams(request)
        _, record, plugin = self._running(request.container_id)
        plugin.require_hook("runtime_attach")
        if request.stdin and not record.container_config().stdin:
            raise FailedPrecondition(f"container {record.id} was created without stdin: there is no input to attach")

        def open_process() -> StreamedProcess:
            sandbox, container, runtime = self._running(record.id)
            return runtime.call("runtime_attach", sandbox=sandbox, container=container, stdin=request.stdin)

        return CommandRequest("attach", request.stdin, request.stdout, request.stderr, request.tty, open_process)

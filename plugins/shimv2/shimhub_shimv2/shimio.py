"""The stdio of processes run by a containerd shim: FIFOs that shimhub reads and writes.

A container's output goes to its CRI log (and to attached clients); an exec's
output goes to the streaming client or to ExecSync's result.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import threading
from collections.abc import Callable
from pathlib import Path

from shimhub.sdk import EXEC_BACKLOG, STDERR, STDOUT, Attachment, OutputFanout, ShimhubError, fifos, processes
from shimhub_proto.containerd.task.v2 import shim_pb2 as task
from shimhub_shimv2.shim import PROCESS_TYPE, TaskClient, json_any

KILL_WAIT = 10.0


class _Stdio:
    """A process's FIFOs in `directory`: output read through the relay into sinks, stdin held open for writing.

    With `tty` there is no stderr: a terminal carries both outputs.
    """

    def __init__(
        self, directory: Path, relay: fifos.OutputRelay, sink: Callable[[int], fifos.Sink], *, stdin: bool, tty: bool
    ) -> None:
        directory.mkdir(mode=0o700, exist_ok=True)
        wanted = {"stdin": stdin, "stdout": True, "stderr": not tty}
        #: Stream name -> FIFO path ("" when the stream is not wanted), as the shim is told.
        self.paths = {name: fifos.make(directory / name) if on else "" for name, on in wanted.items()}
        #: How many output streams there are.
        self.streams = 1 if tty else 2
        self._lock = threading.Lock()
        self._stdin = os.open(self.paths["stdin"], os.O_RDWR | os.O_CLOEXEC) if stdin else -1
        outputs = {self.paths["stdout"]: sink(STDOUT)}
        if self.paths["stderr"]:
            outputs[self.paths["stderr"]] = sink(STDERR)
        self.watch = relay.watch(outputs)

    def write_input(self, data: bytes) -> None:
        if self._stdin >= 0:
            fifos.write_all(self._stdin, data)

    def close_input(self) -> bool:
        """Close the held stdin; False if it was closed already (or never open)."""
        with self._lock:
            fd, self._stdin = self._stdin, -1
        if fd < 0:
            return False
        os.close(fd)
        return True


class ContainerOutput:
    """A container's stdout/stderr FIFOs fanned out into its CRI log and to attached clients; its held stdin."""

    def __init__(self, relay: fifos.OutputRelay, bundle: Path, log_path: str, stdin: bool, tty: bool) -> None:
        self.fanout = OutputFanout(log_path, streams=1 if tty else 2)
        self._settled = False
        self.stdio = _Stdio(bundle / "io", relay, self._sink, stdin=stdin, tty=tty)

    def _sink(self, stream: int) -> fifos.Sink:
        return functools.partial(self.fanout.write, stream)

    def settle(self, timeout: float) -> None:
        """Once the container exited: wait, the first time only, up to `timeout` for its last output."""
        if not self._settled:
            self.stdio.watch.wait(timeout)
            self._settled = True

    def close(self) -> None:
        """Stop copying, end attached clients' output and close the log. Idempotent."""
        self.stdio.close_input()
        self.stdio.watch.close()
        self.fanout.close()


class AttachedContainer:
    """A client attached to a running container (a StreamedProcess)."""

    def __init__(self, client: TaskClient, container_id: str, output: ContainerOutput, stdin_once: bool) -> None:
        self._client = client
        self._id = container_id
        self._output = output
        self._stdin_once = stdin_once
        self._attachment = output.fanout.attach()

    def read_output(self) -> tuple[int, bytes]:
        return self._attachment.read()

    def write_input(self, data: bytes) -> None:
        self._output.stdio.write_input(data)

    def close_input(self) -> None:
        if self._stdin_once:
            self._output.stdio.close_input()
            self._client.close_stdin(self._id)

    def resize(self, width: int, height: int) -> None:
        self._client.resize(self._id, "", width, height)

    def wait(self) -> int | None:
        return None

    def close(self) -> None:
        self._output.fanout.detach(self._attachment)


class ShimExec:
    """A command run in a container through the shim's Exec (a StreamedProcess)."""

    def __init__(
        self,
        client: TaskClient,
        relay: fifos.OutputRelay,
        container_id: str,
        *,
        process: dict[str, object],
        directory: Path,
        tty: bool,
        stdin: bool,
    ) -> None:
        self._client = client
        self._container = container_id
        self.exec_id = directory.name
        self._directory = directory
        self._lock = threading.Lock()
        self._closed = False
        self._exit: int | None = None
        self._created = False
        self._pid = 0
        self._output = Attachment(streams=1 if tty else 2, backlog=EXEC_BACKLOG)
        self._stdio = _Stdio(
            directory, relay, lambda stream: functools.partial(self._output.put, stream), stdin=stdin, tty=tty
        )
        paths = self._stdio.paths
        try:
            client.exec(
                task.ExecProcessRequest(
                    id=container_id,
                    exec_id=self.exec_id,
                    terminal=tty,
                    stdin=paths["stdin"],
                    stdout=paths["stdout"],
                    stderr=paths["stderr"],
                    spec=json_any(PROCESS_TYPE, {**process, "terminal": tty}),
                )
            )
            self._created = True
            self._pid = client.start(container_id, self.exec_id)
        except BaseException:
            self.close()
            raise
        finally:
            self._stdio.watch.writers_connected()

    def read_output(self) -> tuple[int, bytes]:
        return self._output.read()

    def write_input(self, data: bytes) -> None:
        self._stdio.write_input(data)

    def close_input(self) -> None:
        if self._stdio.close_input():
            self._client.close_stdin(self._container, self.exec_id)

    def resize(self, width: int, height: int) -> None:
        self._client.resize(self._container, self.exec_id, width, height)

    def wait(self) -> int | None:
        if self._exit is None:
            self._exit = self._client.wait(self._container, self.exec_id, timeout=None).exit_status
        return self._exit

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        steps = [self.close_input]
        if self._created:
            if self._exit is None:
                if self._pid:  # what the command started too: the shim's kill reaches only the command
                    processes.kill_tree(self._pid, KILL_WAIT)
                steps += [
                    lambda: self._client.kill(self._container, signal.SIGKILL, self.exec_id),
                    lambda: self._client.wait(self._container, self.exec_id, timeout=KILL_WAIT),
                ]
            steps.append(lambda: self._client.delete(self._container, self.exec_id))
        for step in steps:
            with contextlib.suppress(ShimhubError):  # the exec, or the whole container, is gone already
                step()
        self._stdio.watch.close()
        shutil.rmtree(self._directory, ignore_errors=True)

"""containerd "shim v2" binaries: starting them, cleaning up after them, and their Task service over ttrpc.

A shim is started once per task with ``<binary> ... -id ID start`` in the
task's bundle directory; it prints the ttrpc address it serves (plain, or
as JSON with an "address" key) and leaves a daemon running. A shim that
groups tasks (runc-v2 and kata-v2 group by the pod's sandbox-id annotation)
prints the address of the pod's running daemon instead, so one pod has one
shim. ``<binary> ... -id ID -bundle DIR delete`` cleans up a task whose shim
is gone.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import TypeVar

from google.protobuf.any_pb2 import Any as AnyMessage
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message

from shimhub.sdk import PluginFailed, ttrpc
from shimhub_proto.containerd.task.v2 import shim_pb2 as task

SERVICE = "containerd.task.v2.Task"
START_TIMEOUT = 30.0
LOG = "log"
#: Type URLs of the JSON-encoded OCI values the Task service takes.
PROCESS_TYPE = "types.containerd.io/opencontainers/runtime-spec/1/Process"
RESOURCES_TYPE = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
M = TypeVar("M", bound=Message)


def json_any(type_url: str, value: object) -> AnyMessage:
    """An Any carrying a JSON document, as containerd encodes OCI spec values."""
    return AnyMessage(type_url=type_url, value=json.dumps(value).encode())


class Binary:
    """A shim binary and the arguments every invocation of it takes."""

    def __init__(self, path: str, namespace: str, address: str, events_address: str) -> None:
        self.path = path
        self.namespace = namespace
        #: The -address a shim is given: it names no socket, but seeds the names of the shims' sockets.
        self.address = address
        #: Where shims publish task events (TTRPC_ADDRESS); shimhub accepts and drops them
        #: there: it asks the shim for states instead.
        self.events_address = events_address

    def _command(self, *args: str, bundle: Path, timeout: float) -> bytes:
        argv = [self.path, "-namespace", self.namespace, "-address", self.address, *args]
        environment = {**os.environ, "TTRPC_ADDRESS": self.events_address}
        try:
            done = subprocess.run(
                argv,
                cwd=bundle,
                env=environment,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PluginFailed(f"{os.path.basename(self.path)} {args[-1]}: {exc}") from exc
        if done.returncode != 0:
            message = done.stderr.decode(errors="replace").strip() or f"exit code {done.returncode}"
            raise PluginFailed(f"{os.path.basename(self.path)} {args[-1]} failed: {message}")
        return done.stdout

    def start(self, task_id: str, bundle: Path, timeout: float = START_TIMEOUT) -> str:
        """Start the shim of task `task_id` (or find its group's shim); return its ttrpc address.

        The shim logs to the file "log" in the bundle (containerd makes that a FIFO;
        a plain file keeps a shim from blocking on its log while shimhub is down).
        """
        (bundle / LOG).touch()
        printed = self._command("-id", task_id, "start", bundle=bundle, timeout=timeout)
        text = printed.decode(errors="replace").strip()
        if text.startswith("{"):
            try:
                document = json.loads(text)
            except ValueError:
                document = {}
            if document.get("protocol", "ttrpc") != "ttrpc":
                raise PluginFailed(f"{self.path} speaks {document['protocol']!r}; shimhub speaks ttrpc only")
            text = str(document.get("address", ""))
        if not text:
            raise PluginFailed(f"{self.path} start printed no address")
        return text

    def delete(self, task_id: str, bundle: Path, timeout: float) -> task.DeleteResponse:
        """Clean up after task `task_id` whose shim is gone (kills what is left of it)."""
        printed = self._command("-id", task_id, "-bundle", str(bundle), "delete", bundle=bundle, timeout=timeout)
        return task.DeleteResponse.FromString(printed)


class TaskClient:
    """The Task service of one shim; every call has a deadline, so a hung shim cannot hang shimhub."""

    def __init__(self, address: str, timeout: float) -> None:
        self.address = address
        self.timeout = timeout
        self._client = ttrpc.Client(address)

    @property
    def connected(self) -> bool:
        return self._client.connected

    def close(self) -> None:
        self._client.close()

    def _call(self, method: str, request: Message, response: type[M]) -> M:
        return self._client.call(SERVICE, method, request, response, self.timeout)

    def create(self, request: task.CreateTaskRequest) -> int:
        return self._call("Create", request, task.CreateTaskResponse).pid

    def start(self, task_id: str, exec_id: str = "") -> int:
        return self._call("Start", task.StartRequest(id=task_id, exec_id=exec_id), task.StartResponse).pid

    def state(self, task_id: str, exec_id: str = "") -> task.StateResponse:
        return self._call("State", task.StateRequest(id=task_id, exec_id=exec_id), task.StateResponse)

    def kill(self, task_id: str, signal: int, exec_id: str = "", all_processes: bool = False) -> None:
        request = task.KillRequest(id=task_id, exec_id=exec_id, signal=signal, all=all_processes)
        self._call("Kill", request, Empty)

    def wait(self, task_id: str, exec_id: str = "", *, timeout: float | None) -> task.WaitResponse:
        """Wait until the process exits, at most `timeout` seconds (None: as long as it takes)."""
        request = task.WaitRequest(id=task_id, exec_id=exec_id)
        return self._client.call(SERVICE, "Wait", request, task.WaitResponse, timeout)

    def delete(self, task_id: str, exec_id: str = "") -> task.DeleteResponse:
        return self._call("Delete", task.DeleteRequest(id=task_id, exec_id=exec_id), task.DeleteResponse)

    def exec(self, request: task.ExecProcessRequest) -> None:
        self._call("Exec", request, Empty)

    def resize(self, task_id: str, exec_id: str, width: int, height: int) -> None:
        request = task.ResizePtyRequest(id=task_id, exec_id=exec_id, width=width, height=height)
        self._call("ResizePty", request, Empty)

    def close_stdin(self, task_id: str, exec_id: str = "") -> None:
        self._call("CloseIO", task.CloseIORequest(id=task_id, exec_id=exec_id, stdin=True), Empty)

    def update(self, task_id: str, resources: dict[str, object]) -> None:
        request = task.UpdateTaskRequest(id=task_id, resources=json_any(RESOURCES_TYPE, resources))
        self._call("Update", request, Empty)

    def stats(self, task_id: str) -> AnyMessage:
        return self._call("Stats", task.StatsRequest(id=task_id), task.StatsResponse).stats

    def shutdown(self, task_id: str) -> None:
        """Ask the shim to exit once it runs no tasks; the connection then closes."""
        self._call("Shutdown", task.ShutdownRequest(id=task_id), Empty)

"""An example shimhub runtime plugin: containers as chrooted host processes.

A container is the process of the OCI spec the core finished (its arguments and
environment, as the extensions and NRI left them) run by a small supervisor
(``shimhub_procrun.supervise``) inside the pod's network namespace, chrooted into
the container's root filesystem (a container without an image sees the node's).
The supervisor writes the CRI log and the exit code, and outlives shimhub.

Honest limits: of the spec, only the process's arguments and environment and the
pod's network namespace are used: no PID, mount, IPC, UTS or user namespaces, no
cgroup limits, no seccomp or capabilities dropped, every container runs as root. It shows the
plugin contract, not isolation: use the runc plugin for real workloads.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from signal import Signals
from typing import Any

import psutil

from shimhub.sdk import (
    ContainerRecord,
    ContainerState,
    ContainerStatus,
    ContainerUsage,
    ExecResult,
    PluginContext,
    Readiness,
    SandboxRecord,
    hookimpl,
    plugin_options,
)
from shimhub_proto.cri.v1 import api_pb2 as cri

OPTIONS = {"nsenter": "nsenter", "chroot": "chroot"}


class ProcRuntime:
    """The `proc` runtime: one instance per runtime handler that names it."""

    shimhub_api = "2.0"

    def __init__(self) -> None:
        self.state_dir = Path()
        self.tools: dict[str, str] = {}

    @hookimpl
    def runtime_setup(self, options: Mapping[str, Any], context: PluginContext) -> Readiness:
        valid = plugin_options.validated(options, OPTIONS)  # ConfigError for unknown keys or wrong types
        self.state_dir = context.state_dir
        for tool in ("nsenter", "chroot"):
            found = shutil.which(valid[tool])
            if found is None:
                return Readiness(ready=False, reason=f"{valid[tool]} not found")
            self.tools[tool] = found
        return Readiness(ready=True, info=dict(self.tools))

    # -- pods: the core made the namespaces; nothing to run ----------------------------------

    @hookimpl
    def runtime_sandbox_run(self, sandbox: SandboxRecord, config: cri.PodSandboxConfig) -> None:
        # Only the annotations the handler's `allowed_annotations` let through reach a plugin.
        sandbox.runtime_data["annotations_seen"] = dict(config.annotations)

    # -- containers --------------------------------------------------------------------------

    def _dir(self, container: ContainerRecord) -> Path:
        return self.state_dir / container.id

    def _enter(self, sandbox: SandboxRecord, container: ContainerRecord, argv: list[str]) -> list[str]:
        """`argv` as a command run in the pod's network namespace and the container's root filesystem."""
        netns = sandbox.pod.namespaces.get("network", "") if sandbox.pod else ""
        rootfs = container.rootfs
        chrooted = [self.tools["chroot"], rootfs, *argv] if rootfs else argv
        return [self.tools["nsenter"], f"--net={netns}", "--", *chrooted] if netns else chrooted

    @hookimpl
    def runtime_container_create(self, container: ContainerRecord, spec: dict[str, Any]) -> None:
        self._dir(container).mkdir(parents=True)
        (self._dir(container) / "env").write_text("\n".join(spec["process"]["env"]) + "\n")
        container.runtime_data["argv"] = spec["process"]["args"]

    @hookimpl
    def runtime_container_start(self, sandbox: SandboxRecord, container: ContainerRecord) -> None:
        directory = self._dir(container)
        supervise = [sys.executable, "-m", "shimhub_procrun.supervise", str(directory), container.log_path, "--"]
        with (directory / "supervisor.log").open("ab") as errors:
            supervisor = subprocess.Popen(
                [*supervise, *self._enter(sandbox, container, container.runtime_data["argv"])],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=errors,
                start_new_session=True,  # not in shimhub's process group: it must outlive shimhub
            )
        container.runtime_data["supervisor"] = supervisor.pid
        deadline = time.monotonic() + 10
        while not (directory / "pid").exists():
            if supervisor.poll() is not None or time.monotonic() > deadline:
                said = (directory / "supervisor.log").read_text().strip().splitlines()
                raise RuntimeError(f"the command did not start: {said[-1] if said else 'the supervisor hung'}")
            time.sleep(0.005)
        container.runtime_data["pid"], container.runtime_data["started_at"] = (
            int(part) for part in (directory / "pid").read_text().split()
        )

    @hookimpl
    def runtime_container_state(self, container: ContainerRecord) -> ContainerState:
        data = container.runtime_data
        exit_file = self._dir(container) / "exit"
        if exit_file.exists():
            code, finished = (int(part) for part in exit_file.read_text().split())
            return ContainerState(
                status=ContainerStatus.EXITED,
                started_at=data["started_at"],
                finished_at=finished,
                exit_code=code,
            )
        if "pid" not in data:
            return ContainerState(status=ContainerStatus.CREATED)
        if psutil.pid_exists(data["supervisor"]) and psutil.Process(data["supervisor"]).status() != "zombie":
            return ContainerState(status=ContainerStatus.RUNNING, pid=data["pid"], started_at=data["started_at"])
        return ContainerState(
            status=ContainerStatus.EXITED,
            started_at=data["started_at"],
            finished_at=time.time_ns(),
            exit_code=255,
            message="the container's supervisor died: its exit code is unknown",
        )

    @hookimpl
    def runtime_container_kill(self, container: ContainerRecord, signal: str) -> None:
        if self.runtime_container_state(container).status != ContainerStatus.RUNNING:
            return
        number = int(signal) if signal.isdigit() else int(Signals[signal])
        with contextlib.suppress(ProcessLookupError):
            os.killpg(container.runtime_data["pid"], number)  # the command and what it started

    @hookimpl
    def runtime_container_wait(self, container: ContainerRecord, timeout: float) -> bool:
        if "pid" not in container.runtime_data:
            return True
        exit_file = self._dir(container) / "exit"
        deadline = time.monotonic() + timeout
        while not exit_file.exists():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        self._wait_for_supervisor(container)
        return True

    @staticmethod
    def _wait_for_supervisor(container: ContainerRecord) -> None:
        """Let the supervisor finish (and reap it if it is our child) once the container exited."""
        with contextlib.suppress(psutil.NoSuchProcess, psutil.TimeoutExpired, KeyError):
            psutil.Process(container.runtime_data["supervisor"]).wait(5)

    @hookimpl
    def runtime_container_remove(self, container: ContainerRecord) -> None:
        if (self._dir(container) / "exit").exists():
            self._wait_for_supervisor(container)
        shutil.rmtree(self._dir(container), ignore_errors=True)

    @hookimpl
    def runtime_container_reopen_log(self, container: ContainerRecord) -> None:
        with contextlib.suppress(ProcessLookupError, KeyError):
            os.kill(container.runtime_data["supervisor"], signal.SIGUSR1)

    @hookimpl
    def runtime_container_stats(self, container: ContainerRecord) -> ContainerUsage:
        try:
            main = psutil.Process(container.runtime_data["pid"])
            processes = [main, *main.children(recursive=True)]
            cpu = sum(p.cpu_times().user + p.cpu_times().system for p in processes)
            memory = sum(p.memory_info().rss for p in processes)
        except (psutil.NoSuchProcess, KeyError):
            return ContainerUsage(timestamp=time.time_ns(), process_count=0)
        return ContainerUsage(
            timestamp=time.time_ns(),
            cpu_usage_core_nanoseconds=int(cpu * 1e9),
            memory_working_set_bytes=memory,
            memory_rss_bytes=memory,
            process_count=len(processes),
        )

    @hookimpl
    def runtime_exec_sync(
        self, sandbox: SandboxRecord, container: ContainerRecord, cmd: list[str], timeout: float | None
    ) -> ExecResult:
        env = dict(line.split("=", 1) for line in (self._dir(container) / "env").read_text().splitlines())
        process = subprocess.Popen(
            self._enter(sandbox, container, cmd),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,  # a group of its own: a timeout kills what the command started too
        )
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            return ExecResult(exit_code=-1, timed_out=True)
        return ExecResult(exit_code=process.returncode, stdout=stdout, stderr=stderr)

"""A third-party runtime plugin for shimhub's tests, written only against the plugin contract.

A "container" is its command run as a host process inside the pod's network
namespace, chrooted into the container's root filesystem when it has an image
(no other isolation), its output appended to the container's log path. Exit
codes are kept in the plugin's state directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shimhub import plugin_options
from shimhub.errors import InvalidArgument
from shimhub.hookspecs import hookimpl
from shimhub.hooktypes import ContainerState, ContainerStatus, ExecResult, PluginContext, PodNetwork, Readiness


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class ProcRuntime:
    shimhub_api = "1.0"

    def __init__(self) -> None:
        self.context: PluginContext | None = None
        self.nsenter = ""
        self.reapers: dict[str, threading.Thread] = {}

    @hookimpl
    def runtime_setup(self, options: Mapping[str, Any], context: PluginContext) -> Readiness:
        self.nsenter = plugin_options.validated(options, {"nsenter": "nsenter"})["nsenter"]
        self.context = context
        if shutil.which(self.nsenter) is None:
            return Readiness(ready=False, reason=f"{self.nsenter} not found")
        return Readiness(ready=True, info={"nsenter": shutil.which(self.nsenter)})

    def _dir(self, container_id: str) -> Path:
        assert self.context is not None
        return self.context.state_dir / container_id

    @hookimpl
    def runtime_sandbox_run(self, sandbox, config, network: PodNetwork) -> None:
        sandbox.runtime_data["netns"] = network.netns_path
        sandbox.runtime_data["annotations_seen"] = dict(config.annotations)

    @hookimpl
    def runtime_sandbox_stop(self, sandbox) -> None:
        sandbox.runtime_data["stopped"] = True

    @hookimpl
    def runtime_sandbox_remove(self, sandbox) -> None:
        sandbox.runtime_data.clear()

    @hookimpl
    def runtime_container_create(self, sandbox, container, config, rootfs: str, image) -> None:
        image_config = image.get("config", {})
        argv = list(config.command or image_config.get("Entrypoint") or []) + list(
            config.args or (image_config.get("Cmd") or [] if not config.command else [])
        )
        if not argv:
            raise InvalidArgument("the proc runtime needs a command")
        self._dir(container.id).mkdir(parents=True)
        # With an image, the command runs chrooted into the container's root filesystem.
        container.runtime_data["argv"] = ["chroot", rootfs, *argv] if rootfs else argv

    def _enter(self, sandbox, argv: list[str]) -> list[str]:
        netns = sandbox.runtime_data.get("netns", "")
        return [self.nsenter, f"--net={netns}", "--", *argv] if netns else argv

    @hookimpl
    def runtime_container_start(self, sandbox, container) -> None:
        log_path = container.log_path or os.devnull
        if container.log_path:
            Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                self._enter(sandbox, container.runtime_data["argv"]),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        container.runtime_data["pid"] = proc.pid
        container.runtime_data["started_at"] = time.time_ns()
        exit_file = self._dir(container.id) / "exit"

        def reap() -> None:
            code = proc.wait()
            written = exit_file.with_suffix(".tmp")
            written.write_text(f"{code if code >= 0 else 128 - code} {time.time_ns()}")
            written.rename(exit_file)  # whole or absent: a state call may look at any moment

        self.reapers[container.id] = threading.Thread(target=reap, daemon=True)
        self.reapers[container.id].start()

    @hookimpl
    def runtime_container_state(self, sandbox, container) -> ContainerState:
        data = container.runtime_data
        exit_file = self._dir(container.id) / "exit"
        reaper = self.reapers.get(container.id)
        alive = "pid" in data and _alive(data["pid"])  # asked once: it may exit between two looks
        if reaper is not None and "pid" in data and not alive:
            reaper.join(5)  # it exited: let our reaper record the exit code first
        if exit_file.exists():
            code, finished = (int(x) for x in exit_file.read_text().split())
            return ContainerState(
                status=ContainerStatus.EXITED,
                pid=0,
                started_at=data["started_at"],
                finished_at=finished,
                exit_code=code,
                reason="Completed" if code == 0 else "Error",
            )
        if alive:
            return ContainerState(status=ContainerStatus.RUNNING, pid=data["pid"], started_at=data["started_at"])
        if "pid" in data:  # it ended while shimhub was down: no one could collect its exit code
            return ContainerState(
                status=ContainerStatus.EXITED,
                started_at=data["started_at"],
                finished_at=time.time_ns(),
                exit_code=255,
                reason="Error",
                message="exit code lost: the process ended while shimhub was down",
            )
        return ContainerState(status=ContainerStatus.CREATED)

    @hookimpl
    def runtime_container_stop(self, sandbox, container, timeout: int) -> None:
        pid = container.runtime_data.get("pid")
        if not pid:
            return
        exit_file = self._dir(container.id) / "exit"
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and not exit_file.exists() and _alive(pid):
                time.sleep(0.02)
            if exit_file.exists() or not _alive(pid):
                return

    @hookimpl
    def runtime_container_remove(self, sandbox, container) -> None:
        self.reapers.pop(container.id, None)
        shutil.rmtree(self._dir(container.id), ignore_errors=True)

    @hookimpl
    def runtime_exec_sync(self, sandbox, container, cmd: list[str], timeout: float | None) -> ExecResult:
        try:
            done = subprocess.run(self._enter(sandbox, cmd), capture_output=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return ExecResult(exit_code=-1, timed_out=True)
        return ExecResult(exit_code=done.returncode, stdout=done.stdout, stderr=done.stderr)

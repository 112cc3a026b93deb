"""RuncRuntime: shimhub's runtime plugin for OCI runtimes with a runc-compatible command line.

One instance per runtime handler. Handler options (all optional):

    binary = "runc"                      # the OCI runtime: runc, runsc, crun, or a path
    conmon = "conmon"                    # the monitor
    pause = "catatonit"                  # the init the core runs for pods that share one PID namespace
    runtime_args = []                    # global arguments for every runtime call, e.g. ["--platform=ptrace"]
    host_network_runtime_args = []       # added for host-network pods, e.g. ["--network=host"] for runsc
    restrict_oom_score_adj = true        # clamp oom_score_adj to what shimhub itself may set
    conmon_cgroup = ""                   # systemd driver only: "pod" (a scope in the pod's slice) or a slice
                                         # such as "system.slice"; "" keeps conmon in shimhub's cgroup
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shimhub.sdk import (
    ConfigError,
    ContainerRecord,
    ContainerState,
    ContainerStatus,
    ContainerUsage,
    FailedPrecondition,
    HandlerFeatures,
    NotFound,
    PluginContext,
    PluginFailed,
    Readiness,
    SandboxRecord,
    SpecOptions,
    StreamedProcess,
    cgroups,
    hookimpl,
    netns,
    oci_resources,
    plugin_options,
    termination_log,
    termination_message,
)
from shimhub_proto.cri.v1 import api_pb2 as cri
from shimhub_runc import conmon, criu, streams

OPTIONS: dict[str, Any] = {
    "binary": "runc",
    "conmon": "conmon",
    "pause": "catatonit",
    "runtime_args": [],
    "host_network_runtime_args": [],
    "restrict_oom_score_adj": True,
    "conmon_cgroup": "",
}
COMMAND_TIMEOUT = 60.0
#: A container's cgroup as shimhub names it: cgroupfs ("<parent>/shimhub-<id>") or systemd ("<slice>:shimhub:<id>").
CONTAINER_CGROUP = re.compile(r"(/[\w.@-]+)*/shimhub-[0-9a-f]{64}|[\w.@-]+\.slice:shimhub:[0-9a-f]{64}")
#: Rounds of moving a restored container's processes into its cgroup.
MOVE_ROUNDS = 5


def container_cgroup(path: str) -> str:
    """`path` if it is a container cgroup as shimhub names them, else "" (a checkpoint archive names it)."""
    return path if CONTAINER_CGROUP.fullmatch(path) and ".." not in path.split("/") else ""


def _wait_for(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _gone(error: PluginFailed) -> bool:
    """Whether an OCI runtime's error says the container does not exist (runc and runsc phrasings)."""
    text = error.message.lower()
    return "does not exist" in text or "not found" in text or "no such" in text


def _unsupported_cgroups(binary: str) -> str:
    """Why an OCI runtime cannot run on this node's cgroup layout, where that is known in advance."""
    if not os.path.basename(binary).startswith("crun") or cgroups.mode() != "hybrid":
        return ""
    controllers = cgroups.v2_controllers()
    if controllers:
        return (
            f"crun cannot run on hybrid cgroups while the cgroup v2 tree has controllers ({', '.join(controllers)}); "
            "use runc here, or boot the node with cgroup v2 only"
        )
    return ""


class RuncRuntime:
    """Runs pods and containers with an OCI runtime binary under conmon."""

    shimhub_api = "2.0"

    def __init__(self) -> None:
        self.options: dict[str, Any] = dict(OPTIONS)
        self.binary = ""
        self.conmon = ""
        self.state_root = Path()
        self.bundles = Path()
        self.exits = Path()
        self.attach = Path()
        self.cgroup_driver = "cgroupfs"
        self.context: PluginContext | None = None
        self.log = logging.getLogger(__name__)

    # -- setup --------------------------------------------------------------

    @hookimpl
    def runtime_setup(self, options: Mapping[str, Any], context: PluginContext) -> Readiness:
        self.options = plugin_options.validated(options, OPTIONS)
        self.context, self.log = context, context.log
        self.cgroup_driver = context.cgroup_driver
        self.state_root = context.run_dir / "runtime"
        self.exits = context.run_dir / "exits"
        self.attach = context.run_dir / "attach"
        self.bundles = context.state_dir / "containers"
        for directory in (self.state_root, self.exits, self.attach, self.bundles):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        conmon_cgroup = self.options["conmon_cgroup"]
        if conmon_cgroup and self.cgroup_driver != "systemd":
            raise ConfigError(f'conmon_cgroup {conmon_cgroup!r} needs cgroup_driver = "systemd"')
        if conmon_cgroup not in ("", "pod") and not (conmon_cgroup.endswith(".slice") and "/" not in conmon_cgroup):
            raise ConfigError(f'conmon_cgroup {conmon_cgroup!r}: give "pod" or a slice name such as "system.slice"')
        self.binary = shutil.which(self.options["binary"]) or ""
        self.conmon = shutil.which(self.options["conmon"]) or ""
        if not self.binary:
            return Readiness(ready=False, reason=f"OCI runtime {self.options['binary']!r} not found")
        if not self.conmon:
            return Readiness(
                ready=False, reason=f"monitor {self.options['conmon']!r} not found (Debian package conmon)"
            )
        unsupported = _unsupported_cgroups(self.binary)
        if unsupported:
            return Readiness(ready=False, reason=unsupported)
        version = self._version()
        return Readiness(
            ready=True,
            features=self._features(),
            spec_options=SpecOptions(
                restrict_oom_score_adj=self.options["restrict_oom_score_adj"], pod_init=self.options["pause"]
            ),
            info={"binary": self.binary, "version": version},
        )

    def _version(self) -> str:
        try:
            done = subprocess.run([self.binary, "--version"], capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return "unknown"
        return done.stdout.splitlines()[0] if done.stdout else "unknown"

    def _features(self) -> HandlerFeatures:
        try:
            done = subprocess.run([self.binary, "features"], capture_output=True, text=True, timeout=10, check=False)
            described = json.loads(done.stdout) if done.returncode == 0 else {}
        except (OSError, ValueError, subprocess.TimeoutExpired):
            described = {}
        mount_options = described.get("mountOptions", [])
        kernel = tuple(int(part) for part in os.uname().release.split(".")[:2] if part.isdigit())
        return HandlerFeatures(
            recursive_read_only_mounts="rro" in mount_options and kernel >= (5, 12),
            # joins the pod's user namespace by path, with its mappings (the core makes the ID-mapped mounts)
            user_namespaces="user" in (described.get("linux") or {}).get("namespaces", []),
        )

    def _run(self, *args: str, runtime_args: list[str] | None = None, stdin: bytes | None = None) -> str:
        argv = [*self._runtime_argv(), *(runtime_args or []), *args]
        try:
            done = subprocess.run(argv, input=stdin, capture_output=True, timeout=COMMAND_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PluginFailed(f"{os.path.basename(self.binary)} {args[0]}: {exc}") from exc
        if done.returncode != 0:
            message = done.stderr.decode(errors="replace").strip() or done.stdout.decode(errors="replace").strip()
            raise PluginFailed(f"{os.path.basename(self.binary)} {args[0]} failed: {message}")
        return done.stdout.decode(errors="replace")

    # -- containers -------------------------------------------------------------

    def _conmon_slice(self, sandbox: SandboxRecord) -> str:
        """The slice conmon's own scope goes in ("" for shimhub's cgroup), as conmon_cgroup says."""
        wanted = self.options["conmon_cgroup"]
        if wanted == "pod":
            return sandbox.pod_config().linux.cgroup_parent or "system.slice"
        return wanted

    def _monitor(self, container: ContainerRecord) -> conmon.Monitor:
        return conmon.Monitor(bundle=self.bundles / container.id, exit_dir=self.exits, socket_dir=self.attach)

    @hookimpl
    def runtime_container_create(
        self, sandbox: SandboxRecord, container: ContainerRecord, config: cri.ContainerConfig, spec: dict[str, Any]
    ) -> None:
        self._write_bundle(container, config, spec)
        container.runtime_data["pid"] = self._launch(sandbox, container, self._stdio(config))

    @hookimpl
    def runtime_container_restore(
        self,
        container: ContainerRecord,
        config: cri.ContainerConfig,
        spec: dict[str, Any],
        checkpoint: str,
        checkpointed_spec: Mapping[str, Any],
    ) -> None:
        self._write_bundle(container, config, spec)
        # CRIU may restore the processes into the checkpointed container's cgroup (made again if it is gone);
        # the archive names it, so only a cgroup of the shape shimhub gives containers is looked in
        named = str((checkpointed_spec.get("linux") or {}).get("cgroupsPath", ""))
        source = container_cgroup(named)
        if named and not source:
            self.log.warning(
                "container %s: the archive's cgroup %r is no container's; ignored", container.id[:12], named[:256]
            )
        container.runtime_data["restore"] = {"checkpoint": checkpoint, "source_cgroup": source, **self._stdio(config)}

    @staticmethod
    def _stdio(config: cri.ContainerConfig) -> dict[str, bool]:
        return {"terminal": config.tty, "stdin": config.stdin, "stdin_once": config.stdin_once}

    def _write_bundle(self, container: ContainerRecord, config: cri.ContainerConfig, spec: dict[str, Any]) -> None:
        if not container.rootfs:
            raise FailedPrecondition("this runtime runs containers from images: the container has no root filesystem")
        monitor = self._monitor(container)
        monitor.bundle.mkdir(mode=0o700)
        (monitor.bundle / "config.json").write_text(json.dumps(spec))
        container.runtime_data.update(cgroup=spec["linux"]["cgroupsPath"], termination_log=termination_log(config))

    def _launch(self, sandbox: SandboxRecord, container: ContainerRecord, stdio: Mapping[str, Any]) -> int:
        """conmon for the container: creating it, or restoring it when `stdio` names a checkpoint."""
        monitor = self._monitor(container)
        extra = self.options["host_network_runtime_args"] if sandbox.host_network else []
        if Path(self.binary).name == "runc":
            # runc's warnings (e.g. of a device its systemd driver cannot find) to a file of the bundle, not into
            # the container's stderr and so its CRI log; its errors still reach conmon on stderr
            extra = [*extra, f"--log={monitor.bundle / 'runtime.log'}"]
        return conmon.launch(
            self.conmon,
            self.binary,
            [f"--root={self.state_root}", *self.options["runtime_args"], *extra],
            container.id,
            monitor,
            log_path=container.log_path,
            cgroup_driver=self.cgroup_driver,
            conmon_slice=self._conmon_slice(sandbox),
            terminal=stdio["terminal"],
            stdin=stdio["stdin"],
            stdin_once=stdio["stdin_once"],
            restore=stdio.get("checkpoint", ""),
        )

    @staticmethod
    def _claim_restored(container: ContainerRecord, source: str) -> None:
        """Move a restored container's processes from the cgroup CRIU put them in (the checkpointed
        container's, shared with it if it still runs) into the container's own, and remove that cgroup if
        nothing is left in it. The container's processes are those of its PID namespace."""
        target = container.runtime_data.get("cgroup", "")
        if not source or source == target:
            return
        try:
            namespace = os.stat(f"/proc/{container.runtime_data['pid']}/ns/pid").st_ino
        except OSError:
            return  # exited already
        for _ in range(MOVE_ROUNDS):  # processes forked meanwhile are found by the next round
            moved = 0
            for pid in cgroups.processes(source):
                with contextlib.suppress(OSError):
                    if os.stat(f"/proc/{pid}/ns/pid").st_ino == namespace:
                        cgroups.move(pid, target)
                        moved += 1
            if not moved:
                break
        cgroups.remove_if_empty(source)

    @hookimpl
    def runtime_container_checkpoint(
        self, sandbox: SandboxRecord, container: ContainerRecord, directory: str, leave_running: bool, timeout: float
    ) -> Mapping[str, Any]:
        if Path(self.binary).name != "runc":
            raise FailedPrecondition(f"{Path(self.binary).name} containers cannot be checkpointed (runc's can)")
        criu.require()
        bundle = self._monitor(container).bundle
        criu.checkpoint(
            self._runtime_argv(),
            container.id,
            directory,
            bundle / "checkpoint-work",
            leave_running=leave_running,
            timeout=timeout,
        )
        return json.loads((bundle / "config.json").read_text())

    @hookimpl
    def runtime_container_start(self, sandbox: SandboxRecord, container: ContainerRecord) -> None:
        started = time.time_ns()  # before: the process may have exited by the time `start` returns
        restore = container.runtime_data.pop("restore", None)
        if restore is not None:
            container.runtime_data["pid"] = self._launch(sandbox, container, restore)
            self._claim_restored(container, restore["source_cgroup"])
        else:
            self._run("start", container.id)
        container.runtime_data["started_at"] = started

    @hookimpl
    def runtime_container_state(self, sandbox: SandboxRecord, container: ContainerRecord) -> ContainerState:
        data = container.runtime_data
        started = data.get("started_at", 0)
        monitor = self._monitor(container)
        pid = data.get("pid", 0)
        alive = bool(pid) and _alive(pid)  # looked at before the exit file, so an exit in between is seen
        exited = monitor.exited()
        if exited is not None:
            code, finished = exited
            reason = "OOMKilled" if monitor.oom_file.exists() else ""
            return ContainerState(
                status=ContainerStatus.EXITED,
                started_at=started,
                finished_at=finished,
                exit_code=code,
                reason=reason,
                message=termination_message(data.get("termination_log", "")),
            )
        if alive:
            return ContainerState(
                status=ContainerStatus.RUNNING if started else ContainerStatus.CREATED, pid=pid, started_at=started
            )
        if not pid:
            return ContainerState(status=ContainerStatus.CREATED)
        return ContainerState(
            status=ContainerStatus.UNKNOWN,
            started_at=started,
            message="the container's process is gone and its monitor recorded no exit",
        )

    @hookimpl
    def runtime_container_states(self, containers: list[tuple[SandboxRecord, ContainerRecord]]) -> list[ContainerState]:
        # One listing of conmon's exit records; a container without one is as it was started.
        # (A monitor that died without a record shows as UNKNOWN in ContainerStatus.)
        exited = set(os.listdir(self.exits))
        states = []
        for sandbox, container in containers:
            data = container.runtime_data
            if container.id in exited:
                states.append(self.runtime_container_state(sandbox, container))
            elif data.get("started_at"):
                states.append(
                    ContainerState(
                        status=ContainerStatus.RUNNING, pid=data.get("pid", 0), started_at=data["started_at"]
                    )
                )
            else:
                states.append(ContainerState(status=ContainerStatus.CREATED, pid=data.get("pid", 0)))
        return states

    @hookimpl
    def runtime_container_kill(self, sandbox: SandboxRecord, container: ContainerRecord, signal: str) -> None:
        monitor = self._monitor(container)
        if "pid" not in container.runtime_data or monitor.exited() is not None:
            return
        try:
            self._run("kill", container.id, signal)
        except PluginFailed as exc:
            if not (_gone(exc) or monitor.exited() is not None):
                raise

    @hookimpl
    def runtime_container_wait(self, sandbox: SandboxRecord, container: ContainerRecord, timeout: float) -> bool:
        monitor = self._monitor(container)
        return "pid" not in container.runtime_data or _wait_for(lambda: monitor.exited() is not None, timeout)

    @hookimpl
    def runtime_container_remove(self, sandbox: SandboxRecord, container: ContainerRecord) -> None:
        try:
            self._run("delete", "--force", container.id)
        except PluginFailed as exc:
            if not _gone(exc):
                raise
            # runc forgot it without removing its cgroup: a checkpoint that stopped it, or a create that failed
            cgroups.destroy(container.runtime_data.get("cgroup", ""), COMMAND_TIMEOUT)  # "" is no cgroup
        monitor = self._monitor(container)
        monitor.exit_file.unlink(missing_ok=True)
        shutil.rmtree(monitor.bundle, ignore_errors=True)

    @hookimpl
    def runtime_container_stats(self, sandbox: SandboxRecord, container: ContainerRecord) -> ContainerUsage:
        return cgroups.usage(container.runtime_data.get("cgroup", ""))

    @hookimpl
    def runtime_sandbox_stats(self, sandbox: SandboxRecord) -> ContainerUsage | None:
        parent = sandbox.pod_config().linux.cgroup_parent
        return cgroups.usage(parent) if parent else None  # without a pod cgroup, the containers' sum

    @hookimpl
    def runtime_container_update(
        self, sandbox: SandboxRecord, container: ContainerRecord, resources: cri.LinuxContainerResources
    ) -> None:
        self._run("update", "--resources", "-", container.id, stdin=json.dumps(oci_resources(resources)).encode())

    @hookimpl
    def runtime_container_reopen_log(self, sandbox: SandboxRecord, container: ContainerRecord) -> None:
        try:
            self._monitor(container).reopen_log()
        except OSError as exc:
            raise NotFound(f"the monitor of container {container.id[:12]} is gone: {exc.strerror}") from None

    def _runtime_argv(self) -> list[str]:
        return [self.binary, f"--root={self.state_root}", *self.options["runtime_args"]]

    def _exec_pid_file(self, container: ContainerRecord) -> Path:
        return self._monitor(container).bundle / f"exec-{os.urandom(6).hex()}.pid"

    @hookimpl
    def runtime_exec(
        self, sandbox: SandboxRecord, container: ContainerRecord, cmd: list[str], tty: bool, stdin: bool
    ) -> StreamedProcess:
        return streams.ExecProcess(
            self._runtime_argv(), container.id, cmd, self._exec_pid_file(container), tty=tty, stdin=stdin
        )

    @hookimpl
    def runtime_attach(self, sandbox: SandboxRecord, container: ContainerRecord, stdin: bool) -> StreamedProcess:
        return streams.AttachedContainer(self._monitor(container))

    @hookimpl
    def runtime_port_forward(self, sandbox: SandboxRecord, port: int) -> socket.socket:
        return netns.connect(sandbox.network.netns_path, port)

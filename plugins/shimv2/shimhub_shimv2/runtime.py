"""ShimV2Runtime: runs pods and containers through an installed containerd "shim v2" binary.

For runtimes that ship only a shim (containerd-shim-kata-v2, containerd-shim-runsc-v1) and
for containerd-shim-runc-v2. One instance per runtime handler. Handler options (all optional):

    shim = "containerd-shim-runc-v2"     # the shim binary (a name on PATH or a path)
    shim_config = ""                     # the shim's own configuration file, handed to it as
                                         # runtimeoptions.v1.Options (Kata's and gVisor's shims read it)
    call_timeout = 30.0                  # seconds any call to the shim may take
    pause = "catatonit"                  # the pod sandbox's process (static binary, run as /pause -P)
    restrict_oom_score_adj = true        # clamp oom_score_adj to what shimhub itself may set

Every pod is a sandbox task (the process of the spec the core builds for it,
the pod init joining the pod's namespaces) plus one task per container, all marked with the CRI's
container-type and sandbox-id annotations so a grouping shim runs them in
one shim (Kata: one VM). The shim holds the processes and their exit codes,
and keeps running when shimhub restarts; shimhub copies container output from
the shim's FIFOs into the CRI logs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from signal import Signals
from typing import Any

from google.protobuf.any_pb2 import Any as AnyMessage

from shimhub.sdk import (
    ContainerRecord,
    ContainerState,
    ContainerStatus,
    ContainerUsage,
    DeadlineExceeded,
    FailedPrecondition,
    NotFound,
    PluginContext,
    PluginFailed,
    Readiness,
    SandboxRecord,
    ShimhubError,
    SpecOptions,
    StreamedProcess,
    Unavailable,
    cgroups,
    fifos,
    hookimpl,
    mounts,
    netns,
    oci_resources,
    plugin_options,
    termination_log,
    termination_message,
    ttrpc,
)
from shimhub_proto.containerd.cgroups.v1 import metrics_pb2 as cgroups_v1
from shimhub_proto.containerd.cgroups.v2 import metrics_pb2 as cgroups_v2
from shimhub_proto.containerd.runtimeoptions.v1 import options_pb2
from shimhub_proto.containerd.task.v2 import shim_pb2 as task
from shimhub_proto.containerd.types import mount_pb2, task_pb2
from shimhub_proto.cri.v1 import api_pb2 as cri
from shimhub_shimv2 import shimio
from shimhub_shimv2.shim import Binary, TaskClient

OPTIONS: dict[str, Any] = {
    "shim": "containerd-shim-runc-v2",
    "shim_config": "",
    "call_timeout": 30.0,
    "pause": "catatonit",
    "restrict_oom_score_adj": True,
}
NAMESPACE = "shimhub"
KILL_WAIT = 10.0
#: How long a container's state waits for the shim to finish copying its output once it exited.
OUTPUT_WAIT = 2.0
#: Annotations through which a grouping shim learns a task's pod (the CRI's, as containerd sets them).
CONTAINER_TYPE = "io.kubernetes.cri.container-type"
SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
SANDBOX_NAME = "io.kubernetes.cri.sandbox-name"
SANDBOX_NAMESPACE = "io.kubernetes.cri.sandbox-namespace"
SANDBOX_UID = "io.kubernetes.cri.sandbox-uid"
CONTAINER_NAME = "io.kubernetes.cri.container-name"
#: Where the core binds the pod init into a sandbox process's root filesystem (see its sandbox spec).
SANDBOX_INIT = "/pause"
OPTIONS_TYPE = "runtimeoptions.v1.Options"


def _cri_annotations(kind: str, sandbox_id: str, pod: cri.PodSandboxConfig) -> dict[str, str]:
    """The annotations that tell a shim what a task is and which pod it belongs to, as containerd sets them."""
    return {
        CONTAINER_TYPE: kind,
        SANDBOX_ID: sandbox_id,
        SANDBOX_NAME: pod.metadata.name,
        SANDBOX_NAMESPACE: pod.metadata.namespace,
        SANDBOX_UID: pod.metadata.uid,
    }


def _timestamp_ns(stamp: Any) -> int:
    return max(0, stamp.seconds * 1_000_000_000 + stamp.nanos)


def usage_from_metrics(metrics: AnyMessage, timestamp: int) -> ContainerUsage:
    """ContainerUsage from a shim's Stats answer (cgroup v1 or v2 metrics)."""
    if metrics.type_url.endswith("io.containerd.cgroups.v1.Metrics"):
        v1 = cgroups_v1.Metrics.FromString(metrics.value)
        memory = v1.memory
        usage = memory.usage.usage
        return ContainerUsage(
            timestamp=timestamp,
            cpu_usage_core_nanoseconds=v1.cpu.usage.total,
            memory_usage_bytes=usage,
            memory_working_set_bytes=max(0, usage - memory.total_inactive_file),
            memory_rss_bytes=memory.total_rss,
            memory_page_faults=memory.total_pg_fault,
            memory_major_page_faults=memory.total_pg_maj_fault,
            memory_limit_bytes=memory.usage.limit or None,
            process_count=v1.pids.current,
        )
    if metrics.type_url.endswith("io.containerd.cgroups.v2.Metrics"):
        v2 = cgroups_v2.Metrics.FromString(metrics.value)
        memory2 = v2.memory
        return ContainerUsage(
            timestamp=timestamp,
            cpu_usage_core_nanoseconds=v2.cpu.usage_usec * 1000,
            memory_usage_bytes=memory2.usage,
            memory_working_set_bytes=max(0, memory2.usage - memory2.inactive_file),
            memory_rss_bytes=memory2.anon,
            memory_page_faults=memory2.pgfault,
            memory_major_page_faults=memory2.pgmajfault,
            memory_limit_bytes=memory2.usage_limit or None,
            process_count=v2.pids.current,
        )
    return ContainerUsage(timestamp=timestamp)


def _remove_dead_socket(address: str) -> None:
    """Remove the socket file of a shim that is gone (a killed shim cannot remove its own)."""
    path = ttrpc.socket_path(address)
    if path.startswith("\0") or not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
    except OSError:
        pass
    finally:
        probe.close()


class ShimV2Runtime:
    """Runs pods and containers through a containerd shim v2 binary, over ttrpc."""

    shimhub_api = "2.0"

    def __init__(self) -> None:
        self.options: dict[str, Any] = dict(OPTIONS)
        self.binary: Binary | None = None
        self.tasks = Path()
        self.cgroup_driver = "cgroupfs"
        self.context: PluginContext | None = None
        self.log = logging.getLogger(__name__)
        self.relay: fifos.OutputRelay | None = None
        self.events: ttrpc.Receiver | None = None
        self._clients: dict[str, TaskClient] = {}
        self._clients_lock = threading.Lock()
        self._outputs: dict[str, shimio.ContainerOutput] = {}

    # -- setup --------------------------------------------------------------

    @hookimpl
    def runtime_setup(self, options: Mapping[str, Any], context: PluginContext) -> Readiness:
        self.options = plugin_options.validated(options, OPTIONS)
        self.context, self.log = context, context.log
        self.cgroup_driver = context.cgroup_driver
        self.tasks = context.run_dir / "tasks"
        self.tasks.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.relay is None:
            self.relay = fifos.OutputRelay()
        path = shutil.which(self.options["shim"]) or ""
        if not path:
            return Readiness(ready=False, reason=f"shim binary {self.options['shim']!r} not found")
        if not shutil.which(self.options["pause"]):
            return Readiness(ready=False, reason=f"pause binary {self.options['pause']!r} not found (Debian catatonit)")
        if self.options["shim_config"] and not os.path.isfile(self.options["shim_config"]):
            return Readiness(ready=False, reason=f"shim configuration {self.options['shim_config']!r} not found")
        # One -address per handler (and shimhub instance) keeps them from sharing shims. Events go to
        # an abstract socket: a shim's Go runtime reaches "@name" whatever the length of run_dir.
        address = str(context.run_dir / "shims")
        events = "@shimhub-events-" + hashlib.sha256(address.encode()).hexdigest()[:24]
        self.binary = Binary(path, NAMESPACE, address, events)
        if self.events is None:
            self.events = ttrpc.Receiver(events, lambda request: None)
        return Readiness(
            ready=True,
            spec_options=SpecOptions(
                restrict_oom_score_adj=self.options["restrict_oom_score_adj"], pod_init=self.options["pause"]
            ),
            info={"shim": path},
        )

    @hookimpl
    def runtime_recover(self, sandboxes: list[SandboxRecord], containers: list[ContainerRecord]) -> None:
        by_id = {sandbox.id: sandbox for sandbox in sandboxes}
        for container in containers:
            sandbox = by_id.get(container.sandbox_id)
            if sandbox is None or "shim" not in container.runtime_data:
                continue
            try:
                self._follow_output(container, container.runtime_data.get("tty", False)).stdio.watch.writers_connected()
            except OSError as exc:
                self.log.warning("container %s: cannot reopen its output FIFOs: %s", container.id[:12], exc)

    # -- shims ----------------------------------------------------------------

    def _client(self, address: str) -> TaskClient:
        with self._clients_lock:
            client = self._clients.get(address)
            if client is None or not client.connected:
                client = TaskClient(address, self.options["call_timeout"])
                self._clients[address] = client
            return client

    def _forget(self, address: str) -> None:
        with self._clients_lock:
            client = self._clients.pop(address, None)
        if client is not None:
            client.close()

    def _bundle(self, task_id: str) -> Path:
        return self.tasks / task_id

    def _start_task(self, task_id: str, request: task.CreateTaskRequest) -> tuple[str, int]:
        """Start (or find) the task's shim and create the task in it: (shim address, pid)."""
        assert self.binary is not None
        address = self.binary.start(task_id, self._bundle(task_id))
        if self.options["shim_config"]:
            options = options_pb2.Options(config_path=self.options["shim_config"])
            request.options.CopyFrom(AnyMessage(type_url=OPTIONS_TYPE, value=options.SerializeToString()))
        return address, self._client(address).create(request)

    def _delete_task(self, task_id: str, address: str) -> task.DeleteResponse | None:
        """Delete the task from its shim, or clean up after a shim that is gone. Idempotent."""
        assert self.binary is not None
        bundle = self._bundle(task_id)
        try:
            return self._client(address).delete(task_id)
        except NotFound:
            return None
        except Unavailable:
            self._forget(address)
            _remove_dead_socket(address)
            if not bundle.exists():
                return None
            self.log.warning("the shim of task %s is gone: cleaning up with %s delete", task_id[:12], self.binary.path)
            return self._clean_up_after_shim(task_id)

    def _clean_up_after_shim(self, task_id: str) -> task.DeleteResponse | None:
        """Kill what is left of task `task_id` whose shim is gone; the shim's answer, or None if it failed.

        The shim binary's `delete` runs `runc delete --force` but succeeds even when runc failed (e.g. its state
        is gone), so whatever is still in the task's cgroup is killed and the cgroup removed afterwards. Removal
        goes on after a failure: the bundle is unmounted and removed later."""
        assert self.binary is not None
        bundle = self._bundle(task_id)
        deleted = None
        try:
            deleted = self.binary.delete(task_id, bundle, self.options["call_timeout"])
        except PluginFailed as exc:
            self.log.warning("task %s: cleanup after its shim failed: %s", task_id[:12], exc)
        cgroup = json.loads((bundle / "config.json").read_text())["linux"]["cgroupsPath"]
        survivors = cgroups.destroy(cgroup, KILL_WAIT)
        if survivors:
            self.log.warning("task %s: %d process(es) outlived its shim's cleanup: killed", task_id[:12], survivors)
        return deleted

    def _remove_bundle(self, task_id: str) -> None:
        """Remove a task's bundle, unmounting its root filesystem first if a dead shim left it mounted."""
        rootfs = self._bundle(task_id) / "rootfs"
        if mounts.is_mounted(str(rootfs)):
            mounts.unmount(str(rootfs))
        shutil.rmtree(self._bundle(task_id), ignore_errors=True)

    def _shutdown(self, task_id: str, address: str) -> None:
        """Let the shim exit if it runs no other task."""
        with contextlib.suppress(ShimhubError):  # exited already, or still running other tasks of the group
            self._client(address).shutdown(task_id)
        self._forget(address)

    # -- pod sandboxes -------------------------------------------------------------

    @hookimpl
    def runtime_sandbox_run(self, sandbox: SandboxRecord, config: cri.PodSandboxConfig, spec: dict[str, Any]) -> None:
        bundle = self._bundle(sandbox.id)
        data = sandbox.runtime_data
        try:
            (bundle / "rootfs").mkdir(parents=True, mode=0o755)
            (bundle / "rootfs" / SANDBOX_INIT.lstrip("/")).touch()
            spec["annotations"].update(_cri_annotations("sandbox", sandbox.id, config))
            (bundle / "config.json").write_text(json.dumps(spec))
            data["shim"], pid = self._start_task(sandbox.id, task.CreateTaskRequest(id=sandbox.id, bundle=str(bundle)))
            self._client(data["shim"]).start(sandbox.id)
            data["pid"] = pid
        except BaseException:
            self.runtime_sandbox_remove(sandbox)
            raise

    @hookimpl
    def runtime_sandbox_stop(self, sandbox: SandboxRecord) -> None:
        data = sandbox.runtime_data
        address = data.get("shim", "")
        if address and not data.get("task_deleted"):
            self._kill(sandbox.id, address, [("SIGKILL", KILL_WAIT)])
            self._delete_task(sandbox.id, address)
            self._shutdown(sandbox.id, address)
            data["task_deleted"] = True

    @hookimpl
    def runtime_sandbox_remove(self, sandbox: SandboxRecord) -> None:
        self.runtime_sandbox_stop(sandbox)
        address = sandbox.runtime_data.get("shim", "")
        if address:
            # Stopped while a container's task still ran in the pod's shim, the shim stayed for it; the
            # containers are deleted now, so it may exit (asking a shim that is gone already is harmless).
            self._shutdown(sandbox.id, address)
        self._remove_bundle(sandbox.id)

    # -- containers ----------------------------------------------------------------

    def _follow_output(self, container: ContainerRecord, tty: bool) -> shimio.ContainerOutput:
        assert self.relay is not None
        stdin = container.runtime_data.get("stdin", False)
        output = shimio.ContainerOutput(
            self.relay, self._bundle(container.id), container.log_path, stdin=stdin, tty=tty
        )
        self._outputs[container.id] = output
        return output

    @hookimpl
    def runtime_container_create(
        self, sandbox: SandboxRecord, container: ContainerRecord, config: cri.ContainerConfig, spec: dict[str, Any]
    ) -> None:
        if "shim" not in sandbox.runtime_data:
            raise FailedPrecondition(f"pod sandbox {sandbox.id} was not set up by this runtime")
        if not container.rootfs:
            raise FailedPrecondition("this runtime runs containers from images: the container has no root filesystem")
        spec["root"]["path"] = "rootfs"  # where the shim mounts the root filesystem it is handed
        spec["annotations"].update(_cri_annotations("container", sandbox.id, sandbox.pod_config()))
        spec["annotations"][CONTAINER_NAME] = config.metadata.name
        bundle = self._bundle(container.id)
        (bundle / "rootfs").mkdir(parents=True, mode=0o755)
        (bundle / "config.json").write_text(json.dumps(spec))
        data = container.runtime_data
        data.update(
            cgroup=spec["linux"]["cgroupsPath"],
            termination_log=termination_log(config),
            tty=config.tty,
            stdin=config.stdin,
            stdin_once=config.stdin_once,
        )
        output = self._follow_output(container, config.tty)
        try:
            request = task.CreateTaskRequest(
                id=container.id,
                bundle=str(bundle),
                rootfs=[mount_pb2.Mount(type="bind", source=container.rootfs, options=["rbind", "rw"])],
                terminal=config.tty,
                stdin=output.stdio.paths["stdin"],
                stdout=output.stdio.paths["stdout"],
                stderr=output.stdio.paths["stderr"],
            )
            data["shim"], data["pid"] = self._start_task(container.id, request)
        except BaseException:
            self._outputs.pop(container.id, None)
            output.close()
            self._remove_bundle(container.id)
            raise
        finally:
            output.stdio.watch.writers_connected()

    @hookimpl
    def runtime_container_start(self, sandbox: SandboxRecord, container: ContainerRecord) -> None:
        started = time.time_ns()  # before: the process may have exited by the time `Start` returns
        self._client(container.runtime_data["shim"]).start(container.id)
        container.runtime_data["started_at"] = started

    def _exited(self, container: ContainerRecord, code: int, finished: int, message: str = "") -> ContainerState:
        output = self._outputs.get(container.id)
        if output is not None:
            output.settle(OUTPUT_WAIT)  # the shim copies the last output after the process exited
        return ContainerState(
            status=ContainerStatus.EXITED,
            started_at=container.runtime_data.get("started_at", 0),
            finished_at=finished,
            exit_code=code,
            message=message or termination_message(container.runtime_data.get("termination_log", "")),
        )

    @hookimpl
    def runtime_container_state(self, sandbox: SandboxRecord, container: ContainerRecord) -> ContainerState:
        data = container.runtime_data
        if "shim_lost" in data:
            lost = data["shim_lost"]
            return self._exited(container, lost["exit_code"], lost["finished_at"], lost["message"])
        try:
            state = self._client(data["shim"]).state(container.id)
        except Unavailable as exc:
            return self._shim_lost(container, str(exc))
        started = data.get("started_at", 0)
        if state.status == task_pb2.STOPPED:
            return self._exited(container, state.exit_status, _timestamp_ns(state.exited_at))
        if state.status == task_pb2.CREATED:
            return ContainerState(status=ContainerStatus.CREATED, pid=state.pid)
        if state.status in (task_pb2.RUNNING, task_pb2.PAUSED, task_pb2.PAUSING):
            return ContainerState(status=ContainerStatus.RUNNING, pid=state.pid, started_at=started)
        return ContainerState(status=ContainerStatus.UNKNOWN, started_at=started, message="the shim reports no state")

    def _shim_lost(self, container: ContainerRecord, reason: str) -> ContainerState:
        """The container's shim is gone: kill what is left of the container and record it as exited."""
        data = container.runtime_data
        address = data["shim"]
        self._forget(address)
        _remove_dead_socket(address)
        deleted = self._clean_up_after_shim(container.id)
        code = deleted.exit_status if deleted is not None else 0
        data["shim_lost"] = lost = {
            "exit_code": code or 128 + signal.SIGKILL,
            "finished_at": time.time_ns(),
            "message": f"the container's shim exited unexpectedly ({reason}); the container was killed",
        }
        self.log.warning("container %s: %s", container.id[:12], lost["message"])
        return self._exited(container, lost["exit_code"], lost["finished_at"], lost["message"])

    def _kill(self, task_id: str, address: str, signals: list[tuple[str, float]]) -> bool:
        """Send each signal in turn until the task exits; True once it has (or is gone)."""
        try:
            client = self._client(address)
            for name, wait in signals:
                client.kill(task_id, signal.Signals[name], all_processes=name == "SIGKILL")
                try:
                    client.wait(task_id, timeout=wait)
                    return True
                except DeadlineExceeded:
                    continue
        except (NotFound, Unavailable):
            return True
        except FailedPrecondition:
            return True  # "process already finished"
        return False

    @hookimpl
    def runtime_container_kill(self, sandbox: SandboxRecord, container: ContainerRecord, signal: str) -> None:
        data = container.runtime_data
        if "shim" not in data or "shim_lost" in data:
            return
        number = int(signal) if signal.isdigit() else int(Signals[signal])
        with contextlib.suppress(NotFound, Unavailable, FailedPrecondition):  # gone, or already finished
            self._client(data["shim"]).kill(container.id, number, all_processes=signal == "SIGKILL")

    @hookimpl
    def runtime_container_wait(self, sandbox: SandboxRecord, container: ContainerRecord, timeout: float) -> bool:
        data = container.runtime_data
        if "shim" not in data or "shim_lost" in data:
            return True
        try:
            self._client(data["shim"]).wait(container.id, timeout=timeout)
        except DeadlineExceeded:
            return False
        except (NotFound, Unavailable, FailedPrecondition):
            return True
        return True

    @hookimpl
    def runtime_container_remove(self, sandbox: SandboxRecord, container: ContainerRecord) -> None:
        data = container.runtime_data
        output = self._outputs.pop(container.id, None)
        if output is not None:
            output.close()
        if "shim" in data:
            if "shim_lost" not in data:
                self._delete_task(container.id, data["shim"])
            if data["shim"] != sandbox.runtime_data.get("shim"):
                self._shutdown(container.id, data["shim"])
        self._remove_bundle(container.id)

    @hookimpl
    def runtime_container_stats(self, sandbox: SandboxRecord, container: ContainerRecord) -> ContainerUsage:
        now = time.time_ns()
        if "shim_lost" in container.runtime_data:
            return ContainerUsage(timestamp=now)
        try:
            metrics = self._client(container.runtime_data["shim"]).stats(container.id)
        except (NotFound, FailedPrecondition, Unavailable):
            return ContainerUsage(timestamp=now)  # exited: no usage any more
        return usage_from_metrics(metrics, now)

    @hookimpl
    def runtime_container_update(
        self, sandbox: SandboxRecord, container: ContainerRecord, resources: cri.LinuxContainerResources
    ) -> None:
        self._client(container.runtime_data["shim"]).update(container.id, oci_resources(resources))

    @hookimpl
    def runtime_container_reopen_log(self, sandbox: SandboxRecord, container: ContainerRecord) -> None:
        output = self._outputs.get(container.id)
        if output is None:
            raise NotFound(f"container {container.id[:12]} has no output being copied (it was removed)")
        output.fanout.log.reopen()

    # -- exec, attach, port forward -------------------------------------------------

    def _exec(self, container: ContainerRecord, cmd: list[str], tty: bool, stdin: bool) -> shimio.ShimExec:
        assert self.relay is not None
        config = json.loads((self._bundle(container.id) / "config.json").read_text())
        process = {**config["process"], "args": cmd}
        directory = self._bundle(container.id) / f"exec-{os.urandom(6).hex()}"
        return shimio.ShimExec(
            self._client(container.runtime_data["shim"]),
            self.relay,
            container.id,
            process=process,
            directory=directory,
            tty=tty,
            stdin=stdin,
        )

    @hookimpl
    def runtime_exec(
        self, sandbox: SandboxRecord, container: ContainerRecord, cmd: list[str], tty: bool, stdin: bool
    ) -> StreamedProcess:
        return self._exec(container, cmd, tty=tty, stdin=stdin)

    @hookimpl
    def runtime_attach(self, sandbox: SandboxRecord, container: ContainerRecord, stdin: bool) -> StreamedProcess:
        output = self._outputs.get(container.id)
        if output is None:
            raise FailedPrecondition(f"container {container.id[:12]} has no output being copied")
        return shimio.AttachedContainer(
            self._client(container.runtime_data["shim"]),
            container.id,
            output,
            stdin_once=container.runtime_data.get("stdin_once", False),
        )

    @hookimpl
    def runtime_port_forward(self, sandbox: SandboxRecord, port: int) -> socket.socket:
        return netns.connect(sandbox.network.netns_path, port)

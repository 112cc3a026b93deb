"""VmRuntime: the runtime plugin base class of VM pods (one QEMU VM per pod, containers run by the agent in it).

A VM runtime plugin subclasses it and says how a container's root filesystem
reaches the guest (`share_rootfs` / `release_rootfs`); everything else is
here. Handler options (all optional):

    hypervisor = "qemu-system-x86_64"
    machine = "q35"
    accel = "auto"             # "kvm", "tcg", or "auto": KVM when a probe guest runs under it, else TCG
    kernel = ""                # guest kernel ("": the newest /boot/vmlinuz-*)
    initrd = ""                # "": built from the kernel's modules
    image = ""                 # guest OS image ("": built from this node's busybox, Python and runc)
    vcpus = 1
    memory_mib = 256
    kernel_params = ""
    max_vcpus = 4              # bounds for what pod annotations may ask for
    max_memory_mib = 4096
    virtiofsd = "/usr/lib/qemu/virtiofsd"
    boot_timeout = 120.0       # seconds from QEMU's start until the agent answers
    vm_template = false        # start pods' VMs from a saved template instead of booting (see template)
    call_timeout = 60.0        # seconds any other call to the agent may take

Pod annotations (when the handler's allowed_annotations let them through):
``io.katacontainers.config.hypervisor.default_vcpus``, ``...default_memory``
(MiB) and ``...kernel_params``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from signal import Signals
from typing import Any

import psutil

from shimhub.sdk import (
    EXEC_BACKLOG,
    Attachment,
    ConfigError,
    ContainerRecord,
    ContainerState,
    ContainerStatus,
    ContainerUsage,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutputFanout,
    PluginContext,
    PodNetwork,
    Readiness,
    SandboxRecord,
    ShimhubError,
    SpecOptions,
    StreamedProcess,
    Unavailable,
    hookimpl,
    mountinfo,
    mounts,
    oci_resources,
    plugin_options,
    termination_log,
    termination_message,
)
from shimhub_proto.cri.v1 import api_pb2 as cri
from shimhub_vm import guest, qemu, tap, template
from shimhub_vm.agentclient import AgentClient

OPTIONS: dict[str, Any] = {
    "hypervisor": "qemu-system-x86_64",
    "machine": "q35",
    "accel": "auto",
    "kernel": "",
    "initrd": "",
    "image": "",
    "vcpus": 1,
    "memory_mib": 256,
    "kernel_params": "",
    "max_vcpus": 4,
    "max_memory_mib": 4096,
    "virtiofsd": "/usr/lib/qemu/virtiofsd",
    "boot_timeout": 120.0,
    "call_timeout": 60.0,
    "vm_template": False,
}
ANNOTATION_PREFIX = "io.katacontainers.config.hypervisor."
MIN_MEMORY_MIB = 128
#: Kernel parameters a pod may not set: they would replace the guest's init (the agent).
FORBIDDEN_KERNEL_PARAMS = ("init=", "rdinit=")
KILL_WAIT = 10.0
OUTPUT_WAIT = 2.0
#: The pod's files the core writes, which the guest's containers get from the share.
POD_FILES = ("resolv.conf", "hosts", "hostname")
#: Where a container's cgroup goes in the guest.
GUEST_CGROUP = "/shimhub/shimhub-{}"
VM_LOST = "the pod's VM exited unexpectedly; its containers are gone"


class AgentProcess:
    """A process in the VM relayed to a streaming client: an exec'd command, or an attached container."""

    def __init__(self, client: AgentClient, sid: str, output: Attachment, *, owned: bool, stdin_once: bool) -> None:
        self.client = client
        self.sid = sid
        self.output = output
        self.owned = owned
        self.stdin_once = stdin_once
        self._closed = False

    def read_output(self) -> tuple[int, bytes]:
        return self.output.read()

    def write_input(self, data: bytes) -> None:
        with contextlib.suppress(ShimhubError):
            self.client.write_input(self.sid, data)

    def close_input(self) -> None:
        if self.owned or self.stdin_once:
            self.client.close_input(self.sid)

    def resize(self, width: int, height: int) -> None:
        with contextlib.suppress(ShimhubError):  # the process is gone: nothing to resize
            self.client.call("resize", id=self.sid, width=width, height=height)

    def wait(self) -> int | None:
        if not self.owned:
            return None
        return int(self.client.call("wait", id=self.sid, seconds=KILL_WAIT)["exit_code"] or 0)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.owned:
            with contextlib.suppress(ShimhubError):
                self.client.call("kill", id=self.sid, signal_name="SIGKILL", all=False)
                self.client.call("forget", id=self.sid)
            self.client.unsubscribe(self.sid)
        self.output.end()  # a reader blocked on the output wakes up: closing ends the output


class VmRuntime:
    """Base of the VM runtime plugins; subclasses implement `share_rootfs` and `release_rootfs`."""

    shimhub_api = "2.0"
    #: Whether the VM gets a hot-pluggable SCSI controller (for block-device root filesystems).
    block_devices = False

    def __init__(self) -> None:
        self.options: dict[str, Any] = dict(OPTIONS)
        self.context: PluginContext | None = None
        self.log = logging.getLogger(type(self).__module__)
        self.vms = Path()
        self.builder: guest.GuestBuilder | None = None
        self.accel = ""
        self.accel_reason = ""
        self._clients: dict[str, AgentClient] = {}
        self._outputs: dict[str, OutputFanout] = {}
        self._lock = threading.Lock()

    # -- what a subclass decides -----------------------------------------------------

    def share_rootfs(self, sandbox: SandboxRecord, container: ContainerRecord, rootfs: str) -> dict[str, str]:
        """Make `rootfs` reachable from the guest; the agent's description of it."""
        raise NotImplementedError

    def release_rootfs(self, sandbox: SandboxRecord, container: ContainerRecord) -> None:
        """Undo `share_rootfs`. Idempotent."""
        raise NotImplementedError

    # -- setup -----------------------------------------------------------------------

    @hookimpl
    def runtime_setup(self, options: Mapping[str, Any], context: PluginContext) -> Readiness:
        self.options = plugin_options.validated(options, OPTIONS)
        if self.options["accel"] not in ("auto", "kvm", "tcg"):
            raise ConfigError(f"accel: expected auto, kvm or tcg, got {self.options['accel']!r}")
        for key in ("vcpus", "memory_mib"):
            if not 1 <= self.options[key] <= self.options[f"max_{key}"]:
                raise ConfigError(f"{key}: {self.options[key]} is outside 1..max_{key}")
        self.context, self.log = context, context.log
        self.vms = context.run_dir / "vms"
        self.vms.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.builder = guest.GuestBuilder(context.state_dir / "guest")
        self.templates = template.Templates(context.state_dir / "templates")
        self.options["kernel"] = self.options["kernel"] or guest.default_kernel()
        missing = [
            f"{what} {path!r}"
            for what, path in (
                ("hypervisor", self.options["hypervisor"]),
                ("virtiofsd", self.options["virtiofsd"]),
                ("guest kernel", self.options["kernel"] or "/boot/vmlinuz-*"),
                ("runc (for the guest image)", "runc"),
                ("busybox (for the guest image)", "busybox"),
            )
            if not (shutil.which(path) or os.path.isfile(path))
        ]
        if missing:
            return Readiness(ready=False, reason="not found: " + ", ".join(missing))
        self.accel, self.accel_reason = self.options["accel"], ""
        if self.accel == "auto":
            self.accel, self.accel_reason = qemu.probe_acceleration(
                self.options["hypervisor"], self.options["machine"], context.run_dir
            )
            if self.accel == "tcg":
                self.log.warning("VMs run under software emulation (TCG), much slower than KVM: %s", self.accel_reason)
        info = {"accel": self.accel, "kernel": self.options["kernel"]}
        if self.accel_reason:
            info["warning"] = f"software emulation (TCG): {self.accel_reason}"
        return Readiness(ready=True, spec_options=SpecOptions(guest=True), info=info)

    def _vm_config(self, vcpus: int, memory: int, params: str, directory: Path) -> qemu.VmConfig:
        """A VM of the handler, in `directory`, booting the handler's guest files."""
        assert self.builder is not None
        return qemu.VmConfig(
            hypervisor=self.options["hypervisor"],
            machine=self.options["machine"],
            accel=self.accel,
            vcpus=vcpus,
            memory_mib=memory,
            guest=self.builder.files(self.options["kernel"], self.options["initrd"], self.options["image"]),
            kernel_params=params,
            directory=directory,
            scsi=self.block_devices,
        )

    @hookimpl
    def runtime_recover(self, sandboxes: list[SandboxRecord], containers: list[ContainerRecord]) -> None:
        by_id = {sandbox.id: sandbox for sandbox in sandboxes}
        for container in containers:
            sandbox = by_id.get(container.sandbox_id)
            if sandbox is None or "vm" not in sandbox.runtime_data:
                continue
            self._client(sandbox).subscribe(container.id, self._output(container))

    # -- the VM ----------------------------------------------------------------------

    def _dir(self, sandbox: SandboxRecord) -> Path:
        return self.vms / sandbox.id

    def _shared(self, sandbox: SandboxRecord) -> Path:
        return self._dir(sandbox) / "shared"

    def _client(self, sandbox: SandboxRecord) -> AgentClient:
        with self._lock:
            client = self._clients.get(sandbox.id)
            if client is None:
                client = AgentClient(self._dir(sandbox), self.options["call_timeout"])
                self._clients[sandbox.id] = client
            return client

    def _agent(self, sandbox: SandboxRecord, name: str, **args: Any) -> Any:
        """Call the pod's agent; Unavailable naming the VM's end when QEMU is gone."""
        vm = sandbox.runtime_data.get("vm", {})
        try:
            return self._client(sandbox).call(name, **args)
        except Unavailable:
            if not qemu.running(vm.get("pid", 0)):
                raise Unavailable(VM_LOST) from None
            raise

    def _vm_settings(self, config: cri.PodSandboxConfig) -> tuple[int, int, str]:
        """vCPUs, memory and kernel parameters: the handler's, overridden by allowed pod annotations."""
        vcpus, memory, params = self.options["vcpus"], self.options["memory_mib"], self.options["kernel_params"]
        annotations = config.annotations
        for key, low, high in (("default_vcpus", 1, "max_vcpus"), ("default_memory", MIN_MEMORY_MIB, "max_memory_mib")):
            text = annotations.get(ANNOTATION_PREFIX + key)
            if text is None:
                continue
            try:
                value = int(text)
            except ValueError:
                raise InvalidArgument(f"annotation {ANNOTATION_PREFIX}{key}: {text!r} is not an integer") from None
            if not low <= value <= self.options[high]:
                bounds = f"{low}..{self.options[high]} (the handler's {high})"
                raise InvalidArgument(f"annotation {ANNOTATION_PREFIX}{key}: {value} is outside {bounds}")
            vcpus, memory = (value, memory) if key == "default_vcpus" else (vcpus, value)
        extra = annotations.get(ANNOTATION_PREFIX + "kernel_params", "")
        if extra:
            bad = [p for p in extra.split() if p.startswith(FORBIDDEN_KERNEL_PARAMS) or not p.isprintable()]
            if bad:
                raise InvalidArgument(f"annotation {ANNOTATION_PREFIX}kernel_params: {' '.join(bad)} may not be set")
            params = f"{params} {extra}".strip()
        return vcpus, memory, params

    def _start_virtiofsd(self, sandbox: SandboxRecord) -> str:
        """Serve the pod's shared directory; the name of the socket QEMU connects to."""
        directory = self._dir(sandbox)
        listening = qemu.listen(directory, qemu.SHARE_SOCKET)
        try:
            with open(directory / "virtiofsd.log", "ab") as log:
                process = subprocess.Popen(
                    [self.options["virtiofsd"], "-f", f"--fd={listening.fileno()}", "-o",
                     f"source={self._shared(sandbox)}", "-o", "sandbox=chroot", "-o", "cache=none"],
                    stdout=log, stderr=log, start_new_session=True, pass_fds=[listening.fileno()],
                )  # fmt: skip
        finally:
            listening.close()
        sandbox.runtime_data["vm"]["virtiofsd"] = process.pid
        threading.Thread(target=process.wait, daemon=True).start()  # reap it when it exits with the VM
        return qemu.SHARE_SOCKET

    def _pod_files(self, sandbox: SandboxRecord) -> None:
        """The pod's files the core wrote (resolv.conf, hosts, hostname), copied into the share."""
        assert sandbox.pod is not None
        files = self._shared(sandbox) / "pod"
        files.mkdir(parents=True)
        for name in POD_FILES:
            shutil.copyfile(sandbox.pod.file(name), files / name)

    @hookimpl
    def runtime_sandbox_run(self, sandbox: SandboxRecord, config: cri.PodSandboxConfig, network: PodNetwork) -> None:
        assert self.builder is not None
        vcpus, memory, params = self._vm_settings(config)
        directory = self._dir(sandbox)
        vm: dict[str, Any] = {"accel": self.accel, "vcpus": vcpus, "memory_mib": memory}
        sandbox.runtime_data["vm"] = vm
        try:
            self._shared(sandbox).mkdir(parents=True, mode=0o700)
            self._pod_files(sandbox)
            interfaces, routes = [], []
            vm_config = self._vm_config(vcpus, memory, params, directory)
            templated = self.options["vm_template"]
            described = tap.describe(network.netns_path) if network.netns_path else None
            if described is not None:
                vm.update(netns=network.netns_path, interface=described["interface"])
                vm_config.netns, vm_config.mac = network.netns_path, described["mac"]
                vm_config.tap = tap.attach(network.netns_path, described["interface"], described["mtu"])
                interfaces = [{k: described[k] for k in ("mac", "mtu", "addresses")}]
                routes = described["routes"]
            if templated:  # the template's devices; the agent gives the pod's MAC to its network device
                vm_config.templated, vm_config.mac = True, template.TEMPLATE_MAC
                interfaces = [{**interface, "guest_mac": template.TEMPLATE_MAC} for interface in interfaces]
                vm_config.incoming = str(self.templates.state(vm_config, self.options["boot_timeout"]))
            vm_config.share_socket = self._start_virtiofsd(sandbox)
            started = time.monotonic()
            vm["pid"] = qemu.start(vm_config, self.options["boot_timeout"])
            if templated:
                template.resume(directory, self.options["boot_timeout"])
            self._client(sandbox).connect(self.options["boot_timeout"])
            if templated:  # the guest's clock is the template's: step it to the host's
                guest_now = self._agent(sandbox, "clock")["now_ns"]
                self._agent(sandbox, "clock", step_ns=time.time_ns() - guest_now)
            vm["boot_seconds"] = round(time.monotonic() - started, 3)
            self._agent(
                sandbox,
                "setup_pod",
                hostname=config.hostname,
                interfaces=interfaces,
                routes=routes,
                share=True,
                share_wait=self.options["boot_timeout"] if templated else 0.0,
                seed=os.urandom(32).hex() if templated else "",
            )
            self.log.info("pod %s: VM up in %.2f s (%s)", sandbox.id[:12], vm["boot_seconds"], self.accel)
        except BaseException as exc:
            console = directory / "console.log"
            if console.exists() and not isinstance(exc, ShimhubError | KeyboardInterrupt):
                self.log.warning(
                    "pod %s: guest console ends with: %s", sandbox.id[:12], console.read_text(errors="replace")[-2000:]
                )
            self.runtime_sandbox_remove(sandbox)
            raise

    @hookimpl
    def runtime_sandbox_stop(self, sandbox: SandboxRecord) -> None:
        vm = sandbox.runtime_data.get("vm")
        if not vm:
            return
        with self._lock:
            client = self._clients.pop(sandbox.id, None)
        if client is not None:
            client.close()
        qemu.stop(vm.get("pid", 0), self._dir(sandbox))
        virtiofsd = vm.get("virtiofsd", 0)
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(virtiofsd)
            if "virtiofsd" in process.name():
                process.kill()
                process.wait(KILL_WAIT)
        if vm.get("netns"):
            tap.detach(vm["netns"], vm["interface"])

    @hookimpl
    def runtime_sandbox_remove(self, sandbox: SandboxRecord) -> None:
        self.runtime_sandbox_stop(sandbox)
        shared = self._shared(sandbox)
        if shared.exists():
            for mount in sorted(_mounts_under(shared), reverse=True):
                mounts.unmount(mount)
        shutil.rmtree(self._dir(sandbox), ignore_errors=True)

    @hookimpl
    def runtime_sandbox_stats(self, sandbox: SandboxRecord) -> ContainerUsage | None:
        """The QEMU process's usage: what the pod costs the node."""
        pid = sandbox.runtime_data.get("vm", {}).get("pid", 0)
        try:
            process = psutil.Process(pid)
            with process.oneshot():
                times, memory = process.cpu_times(), process.memory_full_info()
        except psutil.Error:
            return None
        return ContainerUsage(
            timestamp=time.time_ns(),
            cpu_usage_core_nanoseconds=int((times.user + times.system) * 1e9),
            memory_usage_bytes=memory.rss,
            memory_working_set_bytes=memory.uss,
            memory_rss_bytes=memory.rss,
        )

    # -- containers --------------------------------------------------------------------

    def _output(self, container: ContainerRecord) -> Callable[[int, bytes], None]:
        """Where the agent's chunks of the container's output go: one stream, whose end ends both."""
        output = self._outputs.get(container.id)
        if output is None:
            output = self._outputs[container.id] = OutputFanout(container.log_path, streams=1)
        return output.write

    def _guest_spec(self, sandbox: SandboxRecord, container: ContainerRecord, spec: dict[str, Any]) -> dict[str, Any]:
        """The core's finished spec as the guest's runc needs it: the VM's namespaces (the core joined none),
        no host devices or AppArmor, a cgroup of the guest's, every bind source from the share."""
        assert sandbox.pod is not None
        shared = self._shared(sandbox)
        spec["linux"]["devices"] = []  # the host's device nodes are not the guest's
        spec["linux"]["cgroupsPath"] = GUEST_CGROUP.format(container.id)
        spec["process"].pop("apparmorProfile", None)
        pod_files = {sandbox.pod.file(name): shared / "pod" / name for name in POD_FILES}
        mounts_dir = shared / container.id / "mounts"
        for number, mount in enumerate(spec["mounts"]):
            if mount["type"] != "bind":
                continue
            source = pod_files.get(mount["source"], Path(mount["source"]))
            if not source.is_relative_to(shared):
                target = mounts_dir / str(number)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.mkdir() if source.is_dir() else target.touch()
                mounts.run("mount", "--bind", str(source), str(target))
                source = target
            mount["source"], mount["shared"] = str(source.relative_to(shared)), True
        return spec

    @hookimpl
    def runtime_container_create(
        self, sandbox: SandboxRecord, container: ContainerRecord, config: cri.ContainerConfig, spec: dict[str, Any]
    ) -> None:
        if "vm" not in sandbox.runtime_data:
            raise FailedPrecondition(f"pod sandbox {sandbox.id} was not set up by this runtime")
        if not container.rootfs:
            raise FailedPrecondition("this runtime runs containers from images: the container has no root filesystem")
        data = container.runtime_data
        data.update(
            termination_log=termination_log(config),
            stdin_once=config.stdin_once,
        )
        client = self._client(sandbox)
        client.subscribe(container.id, self._output(container))
        try:
            oci_spec = self._guest_spec(sandbox, container, spec)
            described = self.share_rootfs(sandbox, container, container.rootfs)
            data["pid"] = self._agent(
                sandbox, "create", id=container.id, spec=oci_spec, rootfs=described, stdin=config.stdin
            )["pid"]
        except BaseException:
            self.runtime_container_remove(sandbox, container)
            raise

    @hookimpl
    def runtime_container_start(self, sandbox: SandboxRecord, container: ContainerRecord) -> None:
        self._agent(sandbox, "start", id=container.id)

    @hookimpl
    def runtime_container_state(self, sandbox: SandboxRecord, container: ContainerRecord) -> ContainerState:
        data = container.runtime_data
        if "lost" in data:
            return self._exited(container, data["lost"])
        try:
            state = self._agent(sandbox, "state", id=container.id)
        except Unavailable as exc:
            if str(exc) != VM_LOST:
                return ContainerState(status=ContainerStatus.UNKNOWN, message=str(exc))
            data["lost"] = {"exit_code": 128 + signal.SIGKILL, "finished_at": time.time_ns(), "message": VM_LOST}
            return self._exited(container, data["lost"])
        except NotFound:
            data["lost"] = {
                "exit_code": 128 + signal.SIGKILL,
                "finished_at": time.time_ns(),
                "message": "the VM no longer knows the container",
            }
            return self._exited(container, data["lost"])
        if state["status"] == "exited":
            return self._exited(container, state)
        status = ContainerStatus.RUNNING if state["status"] == "running" else ContainerStatus.CREATED
        return ContainerState(status=status, pid=state["pid"], started_at=state["started_at"])

    def _exited(self, container: ContainerRecord, state: Mapping[str, Any]) -> ContainerState:
        output = self._outputs.get(container.id)
        if output is not None:
            output.wait_ended(OUTPUT_WAIT)  # the last output may still be on its way from the VM
        code = state["exit_code"] or 0
        return ContainerState(
            status=ContainerStatus.EXITED,
            started_at=state.get("started_at", 0),
            finished_at=state["finished_at"],
            exit_code=code,
            message=state.get("message") or termination_message(container.runtime_data.get("termination_log", "")),
        )

    @hookimpl
    def runtime_container_kill(self, sandbox: SandboxRecord, container: ContainerRecord, signal: str) -> None:
        if "lost" in container.runtime_data:
            return
        name = Signals(int(signal)).name if signal.isdigit() else signal
        with contextlib.suppress(NotFound, Unavailable):  # gone with its VM, or never created
            self._agent(sandbox, "kill", id=container.id, signal_name=name, all=name == "SIGKILL")

    @hookimpl
    def runtime_container_wait(self, sandbox: SandboxRecord, container: ContainerRecord, timeout: float) -> bool:
        if "lost" in container.runtime_data:
            return True
        try:
            return bool(self._agent(sandbox, "wait", id=container.id, seconds=timeout)["exited"])
        except (NotFound, Unavailable):
            return True

    @hookimpl
    def runtime_container_remove(self, sandbox: SandboxRecord, container: ContainerRecord) -> None:
        if "vm" in sandbox.runtime_data and "lost" not in container.runtime_data:
            with contextlib.suppress(Unavailable):
                self._agent(sandbox, "delete", id=container.id)
        self._client(sandbox).unsubscribe(container.id)
        output = self._outputs.pop(container.id, None)
        if output is not None:
            output.close()
        self.release_rootfs(sandbox, container)
        directory = self._shared(sandbox) / container.id
        for mount in sorted(_mounts_under(directory), reverse=True):
            mounts.unmount(mount)
        shutil.rmtree(directory, ignore_errors=True)

    @hookimpl
    def runtime_container_stats(self, sandbox: SandboxRecord, container: ContainerRecord) -> ContainerUsage:
        now = time.time_ns()
        try:
            stats = self._agent(sandbox, "stats", id=container.id)
        except (NotFound, FailedPrecondition, Unavailable):
            return ContainerUsage(timestamp=now)
        memory = stats.get("memory", {})
        usage = memory.get("usage", {}).get("usage")
        raw = memory.get("raw", {})
        inactive = raw.get("inactive_file", raw.get("total_inactive_file", 0))
        return ContainerUsage(
            timestamp=now,
            cpu_usage_core_nanoseconds=stats.get("cpu", {}).get("usage", {}).get("total"),
            memory_usage_bytes=usage,
            memory_working_set_bytes=None if usage is None else max(0, usage - inactive),
            memory_rss_bytes=raw.get("anon", raw.get("total_rss")),
            memory_page_faults=raw.get("pgfault"),
            memory_major_page_faults=raw.get("pgmajfault"),
            memory_limit_bytes=memory.get("usage", {}).get("limit") or None,
            process_count=stats.get("pids", {}).get("current"),
        )

    @hookimpl
    def runtime_container_update(
        self, sandbox: SandboxRecord, container: ContainerRecord, resources: cri.LinuxContainerResources
    ) -> None:
        self._agent(sandbox, "update", id=container.id, resources=oci_resources(resources))

    @hookimpl
    def runtime_container_reopen_log(self, sandbox: SandboxRecord, container: ContainerRecord) -> None:
        output = self._outputs.get(container.id)
        if output is None:
            raise NotFound(f"container {container.id[:12]} has no output being copied (it was removed)")
        output.log.reopen()

    # -- exec, attach, port forward ------------------------------------------------------

    def _exec(
        self, sandbox: SandboxRecord, container: ContainerRecord, cmd: list[str], stdin: bool, tty: bool
    ) -> AgentProcess:
        if not cmd:
            raise InvalidArgument("exec needs a command")
        client = self._client(sandbox)
        exec_id = f"exec-{os.urandom(8).hex()}"
        output = Attachment(streams=1, backlog=EXEC_BACKLOG)  # the agent ends an exec's output once
        client.subscribe(exec_id, output.put)
        process = AgentProcess(client, exec_id, output, owned=True, stdin_once=True)
        try:
            state = self._agent(sandbox, "state", id=container.id)
            if state["status"] != "running":
                raise FailedPrecondition(f"container {container.id[:12]} is not running")
            self._agent(sandbox, "exec", id=container.id, exec_id=exec_id, args=cmd, stdin=stdin, tty=tty)
        except BaseException:
            client.unsubscribe(exec_id)
            raise
        return process

    @hookimpl
    def runtime_exec(
        self, sandbox: SandboxRecord, container: ContainerRecord, cmd: list[str], tty: bool, stdin: bool
    ) -> StreamedProcess:
        return self._exec(sandbox, container, cmd, stdin, tty)

    @hookimpl
    def runtime_attach(self, sandbox: SandboxRecord, container: ContainerRecord, stdin: bool) -> StreamedProcess:
        output = self._outputs.get(container.id)
        if output is None:
            raise FailedPrecondition(f"container {container.id[:12]} has no output being copied")
        return _Attached(self._client(sandbox), container.id, output, container.runtime_data.get("stdin_once", False))

    @hookimpl
    def runtime_port_forward(self, sandbox: SandboxRecord, port: int) -> socket.socket:
        client = self._client(sandbox)
        sid = f"port-{os.urandom(8).hex()}"
        ours, theirs = socket.socketpair()
        answered = threading.Event()  # the pod's side of the connection ended

        def deliver(fd: int, data: bytes) -> None:
            try:
                if data:
                    ours.sendall(data)
                else:
                    ours.shutdown(socket.SHUT_WR)
                    answered.set()
            except OSError:  # the client went away
                client.close_input(sid)
                answered.set()

        client.subscribe(sid, deliver)
        try:
            self._agent(sandbox, "port_open", sid=sid, port=port)
        except BaseException:
            client.unsubscribe(sid)
            ours.close()
            theirs.close()
            raise

        def pump() -> None:
            with contextlib.suppress(OSError, ShimhubError):
                while data := ours.recv(65536):
                    client.write_input(sid, data)
            client.close_input(sid)
            answered.wait()
            client.unsubscribe(sid)
            ours.close()

        threading.Thread(target=pump, name=f"port-forward {sandbox.id[:12]}:{port}", daemon=True).start()
        return theirs


class _Attached(AgentProcess):
    """A client attached to a container's main process: its output from now on, its stdin."""

    def __init__(self, client: AgentClient, container_id: str, output: OutputFanout, stdin_once: bool) -> None:
        super().__init__(client, container_id, output.attach(), owned=False, stdin_once=stdin_once)
        self._container_output = output

    def close(self) -> None:
        self._container_output.detach(self.output)


def _mounts_under(directory: Path) -> list[str]:
    """Mount points at or below `directory`."""
    return mountinfo.under(str(directory))

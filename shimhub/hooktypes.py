"""Values that plugins receive from and return to shimhub's hooks.

Plain attrs classes: a plugin builds them with keyword arguments and never
needs to know how shimhub stores them.
"""

from __future__ import annotations

import logging
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

from attrs import define, field


@define
class PluginContext:
    """What shimhub gives a plugin when it sets it up."""

    #: The name of the handler (runtime plugins), driver or backend being set up.
    name: str
    #: A directory that persists across restarts, owned by this plugin instance.
    state_dir: Path
    #: A directory on tmpfs for sockets and pid files, owned by this plugin instance.
    run_dir: Path
    #: The logger the plugin should log to.
    log: logging.Logger
    #: The node's cgroup driver: "cgroupfs" or "systemd".
    cgroup_driver: str
    #: The extension hooks (see ExtensionSpec), for a runtime of API 1.x to call, e.g.
    #: ``context.extensions.shimhub_adjust_oci_spec(...)`` before creating a container. Deprecated: in
    #: API 2.0 the core runs them (and NRI) on every spec before the runtime gets it.
    extensions: Any


@define
class HandlerFeatures:
    """Optional features of a runtime handler, reported to the kubelet in Status."""

    recursive_read_only_mounts: bool = False
    user_namespaces: bool = False


@define
class SpecOptions:
    """How the core builds a runtime handler's pods and OCI specs (API 2.0)."""

    #: Clamp each container's oom_score_adj to shimhub's own, for a runtime that cannot set a lower one.
    restrict_oom_score_adj: bool = False
    #: The init (e.g. catatonit) the core runs to hold the PID namespace of a pod that shares one.
    pod_init: str = "catatonit"
    #: Whether the pod's namespaces are a VM's, the runtime's own: the core then pins none on the node and
    #: hands the runtime a spec that joins none (the runtime translates it for its guest).
    guest: bool = False


@define
class Pod:
    """What the core set up for a pod on the node; every container's spec joins it.

    Kept in ``SandboxRecord.pod``. The files are under `dir`: ``resolv.conf``,
    ``hosts`` and ``hostname``.
    """

    dir: str
    hostname: str
    #: Namespace type ("network", "ipc", "uts", "pid") -> path to join; absent = a new one; "" = the host's.
    namespaces: dict[str, str] = field(factory=dict)
    #: The pod's /dev/shm tmpfs ("": none, each container gets its own).
    shm: str = ""
    #: The process holding the pod's PID namespace (0: none).
    infra_pid: int = 0

    def file(self, name: str) -> str:
        """The path of one of the pod's files ("resolv.conf", "hosts", "hostname")."""
        return str(Path(self.dir, name))


@define
class Readiness:
    """Whether a plugin can serve requests now, and if not, why."""

    ready: bool
    #: Why the plugin is not ready, in words an operator can act on ("" when ready).
    reason: str = ""
    #: Runtime plugins: the handler's optional features.
    features: HandlerFeatures = field(factory=HandlerFeatures)
    #: Runtime plugins: how the core builds the handler's pods and specs.
    spec_options: SpecOptions = field(factory=SpecOptions)
    #: Anything worth showing in verbose Status output (JSON-serialisable).
    info: dict[str, Any] = field(factory=dict)


class ContainerStatus(Enum):
    """Where a container is in its life, as its runtime sees it."""

    CREATED = "created"
    RUNNING = "running"
    EXITED = "exited"
    UNKNOWN = "unknown"


@define
class ContainerState:
    """A runtime's live view of one container."""

    status: ContainerStatus
    pid: int = 0
    #: Nanoseconds since the epoch; 0 when not known.
    started_at: int = 0
    finished_at: int = 0
    exit_code: int = 0
    #: CRI reason once exited: "OOMKilled" when the kernel killed it for memory; left empty, the core
    #: says "Completed" (exit code 0) or "Error", the same for every runtime.
    reason: str = ""
    message: str = ""


@define
class ExecResult:
    """The outcome of a synchronous exec."""

    exit_code: int
    stdout: bytes = b""
    stderr: bytes = b""
    timed_out: bool = False


@define
class PodNetwork:
    """A pod's network as the network backend set it up."""

    #: Path of the pod's network namespace ("" for host-network pods).
    netns_path: str = ""
    #: Pod IPs, the primary first.
    ips: list[str] = field(factory=list)
    #: Backend data that teardown needs after a restart (JSON-serialisable).
    data: dict[str, Any] = field(factory=dict)


@define
class ContainerUsage:
    """A container's resource usage at one moment (counters are cumulative)."""

    timestamp: int
    cpu_usage_core_nanoseconds: int | None = None
    memory_working_set_bytes: int | None = None
    memory_usage_bytes: int | None = None
    memory_rss_bytes: int | None = None
    memory_page_faults: int | None = None
    memory_major_page_faults: int | None = None
    memory_limit_bytes: int | None = None
    process_count: int | None = None
    # Since plugin API 1.3, for cAdvisor's metrics (ListPodSandboxMetrics); None where the runtime cannot say.
    cpu_user_nanoseconds: int | None = None
    cpu_system_nanoseconds: int | None = None
    cpu_cfs_periods: int | None = None
    cpu_cfs_throttled_periods: int | None = None
    cpu_cfs_throttled_nanoseconds: int | None = None
    memory_cache_bytes: int | None = None
    memory_mapped_file_bytes: int | None = None
    memory_kernel_bytes: int | None = None
    memory_swap_bytes: int | None = None
    memory_max_usage_bytes: int | None = None
    memory_failcnt: int | None = None
    oom_events: int | None = None
    threads: int | None = None
    threads_max: int | None = None
    file_descriptors: int | None = None
    sockets: int | None = None
    #: Block I/O per device.
    io: list[DeviceIo] = field(factory=list)
    # Since plugin API 1.4, for the CRI's PSI and swap fields (cgroup v2); None where the node cannot say.
    cpu_pressure: Pressure | None = None
    memory_pressure: Pressure | None = None
    io_pressure: Pressure | None = None
    swap_limit_bytes: int | None = None


@define
class PressureLine:
    """One line of a cgroup v2 pressure file: the share of time tasks stalled, over 10/60/300 s, and in total."""

    total_ns: int = 0
    avg10: float = 0.0
    avg60: float = 0.0
    avg300: float = 0.0


@define
class Pressure:
    """Pressure-stall information of one resource: some tasks stalled, or all (`full`; None for cpu before 5.13)."""

    some: PressureLine = field(factory=PressureLine)
    full: PressureLine | None = None


@define
class DeviceIo:
    """Cumulative block I/O of a container on one device."""

    major: int
    minor: int
    read_bytes: int = 0
    write_bytes: int = 0
    reads: int = 0
    writes: int = 0


@define
class FilesystemUsage:
    """Bytes and inodes used by a layer or a container's writable layer."""

    used_bytes: int
    inodes_used: int


#: Which output of a streamed process a chunk came from (StreamedProcess.read_output).
STDOUT, STDERR = 1, 2


class StreamedProcess(Protocol):
    """A process whose stdio the streaming server relays to a client: an exec'd command or an attached container.

    A runtime plugin returns one from ``runtime_exec`` or ``runtime_attach``.
    shimhub reads output on one thread and writes input and resizes from
    others, so the methods must be safe to call concurrently with each other.
    """

    def read_output(self) -> tuple[int, bytes]:
        """Block until output is available: (STDOUT or STDERR, data); (STDOUT, b"") once all output ended."""

    def write_input(self, data: bytes) -> None:
        """Deliver `data` to the process's stdin (dropped when the process takes no input)."""

    def close_input(self) -> None:
        """End the process's stdin (the client closed its input)."""

    def resize(self, width: int, height: int) -> None:
        """Resize the process's terminal (ignored without a TTY)."""

    def wait(self) -> int | None:
        """After output ended: the exit code of an exec'd process, None for an attach."""

    def close(self) -> None:
        """Release everything; an exec'd process still running is killed. Idempotent."""

"""What both runtimes of this distribution (conmon-monitored and shim v2) derive alike from a container's CRI config."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from shimhub.errors import FailedPrecondition
from shimhub.oci import spec
from shimhub.oci.pod import context as pod_context
from shimhub.records import ContainerRecord, SandboxRecord
from shimhub_proto.cri.v1 import api_pb2 as cri

TERMINATION_LOG = "/dev/termination-log"
#: The highest signal number (SIGRTMAX on Linux).
MAX_SIGNAL = 64
SIGNAL_NAMES = frozenset(cri.Signal.keys()) - {"RUNTIME_DEFAULT"}
log = logging.getLogger(__name__)
TERMINATION_LOG_LIMIT = 4096


class OomScore:
    """oom_score_adj values clamped, when the handler asks for it, to what shimhub itself may set."""

    def __init__(self, restrict: bool, log: logging.Logger) -> None:
        self.restrict = restrict
        self.log = log
        with open("/proc/self/oom_score_adj") as own:
            self.floor = int(own.read())

    def clamp(self, requested: int) -> int:
        if self.restrict and requested < self.floor:
            self.log.info("oom_score_adj %d clamped to %d: shimhub itself may not go lower", requested, self.floor)
            return self.floor
        return requested


def build(
    sandbox: SandboxRecord,
    container: ContainerRecord,
    config: cri.ContainerConfig,
    rootfs: str,
    image: Mapping[str, Any],
    *,
    pod_data: dict[str, Any] | None,
    cgroup_driver: str,
    oom: OomScore,
    extensions: Any,
) -> tuple[dict[str, Any], str]:
    """The container's OCI spec, adjusted by the extensions, and its cgroup path.

    `pod_data` is what the runtime kept of the pod (None: the pod is not this runtime's).
    """
    if not rootfs:
        raise FailedPrecondition("this runtime runs containers from images: the container has no root filesystem")
    if pod_data is None:
        raise FailedPrecondition(f"pod sandbox {sandbox.id} was not set up by this runtime")
    context = pod_context(pod_data, sandbox.pod_config())
    cgroup = spec.cgroups_path(cgroup_driver, context.cgroup_parent, container.id)
    oci_spec = spec.build(
        config,
        image,
        rootfs,
        pod=context,
        cgroup_path=cgroup,
        oom_score_adj=oom.clamp(config.linux.resources.oom_score_adj),
        user=container.user,
    )
    if extensions is not None:
        extensions.adjust_oci_spec(sandbox, container, oci_spec)
    return oci_spec, cgroup


def stop_signal(config: cri.ContainerConfig, image: Mapping[str, Any]) -> str:
    """The signal that asks the container to stop: the CRI's, else the image's, else SIGTERM.

    An image's StopSignal that names no signal is logged and SIGTERM used: a bad one must not make
    every graceful stop fail.
    """
    if config.stop_signal != cri.RUNTIME_DEFAULT:
        return cri.Signal.Name(config.stop_signal)
    configured = str((image.get("config") or {}).get("StopSignal") or "SIGTERM").upper()
    name = configured if configured.startswith("SIG") or configured.isdigit() else f"SIG{configured}"
    if name in SIGNAL_NAMES or (name.isdigit() and 1 <= int(name) <= MAX_SIGNAL):
        return name
    log.warning("the image's StopSignal %r is not a signal; SIGTERM stops the container", configured[:64])
    return "SIGTERM"


def termination_log(config: cri.ContainerConfig) -> str:
    """The host file mounted at /dev/termination-log ("" if none)."""
    return next((m.host_path for m in config.mounts if m.container_path == TERMINATION_LOG), "")


def termination_message(path: str) -> str:
    """What the container wrote to its termination log (at most 4 KiB)."""
    if not path:
        return ""
    try:
        with open(path, "rb") as log:
            return log.read(TERMINATION_LOG_LIMIT).decode(errors="replace")
    except OSError:
        return ""

"""The finished OCI specs the core hands a runtime: a container's, and its pod's sandbox process's."""

from __future__ import annotations

import functools
import logging
import shutil
from collections.abc import Mapping
from typing import Any

from shimhub.errors import FailedPrecondition
from shimhub.hooktypes import Pod, SpecOptions
from shimhub.oci import devices, spec
from shimhub.oci.pod import context as pod_context
from shimhub.records import ContainerRecord, SandboxRecord
from shimhub.users import User
from shimhub_proto.cri.v1 import api_pb2 as cri

TERMINATION_LOG = "/dev/termination-log"
#: The highest signal number (SIGRTMAX on Linux).
MAX_SIGNAL = 64
SIGNAL_NAMES = frozenset(cri.Signal.keys()) - {"RUNTIME_DEFAULT"}
log = logging.getLogger(__name__)
TERMINATION_LOG_LIMIT = 4096
#: Where a sandbox process's init is bound in its (empty) root filesystem, and its oom_score_adj.
SANDBOX_INIT = "/pause"
SANDBOX_OOM_SCORE = -998


@functools.cache
def _own_oom_score() -> int:
    with open("/proc/self/oom_score_adj") as own:
        return int(own.read())


def oom_score(requested: int, options: SpecOptions) -> int:
    """`requested`, clamped to shimhub's own oom_score_adj when the handler asks for it."""
    floor = _own_oom_score()
    if options.restrict_oom_score_adj and requested < floor:
        log.info("oom_score_adj %d clamped to %d: shimhub itself may not go lower", requested, floor)
        return floor
    return requested


def _pod(sandbox: SandboxRecord) -> Pod:
    if sandbox.pod is None:
        raise FailedPrecondition(f"pod sandbox {sandbox.id} has no pod set up by shimhub")
    return sandbox.pod


def build(  # noqa: PLR0917 - what a container is made of
    sandbox: SandboxRecord,
    container: ContainerRecord,
    config: cri.ContainerConfig,
    image: Mapping[str, Any],
    cgroup_driver: str,
    options: SpecOptions,
    device_policy: devices.Policy,
) -> dict[str, Any]:
    """The container's OCI spec, before devices, extensions and NRI, with its root at ``container.rootfs``."""
    context = pod_context(_pod(sandbox), sandbox.pod_config(), sandbox.user_namespace)
    return spec.build(
        config,
        image,
        container.rootfs,
        pod=context,
        cgroup_path=spec.cgroups_path(cgroup_driver, context.cgroup_parent, container.id),
        oom_score_adj=oom_score(config.linux.resources.oom_score_adj, options),
        user=container.user,
        device_policy=device_policy,
    )


def sandbox_process(
    sandbox: SandboxRecord, config: cri.PodSandboxConfig, cgroup_driver: str, options: SpecOptions
) -> dict[str, Any]:
    """The OCI spec of a pod's sandbox process, for a runtime that runs one (a shim v2 sandbox task).

    It runs the handler's pod init as `SANDBOX_INIT`, bound read-only into an empty root filesystem
    at the bundle's ``rootfs``, and joins every namespace of the pod. `config` is the pod's config as
    the runtime sees it (only the annotations it allows).
    """
    init = shutil.which(options.pod_init)
    if init is None:
        raise FailedPrecondition(f"the pod's sandbox process needs {options.pod_init} (Debian package catatonit)")
    context = pod_context(_pod(sandbox), config, sandbox.user_namespace)
    process = cri.ContainerConfig(command=[SANDBOX_INIT, "-P"])
    process.linux.security_context.readonly_rootfs = True
    sandbox_spec = spec.build(
        process,
        {},
        "rootfs",
        pod=context,
        cgroup_path=spec.cgroups_path(cgroup_driver, config.linux.cgroup_parent, sandbox.id),
        oom_score_adj=oom_score(SANDBOX_OOM_SCORE, options),
        user=User(),
    )
    bind = {"destination": SANDBOX_INIT, "type": "bind", "source": init, "options": ["rbind", "ro"]}
    sandbox_spec["mounts"].append(bind)
    sandbox_spec["annotations"] = dict(config.annotations)
    return sandbox_spec


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

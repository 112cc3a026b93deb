"""Building a container's OCI runtime spec from its CRI config and its image config."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from attrs import define, field

from shimhub.errors import InvalidArgument
from shimhub.oci import devices, seccomp
from shimhub.users import User
from shimhub_proto.cri.v1 import api_pb2 as cri

OCI_VERSION = "1.0.2"
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Capabilities a container has unless it adds or drops some (the common runtime default).
DEFAULT_CAPABILITIES = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
]
#: Every capability, in the kernel's bit order.
ALL_CAPABILITIES = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
]
MASKED_PATHS = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
]
READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
_PROPAGATION = {
    cri.PROPAGATION_PRIVATE: "rprivate",
    cri.PROPAGATION_HOST_TO_CONTAINER: "rslave",
    cri.PROPAGATION_BIDIRECTIONAL: "rshared",
}


@define
class PodContext:
    """What a container takes from its pod: namespaces to join and the pod's shared files."""

    #: Namespace type ("network", "ipc", "uts", "pid") -> path to join; absent = a new one; "" = the host's.
    namespaces: dict[str, str] = field(factory=dict)
    hostname: str = ""
    resolv_conf: str = ""
    hosts: str = ""
    hostname_file: str = ""
    shm: str = ""
    cgroup_parent: str = ""
    sysctls: dict[str, str] = field(factory=dict)
    #: The pod's pinned user namespace ("": the node's) and its OCI uidMappings/gidMappings.
    user_namespace: str = ""
    id_mappings: dict[str, list[dict[str, int]]] = field(factory=dict)


def command(config: cri.ContainerConfig, image: Mapping[str, Any]) -> list[str]:
    """The process's argv, by the Kubernetes rules for command/args against the image's Entrypoint/Cmd."""
    entrypoint = list(config.command) or list(image.get("Entrypoint") or [])
    if config.args:
        arguments = list(config.args)
    elif config.command:
        arguments = []
    else:
        arguments = list(image.get("Cmd") or [])
    argv = entrypoint + arguments
    if not argv:
        raise InvalidArgument("the container has no command: the config and the image give none")
    return argv


def environment(config: cri.ContainerConfig, image: Mapping[str, Any], user: User) -> list[str]:
    """The image's environment overridden by the CRI's, with PATH and HOME filled in."""
    merged: dict[str, str] = {}
    for entry in list(image.get("Env") or []):
        key, _, value = entry.partition("=")
        merged[key] = value
    for pair in config.envs:
        merged[pair.key] = pair.value
    merged.setdefault("PATH", DEFAULT_PATH.partition("=")[2])
    merged.setdefault("HOME", user.home or "/")
    return [f"{key}={value}" for key, value in merged.items()]


def held_capabilities() -> list[str]:
    """The capabilities in shimhub's own bounding set: all that a container can be given."""
    with open("/proc/self/status") as status:
        bounding = next(int(line.split()[1], 16) for line in status if line.startswith("CapBnd:"))
    return [name for bit, name in enumerate(ALL_CAPABILITIES) if bounding >> bit & 1]


def capabilities(security: cri.LinuxContainerSecurityContext) -> list[str]:
    """The capability set: the default, plus added, minus dropped ("ALL" allowed in both).

    "ALL" and privileged mean every capability shimhub itself holds.
    """
    if security.privileged:
        return held_capabilities()

    def normalise(names: Any) -> set[str]:
        return {
            name.upper() if name.upper().startswith("CAP_") or name.upper() == "ALL" else f"CAP_{name.upper()}"
            for name in names
        }

    added, dropped = (
        normalise(security.capabilities.add_capabilities),
        normalise(security.capabilities.drop_capabilities),
    )
    # "ALL" first, so that single names still count: drop ALL + add NET_BIND_SERVICE keeps that one.
    current = set(held_capabilities()) if "ALL" in added else set(DEFAULT_CAPABILITIES)
    if "ALL" in dropped:
        current = set()
    current = (current | (added - {"ALL"})) - dropped
    unknown = sorted(current - set(ALL_CAPABILITIES))
    if unknown:
        raise InvalidArgument(f"unknown capabilities: {', '.join(unknown)}")
    return sorted(current)


def _cri_mounts(config: cri.ContainerConfig) -> list[dict[str, Any]]:
    mounts = []
    for mount in config.mounts:
        if not os.path.isabs(mount.container_path):
            raise InvalidArgument(f"mount container_path {mount.container_path!r} must be absolute")
        if not os.path.exists(mount.host_path):
            raise InvalidArgument(f"mount host_path {mount.host_path!r} does not exist")
        options = ["rbind", "ro" if mount.readonly else "rw", _PROPAGATION[mount.propagation]]
        if mount.recursive_read_only:
            options.append("rro")
        mounts.append(
            {
                "destination": mount.container_path,
                "type": "bind",
                "source": os.path.realpath(mount.host_path),
                "options": options,
            }
        )
    return mounts


def _base_mounts(pod: PodContext, privileged: bool, have: set[str]) -> list[dict[str, Any]]:
    sys_options = ["nosuid", "noexec", "nodev", "rw" if privileged else "ro"]
    mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        },
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": sys_options},
        {
            "destination": "/sys/fs/cgroup",
            "type": "cgroup",
            "source": "cgroup",
            "options": ["nosuid", "noexec", "nodev", "relatime", "rw" if privileged else "ro"],
        },
    ]
    if pod.shm:
        mounts.append({"destination": "/dev/shm", "type": "bind", "source": pod.shm, "options": ["rbind", "rw"]})
    else:
        mounts.append(
            {
                "destination": "/dev/shm",
                "type": "tmpfs",
                "source": "shm",
                "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
            }
        )
    for destination, source in (
        ("/etc/resolv.conf", pod.resolv_conf),
        ("/etc/hosts", pod.hosts),
        ("/etc/hostname", pod.hostname_file),
    ):
        if source and destination not in have:
            mounts.append({"destination": destination, "type": "bind", "source": source, "options": ["rbind", "rw"]})
    return [m for m in mounts if m["destination"] not in have]


def resources(linux: cri.LinuxContainerResources) -> dict[str, Any]:
    """The OCI linux.resources of CRI resources (unset values left out)."""
    result: dict[str, Any] = {}
    cpu = {
        key: value
        for key, value in (
            ("shares", linux.cpu_shares),
            ("quota", linux.cpu_quota),
            ("period", linux.cpu_period),
            ("cpus", linux.cpuset_cpus),
            ("mems", linux.cpuset_mems),
        )
        if value
    }
    if cpu:
        result["cpu"] = cpu
    memory = {}
    if linux.memory_limit_in_bytes:
        memory["limit"] = linux.memory_limit_in_bytes
    if linux.memory_swap_limit_in_bytes:
        memory["swap"] = linux.memory_swap_limit_in_bytes
    if memory:
        result["memory"] = memory
    if linux.hugepage_limits:
        result["hugepageLimits"] = [{"pageSize": h.page_size, "limit": h.limit} for h in linux.hugepage_limits]
    if linux.unified:
        result["unified"] = dict(linux.unified)
    return result


def cgroups_path(cgroup_driver: str, parent: str, container_id: str) -> str:
    """Where the container's cgroup goes, in the form the cgroup driver wants."""
    if cgroup_driver == "systemd":
        return f"{parent or 'system.slice'}:shimhub:{container_id}"
    return f"{parent.rstrip('/') or '/shimhub'}/shimhub-{container_id}"


def build(
    config: cri.ContainerConfig,
    image: Mapping[str, Any],
    rootfs: str,
    *,
    pod: PodContext,
    cgroup_path: str,
    oom_score_adj: int,
    user: User,
    device_policy: devices.Policy = devices.DEFAULT,
) -> dict[str, Any]:
    """The OCI runtime spec of a container that runs as `user` (which shimhub resolved)."""
    security = config.linux.security_context
    image_config = image.get("config") or {}
    privileged = security.privileged
    caps = capabilities(security)
    mounts = _cri_mounts(config)
    have = {m["destination"] for m in mounts}
    nodes, device_rules = devices.for_container(config, user, device_policy)
    linux_resources = resources(config.linux.resources)
    linux_resources["devices"] = [{"allow": True, "access": "rwm"}] if privileged else device_rules
    namespaces = [{"type": "mount"}]
    if pod.user_namespace:
        namespaces.append({"type": "user", "path": pod.user_namespace})
    for kind in ("network", "ipc", "uts", "pid"):
        if kind not in pod.namespaces:
            namespaces.append({"type": kind})
        elif pod.namespaces[kind]:
            namespaces.append({"type": kind, "path": pod.namespaces[kind]})
    process: dict[str, Any] = {
        "terminal": config.tty,
        "user": {"uid": user.uid, "gid": user.gid, "additionalGids": user.additional_gids},
        "args": command(config, image_config),
        "env": environment(config, image_config, user),
        "cwd": config.working_dir or image_config.get("WorkingDir") or "/",
        "capabilities": {key: caps for key in ("bounding", "effective", "permitted")},
        "noNewPrivileges": security.no_new_privs,
        "oomScoreAdj": oom_score_adj,
    }
    if security.capabilities.add_ambient_capabilities:
        process["capabilities"]["ambient"] = sorted(
            set(caps)
            & {c if c.startswith("CAP_") else f"CAP_{c}" for c in security.capabilities.add_ambient_capabilities}
        )
    linux: dict[str, Any] = {
        "namespaces": namespaces,
        "resources": linux_resources,
        "cgroupsPath": cgroup_path,
        "devices": nodes,
        "sysctl": dict(pod.sysctls),
        **(pod.id_mappings if pod.user_namespace else {}),
    }
    if not privileged:
        linux["maskedPaths"] = list(security.masked_paths) or MASKED_PATHS
        linux["readonlyPaths"] = list(security.readonly_paths) or READONLY_PATHS
    seccomp_profile = seccomp.profile(security.seccomp, privileged, caps)
    if seccomp_profile is not None:
        linux["seccomp"] = seccomp_profile
    if any("rshared" in m["options"] for m in mounts):
        linux["rootfsPropagation"] = "rshared"
    elif any("rslave" in m["options"] for m in mounts):
        linux["rootfsPropagation"] = "rslave"
    spec: dict[str, Any] = {
        "ociVersion": OCI_VERSION,
        "process": process,
        "root": {"path": rootfs, "readonly": security.readonly_rootfs},
        "mounts": _base_mounts(pod, privileged, have) + mounts,
        "linux": linux,
        "annotations": dict(config.annotations),
    }
    if "uts" in pod.namespaces and pod.namespaces["uts"] == "":
        return spec  # the host's UTS namespace: the hostname is the node's
    if pod.hostname and "uts" not in pod.namespaces:
        spec["hostname"] = pod.hostname
    return spec

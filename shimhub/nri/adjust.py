"""What NRI plugins ask of a container being created, checked and applied to its OCI spec.

Each kind of adjustment can be allowed or not by the node (``[nri]
allowed_adjustments``); one that is not allowed, or that shimhub does not apply
(namespaces, seccomp, scheduling, RDT, memory policy, cgroup
paths), fails the creation rather than be dropped unseen. Values are checked
as the core checks the CRI's: absolute mount destinations and existing bind
sources, namespaced sysctls the pod owns, well-formed devices and limits.
"""

from __future__ import annotations

import os
import re
from typing import Any

from shimhub.cdi import Registry
from shimhub.config import NRI_ADJUSTMENTS
from shimhub.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from shimhub.validation import check_sysctl
from shimhub_proto.cri.v1 import api_pb2 as cri
from shimhub_proto.nri import api_pb2 as nri

#: The adjustments shimhub applies, by the names [nri] allowed_adjustments uses.
KINDS = NRI_ADJUSTMENTS
RLIMIT = re.compile(r"RLIMIT_[A-Z]+")
HOOK_KINDS = ("prestart", "create_runtime", "create_container", "start_container", "poststart", "poststop")
OCI_HOOK_KINDS = dict(
    zip(
        HOOK_KINDS,
        ("prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop"),
        strict=True,
    )
)
DEVICE_TYPES = {"c", "b", "u", "p"}


def _unsupported(adjust: nri.ContainerAdjustment) -> list[str]:
    """What `adjust` asks for that shimhub does not apply."""
    linux = adjust.linux
    asked = {
        "a cgroup path": bool(linux.cgroups_path),
        "namespaces": bool(linux.namespaces),
        "network devices": bool(linux.net_devices),
        "a block I/O class": linux.resources.HasField("blockio_class"),
        "an RDT class": linux.resources.HasField("rdt_class"),
    }
    for field, what in (
        ("seccomp_policy", "a seccomp policy"),
        ("scheduler", "scheduling attributes"),
        ("io_priority", "an I/O priority"),
        ("rdt", "RDT settings"),
        ("memory_policy", "a memory policy"),
    ):
        asked[what] = linux.HasField(field)
    return [what for what, present in asked.items() if present]


def _kinds(adjust: nri.ContainerAdjustment) -> list[str]:
    """The kinds of adjustment `adjust` makes."""
    linux = adjust.linux
    made = {
        "annotations": bool(adjust.annotations),
        "mounts": bool(adjust.mounts),
        "env": bool(adjust.env),
        "hooks": adjust.HasField("hooks") and any(getattr(adjust.hooks, kind) for kind in HOOK_KINDS),
        "devices": bool(linux.devices),
        "cdi_devices": bool(adjust.CDI_devices),
        "resources": linux.HasField("resources"),
        "rlimits": bool(adjust.rlimits),
        "args": bool(adjust.args),
        "oom_score_adj": linux.HasField("oom_score_adj"),
        "sysctl": bool(linux.sysctl),
    }
    return [kind for kind, present in made.items() if present]


def apply(
    spec: dict[str, Any],
    adjust: nri.ContainerAdjustment,
    allowed: frozenset[str],
    plugin: str,
    namespaces: cri.NamespaceOption,
    *,
    devices: Registry,
) -> list[str]:
    """Check `adjust` and apply it to `spec` in place (its CDI devices from `devices`); the kinds made."""
    unsupported = _unsupported(adjust)
    if unsupported:
        raise FailedPrecondition(f"NRI plugin {plugin} asks for {', '.join(unsupported)}, which shimhub does not apply")
    kinds = _kinds(adjust)
    refused = [kind for kind in kinds if kind not in allowed]
    if refused:
        raise PermissionDenied(
            f"NRI plugin {plugin} adjusts {', '.join(refused)}, which this node does not allow "
            "([nri] allowed_adjustments)"
        )
    where = f"NRI plugin {plugin}"
    _annotations(spec, adjust, where)
    _mounts(spec, adjust, where)
    _env(spec, adjust, where)
    _hooks(spec, adjust, where)
    _devices(spec, adjust, where)
    devices.inject(spec, [device.name for device in adjust.CDI_devices])
    if adjust.linux.HasField("resources"):
        _resources(spec.setdefault("linux", {}).setdefault("resources", {}), adjust.linux.resources, where)
    _rlimits(spec, adjust, where)
    if adjust.args:
        spec["process"]["args"] = list(adjust.args)
    if adjust.linux.HasField("oom_score_adj"):
        value = adjust.linux.oom_score_adj.value
        if not -1000 <= value <= 1000:
            raise InvalidArgument(f"{where}: oom_score_adj {value} is outside -1000..1000")
        spec["process"]["oomScoreAdj"] = value
    for key, value in adjust.linux.sysctl.items():
        check_sysctl(key, value, namespaces)
        spec["linux"].setdefault("sysctl", {})[key] = value
    return kinds


def _removal(key: str) -> tuple[bool, str]:
    """NRI marks an entry to remove with a leading '-'."""
    return (True, key[1:]) if key.startswith("-") else (False, key)


def _annotations(spec: dict[str, Any], adjust: nri.ContainerAdjustment, where: str) -> None:
    annotations = spec.setdefault("annotations", {})
    for key, value in adjust.annotations.items():
        remove, name = _removal(key)
        if not name:
            raise InvalidArgument(f"{where}: an annotation without a name")
        if remove:
            annotations.pop(name, None)
        else:
            annotations[name] = value


def _mounts(spec: dict[str, Any], adjust: nri.ContainerAdjustment, where: str) -> None:
    mounts = spec.setdefault("mounts", [])
    for mount in adjust.mounts:
        remove, destination = _removal(mount.destination)
        if not os.path.isabs(destination):
            raise InvalidArgument(f"{where}: mount destination {destination[:256]!r} is not absolute")
        mounts[:] = [m for m in mounts if m["destination"] != destination]
        if remove:
            continue
        binds = mount.type == "bind" or "bind" in mount.options or "rbind" in mount.options
        if binds and not os.path.exists(mount.source):
            raise InvalidArgument(f"{where}: mount source {mount.source[:256]!r} does not exist")
        mounts.append(
            {"destination": destination, "type": mount.type, "source": mount.source, "options": list(mount.options)}
        )


def _env(spec: dict[str, Any], adjust: nri.ContainerAdjustment, where: str) -> None:
    current = dict(entry.partition("=")[::2] for entry in spec["process"].get("env", []))
    for pair in adjust.env:
        remove, key = _removal(pair.key)
        if not key or "=" in key or "\0" in key + pair.value:
            raise InvalidArgument(f"{where}: environment variable {key[:128]!r} is not a valid name")
        if remove:
            current.pop(key, None)
        else:
            current[key] = pair.value
    spec["process"]["env"] = [f"{key}={value}" for key, value in current.items()]


def _hooks(spec: dict[str, Any], adjust: nri.ContainerAdjustment, where: str) -> None:
    for kind in HOOK_KINDS:
        for hook in getattr(adjust.hooks, kind):
            if not os.path.isabs(hook.path):
                raise InvalidArgument(f"{where}: OCI hook {hook.path[:256]!r} is not an absolute path")
            entry: dict[str, Any] = {"path": hook.path, "args": list(hook.args), "env": list(hook.env)}
            if hook.HasField("timeout"):
                entry["timeout"] = hook.timeout.value
            spec.setdefault("hooks", {}).setdefault(OCI_HOOK_KINDS[kind], []).append(entry)


def _devices(spec: dict[str, Any], adjust: nri.ContainerAdjustment, where: str) -> None:
    linux = spec.setdefault("linux", {})
    for device in adjust.linux.devices:
        if not os.path.isabs(device.path) or device.type not in DEVICE_TYPES or device.major < 0 or device.minor < 0:
            raise InvalidArgument(
                f"{where}: device {device.path[:256]!r} needs an absolute path, a type of c, b, u or p, "
                "and a major and minor of 0 or more"
            )
        entry: dict[str, Any] = {"path": device.path, "type": device.type, "major": device.major, "minor": device.minor}
        for field, key in (("file_mode", "fileMode"), ("uid", "uid"), ("gid", "gid")):
            if device.HasField(field):
                entry[key] = getattr(device, field).value
        linux.setdefault("devices", [])
        linux["devices"] = [d for d in linux["devices"] if d["path"] != device.path] + [entry]
        rule = {
            "allow": True,
            "type": "c" if device.type == "u" else device.type,
            "major": device.major,
            "minor": device.minor,
            "access": "rwm",
        }
        linux.setdefault("resources", {}).setdefault("devices", []).append(rule)


def _resources(target: dict[str, Any], resources: nri.LinuxResources, where: str) -> None:
    memory, cpu = resources.memory, resources.cpu
    values = {
        ("memory", "limit"): memory.limit if memory.HasField("limit") else None,
        ("memory", "reservation"): memory.reservation if memory.HasField("reservation") else None,
        ("memory", "swap"): memory.swap if memory.HasField("swap") else None,
        ("cpu", "shares"): cpu.shares if cpu.HasField("shares") else None,
        ("cpu", "quota"): cpu.quota if cpu.HasField("quota") else None,
        ("cpu", "period"): cpu.period if cpu.HasField("period") else None,
    }
    for (group, key), optional in values.items():
        if optional is None:
            continue
        if optional.value < 0 and (group, key) != ("cpu", "quota"):
            raise InvalidArgument(f"{where}: {group} {key} {optional.value} is negative")
        target.setdefault(group, {})[key] = optional.value
    for key, value in (("cpus", cpu.cpus), ("mems", cpu.mems)):
        if value:
            if not re.fullmatch(r"[0-9,-]+", value):
                raise InvalidArgument(f"{where}: cpuset {key} {value[:64]!r} is not a list of numbers and ranges")
            target.setdefault("cpu", {})[key] = value
    if resources.hugepage_limits:
        target["hugepageLimits"] = [{"pageSize": h.page_size, "limit": h.limit} for h in resources.hugepage_limits]
    if resources.unified:
        target.setdefault("unified", {}).update(resources.unified)
    if resources.HasField("pids"):
        if resources.pids.limit < 0:
            raise InvalidArgument(f"{where}: pids limit {resources.pids.limit} is negative")
        target["pids"] = {"limit": resources.pids.limit}


def _rlimits(spec: dict[str, Any], adjust: nri.ContainerAdjustment, where: str) -> None:
    for rlimit in adjust.rlimits:
        if not RLIMIT.fullmatch(rlimit.type) or rlimit.soft > rlimit.hard:
            raise InvalidArgument(f"{where}: rlimit {rlimit.type[:32]!r} is unknown, or its soft limit over its hard")
        limits = [r for r in spec["process"].get("rlimits", []) if r["type"] != rlimit.type]
        spec["process"]["rlimits"] = [*limits, {"type": rlimit.type, "hard": rlimit.hard, "soft": rlimit.soft}]

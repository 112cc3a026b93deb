"""CDI, the Container Device Interface: devices named ``vendor.com/class=name`` injected into a finished spec.

Spec files (``*.json``, ``*.yaml``) are read from the configured directories,
again whenever one of them changes; a device of a later directory replaces the
one of an earlier directory, and two files of one directory defining the same
device make it unusable (a conflict). A malformed file is logged and skipped.
The files are the node's (root-owned directories), but each is still read
bounded in size and only as a regular file inside its directory.

A container asks for devices in ``ContainerConfig.CDI_devices`` and in
``cdi.k8s.io/<key>`` annotations (comma-separated names), as the kubelet sends
them. Each device's edits, then its spec file's, are applied to the spec:
environment, device nodes with their cgroup rules, mounts, hooks, additional
groups, Intel RDT and network devices.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from attrs import define, field

from shimhub.errors import FailedPrecondition
from shimhub_proto.cri.v1 import api_pb2 as cri

log = logging.getLogger(__name__)

ANNOTATION_PREFIX = "cdi.k8s.io/"
#: Largest spec file read.
MAX_SPEC_BYTES = 1 << 20
#: Most spec files read from one directory.
MAX_SPEC_FILES = 1024
KIND = re.compile(r"^[a-zA-Z0-9]([a-zA-Z0-9.-]{0,251}[a-zA-Z0-9])?/[a-zA-Z0-9]([a-zA-Z0-9._-]{0,61}[a-zA-Z0-9])?$")
NAME = re.compile(r"^[a-zA-Z0-9]([a-zA-Z0-9._-]{0,251}[a-zA-Z0-9])?$")
HOOKS = {"prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop"}
#: CDI's word for no cgroup access at all.
NO_PERMISSIONS = "none"


class SpecError(ValueError):
    """A spec file that does not follow the CDI schema; the message names the key."""


@define
class Device:
    """One device of one spec file."""

    name: str  # qualified: vendor.com/class=name
    edits: dict[str, Any]
    spec_edits: dict[str, Any]
    path: str  # the spec file


@define
class _Scan:
    """What the directories held at one look: devices by name, conflicts, and when they changed."""

    stamp: tuple[tuple[str, float], ...] = ()
    devices: dict[str, Device] = field(factory=dict)
    conflicts: dict[str, list[str]] = field(factory=dict)


def requested(config: cri.ContainerConfig) -> list[str]:
    """The CDI devices a container asks for, in order and once each: the CRI field's, then the annotations'."""
    names = [device.name for device in config.CDI_devices]
    for key in sorted(config.annotations):
        if key.startswith(ANNOTATION_PREFIX):
            names += [name.strip() for name in config.annotations[key].split(",") if name.strip()]
    return list(dict.fromkeys(names))


def _node_problem(node: Any) -> str:
    if not isinstance(node, dict) or not isinstance(node.get("path"), str) or not node["path"].startswith("/"):
        return "needs an absolute path"
    if node.get("type", "") not in ("", "b", "c", "u", "p"):
        return f"type {node['type']!r} is not b, c, u or p"
    permissions = node.get("permissions", "")
    if permissions != NO_PERMISSIONS and (not isinstance(permissions, str) or permissions.strip("rwm")):
        return f"permissions {permissions!r} are not r, w, m or none"
    return ""


def _mount_problem(mount: Any) -> str:
    paths = isinstance(mount, dict) and all(isinstance(mount.get(k), str) for k in ("hostPath", "containerPath"))
    return "" if paths else "needs hostPath and containerPath"


def _hook_problem(hook: Any) -> str:
    named = isinstance(hook, dict) and hook.get("hookName") in HOOKS
    return (
        ""
        if named and str(hook.get("path", "")).startswith("/")
        else f"needs a hookName of {sorted(HOOKS)} and an absolute path"
    )


def _env_problem(variable: Any) -> str:
    return "" if isinstance(variable, str) and "=" in variable else "expected NAME=value"


#: What each list of container edits must hold: a function saying what is wrong with an item ("" if nothing).
ITEM_CHECKS = {
    "env": _env_problem,
    "deviceNodes": _node_problem,
    "mounts": _mount_problem,
    "hooks": _hook_problem,
    "additionalGids": lambda gid: "" if isinstance(gid, int) and gid >= 0 else "expected a group id",
    "netDevices": lambda net: (
        "" if isinstance(net, dict) and isinstance(net.get("hostInterfaceName"), str) else "needs hostInterfaceName"
    ),
}


def _edits(document: Any, where: str) -> dict[str, Any]:
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise SpecError(f"{where}: expected an object")
    if not isinstance(document.get("intelRdt", {}), dict):
        raise SpecError(f"{where}.intelRdt: expected an object")
    for key, problem in ITEM_CHECKS.items():
        items = document.get(key, [])
        if not isinstance(items, list):
            raise SpecError(f"{where}.{key}: expected a list")
        for number, item in enumerate(items):
            said = problem(item)
            if said:
                raise SpecError(f"{where}.{key}[{number}]: {said}")
    return document


def parse(document: Any, path: str) -> list[Device]:
    """The devices of one spec file's document (SpecError naming the key when it is malformed)."""
    if not isinstance(document, dict):
        raise SpecError("the document is not an object")
    if not isinstance(document.get("cdiVersion"), str):
        raise SpecError("cdiVersion: missing")
    kind = document.get("kind")
    if not isinstance(kind, str) or not KIND.match(kind):
        raise SpecError(f"kind: {str(kind)[:256]!r} is not vendor.com/class")
    devices = document.get("devices")
    if not isinstance(devices, list) or not devices:
        raise SpecError("devices: at least one is needed")
    spec_edits = _edits(document.get("containerEdits"), "containerEdits")
    found = []
    for number, device in enumerate(devices):
        name = device.get("name") if isinstance(device, dict) else None
        if not isinstance(name, str) or not NAME.match(name):
            raise SpecError(f"devices[{number}].name: {str(name)[:256]!r} is not a device name")
        edits = _edits(device.get("containerEdits"), f"devices[{number}].containerEdits")
        found.append(Device(f"{kind}={name}", edits, spec_edits, path))
    return found


def _read(path: Path, directory: Path) -> Any:
    """A spec file's document: a regular file inside `directory`, at most MAX_SPEC_BYTES."""
    if not path.resolve().is_relative_to(directory.resolve()):
        raise SpecError("it leads out of its directory")
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SpecError("it is not a regular file")
        data = file.read(MAX_SPEC_BYTES + 1)
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(f"it is larger than {MAX_SPEC_BYTES} bytes")
    if path.suffix == ".json":
        return json.loads(data)
    import yaml  # only nodes with YAML spec files need it loaded

    try:
        return yaml.safe_load(data)
    except yaml.YAMLError as exc:
        raise SpecError(f"it is not YAML: {exc}") from None


class Registry:
    """The devices of the node's CDI spec directories, looked at again when one of them changed."""

    def __init__(self, directories: Iterable[str]) -> None:
        self.directories = [Path(directory) for directory in directories]
        self._scan = _Scan()
        self._lock = threading.Lock()

    def _stamp(self) -> tuple[tuple[str, float], ...]:
        stamps = []
        for directory in self.directories:
            try:
                stamps.append((str(directory), os.stat(directory).st_mtime))
                for entry in os.scandir(directory):
                    stamps.append((entry.path, entry.stat(follow_symlinks=False).st_mtime))
            except OSError:
                continue
        return tuple(stamps)

    def _current(self) -> _Scan:
        stamp = self._stamp()
        with self._lock:
            if stamp != self._scan.stamp:
                self._scan = self._load(stamp)
            return self._scan

    def _load(self, stamp: tuple[tuple[str, float], ...]) -> _Scan:
        scan = _Scan(stamp=stamp)
        for directory in self.directories:  # a later directory's device replaces an earlier one's
            mine: dict[str, Device] = {}
            clashes: dict[str, list[str]] = {}
            try:
                paths = sorted(p for p in directory.iterdir() if p.suffix in (".json", ".yaml", ".yml"))
            except OSError:
                continue
            for path in paths[:MAX_SPEC_FILES]:
                try:
                    devices = parse(_read(path, directory), str(path))
                except (OSError, ValueError) as exc:  # SpecError is a ValueError, as are JSON's errors
                    log.warning("CDI: spec file %s skipped: %s", path, str(exc)[:512])
                    continue
                for device in devices:
                    if device.name in mine:
                        clashes[device.name] = [mine[device.name].path, device.path]
                    mine[device.name] = device
            for name, device in mine.items():
                scan.devices[name] = device
                if name in clashes:
                    scan.conflicts[name] = clashes[name]
                else:
                    scan.conflicts.pop(name, None)
        return scan

    def inject(self, spec: dict[str, Any], names: list[str]) -> None:
        """Apply the edits of the devices `names` to `spec`: all of them or none (FailedPrecondition)."""
        if not names:
            return
        scan = self._current()
        searched = ", ".join(str(d) for d in self.directories)
        devices = []
        for name in names:
            if name in scan.conflicts:
                raise FailedPrecondition(
                    f"CDI device {name!r} is defined twice, in {' and '.join(scan.conflicts[name])}"
                )
            if name not in scan.devices:
                raise FailedPrecondition(f"CDI device {name!r} is not defined in any spec file of {searched}")
            devices.append(scan.devices[name])
        edited = json.loads(json.dumps(spec))
        applied: set[str] = set()
        for device in devices:
            _apply(edited, device.edits, device.name)
            if device.path not in applied:
                applied.add(device.path)
                _apply(edited, device.spec_edits, device.name)
        spec.clear()
        spec.update(edited)


def _device_node(node: Mapping[str, Any], device: str) -> dict[str, Any]:
    """An OCI linux.devices entry for a CDI device node, its type and numbers taken from the host's node."""
    host = node.get("hostPath") or node["path"]
    kind, major, minor, mode = node.get("type", ""), node.get("major", 0), node.get("minor", 0), node.get("fileMode")
    if not (kind and (major or kind == "p")):
        try:
            info = os.stat(host)
        except OSError as exc:
            raise FailedPrecondition(f"CDI device {device!r}: device node {host}: {exc.strerror}") from None
        found = "c" if stat.S_ISCHR(info.st_mode) else "b" if stat.S_ISBLK(info.st_mode) else ""
        found = found or ("p" if stat.S_ISFIFO(info.st_mode) else "")
        if not found:
            raise FailedPrecondition(f"CDI device {device!r}: {host} is not a device node")
        if kind and kind != found and not (kind == "u" and found == "c"):
            raise FailedPrecondition(f"CDI device {device!r}: {host} is of type {found}, the spec says {kind}")
        kind, major, minor = kind or found, os.major(info.st_rdev), os.minor(info.st_rdev)
        mode = stat.S_IMODE(info.st_mode) if mode is None else mode
    entry: dict[str, Any] = {"path": node["path"], "type": kind, "major": major, "minor": minor}
    for key, value in (("fileMode", mode), ("uid", node.get("uid")), ("gid", node.get("gid"))):
        if value is not None:
            entry[key] = value
    return entry


def _apply(spec: dict[str, Any], edits: Mapping[str, Any], device: str) -> None:
    process, linux = spec.setdefault("process", {}), spec.setdefault("linux", {})
    if edits.get("env"):
        names = {variable.split("=", 1)[0] for variable in edits["env"]}
        kept = [v for v in process.get("env", []) if v.split("=", 1)[0] not in names]
        process["env"] = kept + list(edits["env"])
    for node in edits.get("deviceNodes", []):
        entry = _device_node(node, device)
        user = process.get("user", {})
        for key, own in (("uid", "uid"), ("gid", "gid")):
            if key not in entry and user.get(own, 0) > 0:
                entry[key] = user[own]
        linux["devices"] = [d for d in linux.get("devices", []) if d["path"] != entry["path"]] + [entry]
        access = node.get("permissions") or "rwm"
        if entry["type"] in ("b", "c") and access != NO_PERMISSIONS:  # "none": no rule, the default denies it
            rule = {"allow": True, "type": entry["type"], "major": entry["major"], "minor": entry["minor"]}
            linux.setdefault("resources", {}).setdefault("devices", []).append({**rule, "access": access})
    if edits.get("mounts"):
        destinations = {mount["containerPath"] for mount in edits["mounts"]}
        mounts = [m for m in spec.get("mounts", []) if m["destination"] not in destinations]
        for mount in edits["mounts"]:
            added = {"destination": mount["containerPath"], "source": mount["hostPath"]}
            added["type"] = mount.get("type") or "bind"
            added["options"] = list(mount.get("options") or ["rbind"])
            mounts.append(added)
        spec["mounts"] = sorted(mounts, key=lambda m: len(Path(m["destination"]).parts))  # parents first (stable)
    for hook in edits.get("hooks", []):
        entry = {key: hook[key] for key in ("path", "args", "env", "timeout") if key in hook}
        spec.setdefault("hooks", {}).setdefault(hook["hookName"], []).append(entry)
    gids = [gid for gid in edits.get("additionalGids", []) if isinstance(gid, int) and gid > 0]
    if gids:
        user = process.setdefault("user", {})
        user["additionalGids"] = list(dict.fromkeys([*user.get("additionalGids", []), *gids]))
    if edits.get("intelRdt"):
        rdt = {key: edits["intelRdt"][key] for key in ("closID", "l3CacheSchema", "memBwSchema", "schemata",
                                                         "enableMonitoring") if key in edits["intelRdt"]}  # fmt: skip
        if linux.get("intelRdt") not in (None, rdt):
            raise FailedPrecondition(f"CDI device {device!r}: its Intel RDT settings conflict with another device's")
        linux["intelRdt"] = rdt
    for net in edits.get("netDevices", []):
        linux.setdefault("netDevices", {})[net["hostInterfaceName"]] = {"name": net.get("name", "")}

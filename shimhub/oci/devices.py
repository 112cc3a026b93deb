"""Device nodes in a container's spec: those the CRI config names, a privileged container's host devices,
and who owns them, as the handler's device policy says (containerd's and CRI-O's settings)."""

from __future__ import annotations

import os
import stat
from typing import Any

from attrs import define

from shimhub.errors import InvalidArgument
from shimhub.users import User
from shimhub_proto.cri.v1 import api_pb2 as cri

#: Where a privileged container's host devices are found, and what under it is not a device of the host's.
HOST_DEVICES = "/dev"
SKIPPED = frozenset({"pts", "shm", "mqueue", "fd", ".lxc", ".lxd-mounts", ".udev", "console"})
#: Most host devices a privileged container gets (a node with more is unusual; the walk stays bounded).
MAX_HOST_DEVICES = 4096


@define(frozen=True)
class Policy:
    """A handler's device policy."""

    #: A privileged container gets every device node of the host (off for a VM or gVisor handler:
    #: privileged_without_host_devices).
    host_devices: bool = True
    #: Device nodes are owned by the container's user and group, not the host's owner
    #: (device_ownership_from_security_context).
    owned_by_user: bool = False


DEFAULT = Policy()


def _node(path: str, info: os.stat_result) -> dict[str, Any]:
    return {
        "path": path,
        "type": "c" if stat.S_ISCHR(info.st_mode) else "b",
        "major": os.major(info.st_rdev),
        "minor": os.minor(info.st_rdev),
        "fileMode": stat.S_IMODE(info.st_mode),
        "uid": info.st_uid,
        "gid": info.st_gid,
    }


def requested(config: cri.ContainerConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The device nodes of the config's `devices`, and the cgroup rules: all denied, then each allowed."""
    nodes, rules = [], [{"allow": False, "access": "rwm"}]
    for device in config.devices:
        try:
            info = os.stat(device.host_path)
        except OSError as exc:
            raise InvalidArgument(f"device {device.host_path}: {exc.strerror}") from None
        if not (stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode)):
            raise InvalidArgument(f"device {device.host_path} is not a character or block device")
        node = {**_node(device.container_path, info), "uid": 0, "gid": 0}
        nodes.append(node)
        rules.append(
            {
                "allow": True,
                "type": node["type"],
                "major": node["major"],
                "minor": node["minor"],
                "access": device.permissions or "rwm",
            }
        )
    return nodes, rules


def of_host(exclude: set[str]) -> list[dict[str, Any]]:
    """Every character and block device under /dev (links and the container's own kinds aside)."""
    found: list[dict[str, Any]] = []
    pending = [HOST_DEVICES]
    while pending and len(found) < MAX_HOST_DEVICES:
        directory = pending.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.name in SKIPPED or entry.path in exclude or entry.is_symlink():
                continue
            if entry.is_dir(follow_symlinks=False):
                pending.append(entry.path)
                continue
            info = entry.stat(follow_symlinks=False)
            if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode):
                found.append(_node(entry.path, info))
    return found[:MAX_HOST_DEVICES]


def for_container(
    config: cri.ContainerConfig, user: User, policy: Policy
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The container's device nodes and cgroup rules, as `policy` says."""
    nodes, rules = requested(config)
    if config.linux.security_context.privileged and policy.host_devices:
        nodes = of_host(exclude={node["path"] for node in nodes}) + nodes
    return (owned(nodes, user) if policy.owned_by_user else nodes), rules


def owned(nodes: list[dict[str, Any]], user: User) -> list[dict[str, Any]]:
    """`nodes` owned by the container's user and group."""
    return [{**node, "uid": user.uid, "gid": user.gid} for node in nodes]

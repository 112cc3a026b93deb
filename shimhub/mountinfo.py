"""The mount table of shimhub's mount namespace, from /proc/self/mountinfo (one parser for all)."""

from __future__ import annotations

import ctypes
import errno
import os
import re

from attrs import define

MOUNTINFO = "/proc/self/mountinfo"
_ESCAPE = re.compile(r"\\([0-7]{3})")
_libc = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD = -100
#: statx(2): the attribute saying the path is the root of a mount (Linux 5.8), and where the
#: attributes and the mask of those the filesystem reports sit in struct statx.
_STATX_ATTR_MOUNT_ROOT = 0x2000
_STATX_ATTRIBUTES, _STATX_ATTRIBUTES_MASK = 8, 56
_STATX_SIZE = 256


def _unescape(field: str) -> str:
    """The kernel writes space, tab, newline and backslash in paths as octal escapes."""
    return _ESCAPE.sub(lambda match: chr(int(match.group(1), 8)), field)


@define(frozen=True)
class Mount:
    """One line of mountinfo."""

    mount_point: str
    #: The optional fields: "shared:N", "master:N", "propagate_from:N", "unbindable".
    optional: tuple[str, ...]
    fs_type: str

    @property
    def shared(self) -> bool:
        return any(tag.startswith("shared:") for tag in self.optional)

    @property
    def slave(self) -> bool:
        return any(tag.startswith("master:") for tag in self.optional)


def mounts() -> list[Mount]:
    """Every mount, in the kernel's order (a later one over the same point hides an earlier one)."""
    found = []
    with open(MOUNTINFO) as table:
        for line in table:
            fields = line.split()
            separator = fields.index("-")
            found.append(Mount(_unescape(fields[4]), tuple(fields[6:separator]), fields[separator + 1]))
    return found


def _mount_root(path: str) -> bool | None:
    """statx's answer to whether `path` (symlinks followed) is a mount's root; None where it has none."""
    buffer = ctypes.create_string_buffer(_STATX_SIZE)
    if _libc.statx(_AT_FDCWD, os.fsencode(path), 0, 0, buffer) != 0:
        return False if ctypes.get_errno() == errno.ENOENT else None
    mask = int.from_bytes(buffer.raw[_STATX_ATTRIBUTES_MASK : _STATX_ATTRIBUTES_MASK + 8], "little")
    if not mask & _STATX_ATTR_MOUNT_ROOT:
        return None
    attributes = int.from_bytes(buffer.raw[_STATX_ATTRIBUTES : _STATX_ATTRIBUTES + 8], "little")
    return bool(attributes & _STATX_ATTR_MOUNT_ROOT)


def is_mount_point(path: str) -> bool:
    """Whether something is mounted exactly at `path` (symlinks resolved).

    One statx call where the kernel reports mount roots; else a walk of the table, whose
    cost grows with the node's mounts (a full node has a thousand)."""
    answer = _mount_root(path)
    if answer is not None:
        return answer
    real = os.path.realpath(path)
    return any(mount.mount_point == real for mount in mounts())


def under(directory: str) -> list[str]:
    """Mount points at or below `directory`."""
    prefix = directory.rstrip("/")
    return [m.mount_point for m in mounts() if m.mount_point == prefix or m.mount_point.startswith(prefix + "/")]


def containing(path: str) -> Mount:
    """The mount that holds `path` (symlinks resolved): the last mounted of the longest matching point."""
    real = os.path.realpath(path)
    best: Mount | None = None
    for mount in mounts():
        point = mount.mount_point
        if (real == point or real.startswith(point.rstrip("/") + "/")) and (
            best is None or len(point) >= len(best.mount_point)
        ):
            best = mount
    assert best is not None, "/ is always mounted"
    return best

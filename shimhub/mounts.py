"""Node helpers for mounts and commands: run a tool, test and undo mounts, measure a tree."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
import subprocess
from pathlib import Path

from shimhub import mountinfo
from shimhub.errors import FailedPrecondition, PluginFailed
from shimhub.hooktypes import FilesystemUsage

COMMAND_TIMEOUT = 120.0
MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
#: The new mount API's system calls (the same numbers on x86-64 and arm64).
_SYS_OPEN_TREE, _SYS_MOVE_MOUNT, _SYS_MOUNT_SETATTR = 428, 429, 442
_OPEN_TREE_CLONE = 1
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_AT_RECURSIVE = 0x8000
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MOUNT_ATTR_IDMAP = 0x00100000
_MS_BIND = 4096


class _MountAttr(ctypes.Structure):
    _fields_ = (
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    )


class IdmapUnsupported(FailedPrecondition):
    """The kernel or the filesystem cannot present a mount ID-mapped."""


def run(*argv: str, cwd: str | None = None) -> str:
    """Run a command; PluginFailed with its stderr when it fails."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=COMMAND_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PluginFailed(f"{argv[0]}: {exc}") from exc
    if done.returncode != 0:
        raise PluginFailed(f"{' '.join(argv[:3])} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def is_mounted(path: str) -> bool:
    """Whether something is mounted exactly at `path`."""
    return mountinfo.is_mount_point(path)


def unmount(path: str) -> None:
    """Unmount `path` if mounted (lazily if busy): the umount2 call, no umount(8) process."""
    if not (os.path.exists(path) and is_mounted(path)):
        return
    for flags in (0, MNT_DETACH):
        if _libc.umount2(os.fsencode(path), flags) == 0:
            return
        error = ctypes.get_errno()
        if error == errno.EINVAL:  # unmounted meanwhile
            return
        if error != errno.EBUSY:
            break
    raise PluginFailed(f"umount {path}: {os.strerror(error)}")


def bind(source: str, target: str) -> None:
    """Bind-mount `source` (one mount, not its submounts, or a namespace file to pin) onto the existing `target`."""
    if _libc.mount(os.fsencode(source), os.fsencode(target), None, _MS_BIND, None):
        error = ctypes.get_errno()
        raise PluginFailed(f"bind {source} on {target}: {os.strerror(error)}")


def idmapped_bind(source: str, target: str, user_namespace: str, *, recursive: bool = False) -> None:
    """Bind `source` (with its submounts if `recursive`) onto `target`, owners ID-mapped by `user_namespace`.

    A file owned by k on disk appears owned by the namespace's mapping of k; a file created
    through the mount by a process of the namespace is stored with the id it has inside.
    `user_namespace` is a pinned user namespace file. IdmapUnsupported when the kernel or
    the filesystem cannot (overlayfs itself cannot: its layers can, see the overlay driver).
    """
    deep = _AT_RECURSIVE if recursive else 0
    tree = _libc.syscall(_SYS_OPEN_TREE, _AT_FDCWD, os.fsencode(source), _OPEN_TREE_CLONE | os.O_CLOEXEC | deep)
    if tree < 0:
        error = ctypes.get_errno()
        raise PluginFailed(f"open_tree {source}: {os.strerror(error)}")
    try:
        namespace = os.open(user_namespace, os.O_RDONLY | os.O_CLOEXEC)
        try:
            attributes = _MountAttr(attr_set=_MOUNT_ATTR_IDMAP, userns_fd=namespace)
            size = ctypes.sizeof(attributes)
            if _libc.syscall(_SYS_MOUNT_SETATTR, tree, b"", _AT_EMPTY_PATH | deep, ctypes.byref(attributes), size):
                error = ctypes.get_errno()
                kind = filesystem_type(source)
                raise IdmapUnsupported(
                    f"cannot mount {source} ID-mapped: the kernel refuses it for its filesystem ({kind}): "
                    f"{os.strerror(error)}"
                )
        finally:
            os.close(namespace)
        if _libc.syscall(_SYS_MOVE_MOUNT, tree, b"", _AT_FDCWD, os.fsencode(target), _MOVE_MOUNT_F_EMPTY_PATH):
            error = ctypes.get_errno()
            raise PluginFailed(f"move_mount {source} to {target}: {os.strerror(error)}")
    finally:
        os.close(tree)


def kernel_has_filesystem(name: str) -> bool:
    """Whether the running kernel knows filesystem type `name`."""
    with open("/proc/filesystems") as filesystems:
        return any(line.split()[-1] == name for line in filesystems if line.strip())


def filesystem_type(path: str) -> str:
    """The type of the filesystem holding `path`, as `stat -f` names it."""
    return run("stat", "-f", "--format=%T", path).strip()


def tree_usage(path: str) -> FilesystemUsage:
    """Bytes and inodes under `path`, each hardlinked inode counted once."""
    seen: set[tuple[int, int]] = set()
    used = inodes = 0
    for directory, dirnames, filenames in os.walk(path):
        for name in [*dirnames, *filenames]:
            info = os.lstat(os.path.join(directory, name))
            key = (info.st_dev, info.st_ino)
            if key in seen:
                continue
            seen.add(key)
            inodes += 1
            if stat.S_ISREG(info.st_mode):
                used += info.st_blocks * 512
    return FilesystemUsage(used_bytes=used, inodes_used=inodes)


def remove_tree(path: Path) -> None:
    """Remove a directory tree that holds no mounts."""
    if path.exists():
        if is_mounted(str(path)):
            raise FailedPrecondition(f"{path} is still mounted")
        shutil.rmtree(path)

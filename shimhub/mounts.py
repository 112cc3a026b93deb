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

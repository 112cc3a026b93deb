"""Reading files that images and requests name, without ever leaving the directory they belong to.

A path from an image (its /etc/passwd) or a request (a seccomp profile) is
resolved by the kernel inside its root (openat2 with RESOLVE_IN_ROOT: an
absolute symlink starts at the root, ".." stops there), opened first as a mere
path so that a FIFO or a device is never opened for reading, checked to be a
regular file, and read up to a byte limit.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat

from shimhub.errors import InvalidArgument

_SYS_OPENAT2 = 437  # the same number on every architecture shimhub runs on
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10
_libc = ctypes.CDLL(None, use_errno=True)


class _OpenHow(ctypes.Structure):
    _fields_ = (("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64))


class TooLarge(InvalidArgument):
    """A file is larger than what its reader accepts."""


class NotRegular(InvalidArgument):
    """A path leads to something other than a regular file (a directory, a FIFO, a device, a socket)."""


def _open_path_in(root_fd: int, relative: str) -> int:
    how = _OpenHow(flags=os.O_PATH | os.O_CLOEXEC, mode=0, resolve=RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
    fd = _libc.syscall(_SYS_OPENAT2, root_fd, relative.encode(), ctypes.byref(how), ctypes.sizeof(how))
    if fd < 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error), relative)
    return fd


def read(root: str, path: str, limit: int) -> bytes:
    """The content of regular file `path` inside directory `root`, every symlink resolved inside `root`.

    OSError when it does not exist; NotRegular when it is not a regular file;
    TooLarge when it holds more than `limit` bytes.
    """
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        path_fd = _open_path_in(root_fd, path.lstrip("/") or ".")
    finally:
        os.close(root_fd)
    try:
        info = os.fstat(path_fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegular(f"{path} is not a regular file")
        if info.st_size > limit:
            raise TooLarge(f"{path} is {info.st_size} bytes; at most {limit} are read")
        fd = os.open(f"/proc/self/fd/{path_fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    finally:
        os.close(path_fd)
    try:
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 16, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise TooLarge(f"{path} has more than {limit} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_absolute(path: str, under: str, limit: int) -> bytes:
    """A regular file named by an absolute path that must lie in directory `under` (symlinks kept inside it)."""
    if not os.path.isabs(path) or "\0" in path:
        raise InvalidArgument(f"{path!r} must be an absolute path")
    if ".." in path.split("/"):
        raise InvalidArgument(f"{path!r} may not contain '..'")
    base = os.path.normpath(under)
    normal = os.path.normpath(path)
    if os.path.commonpath([base, normal]) != base or normal == base:
        raise InvalidArgument(f"{path!r} is not inside {base}")
    try:
        return read(base, os.path.relpath(normal, base), limit)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            raise InvalidArgument(f"{path}: no such file") from None
        raise InvalidArgument(f"{path}: {exc.strerror}") from None

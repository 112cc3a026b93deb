"""Where a container's CRI log goes, resolved inside the pod's log directory at every open.

The kubelet names a log file relative to the pod's `log_directory`; the pod's
author may own what is below it. The path is fixed at CreateContainer with the
directory's symlinks resolved, and every later open walks it one component at
a time without following a link, so a directory swapped for a symlink after
the check leads nowhere.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

from shimhub.errors import FailedPrecondition, InvalidArgument

#: Permissions of the log file and of the directories made for it.
FILE_MODE = 0o640
DIRECTORY_MODE = 0o755


def _printable(what: str, value: str) -> None:
    if not value.isprintable():
        raise InvalidArgument(f"{what} {value[:256]!r} holds a control character")


def check_directory(log_directory: str) -> None:
    """InvalidArgument unless `log_directory` is absolute, without ".." or a control character."""
    _printable("log_directory", log_directory)
    if not os.path.isabs(log_directory) or ".." in log_directory.split("/"):
        raise InvalidArgument(f"log_directory {log_directory[:256]!r} must be absolute, without '..'")


def resolve(log_directory: str, log_path: str) -> str:
    """The absolute log file for `log_path` under the pod's `log_directory` ("" when there is none).

    The directory must be absolute; neither may hold ".." or a control character. The directory's own
    symlinks are resolved now; below it, none is followed, now (a symlink leading out is refused) or
    at any later open.
    """
    if not log_path:
        return ""
    if not log_directory:
        raise InvalidArgument("log_path is set but the pod sandbox has no log_directory")
    check_directory(log_directory)
    _printable("log_path", log_path)
    if os.path.isabs(log_path) or ".." in log_path.split("/"):
        raise InvalidArgument(f"log_path {log_path[:256]!r} must be relative to the pod's log_directory, without '..'")
    base = os.path.realpath(log_directory)
    full = os.path.normpath(os.path.join(base, log_path))
    if full == base:
        raise InvalidArgument(f"log_path {log_path[:256]!r} names the log directory itself")
    try:
        check(full)
    except FailedPrecondition as exc:
        raise InvalidArgument(f"log_path {log_path[:256]!r}: {exc}") from None
    return full


def _walk(path: str, *, make: bool) -> int | None:
    """An O_PATH descriptor of `path`'s directory, reached without following a symlink; its missing
    directories made if `make`, else None when one is missing."""
    parts = [part for part in os.path.dirname(path).split("/") if part]
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts:
            if make:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, DIRECTORY_MODE, dir_fd=fd)
            try:
                step = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except FileNotFoundError:
                os.close(fd)
                return None
            except OSError as exc:
                linked = exc.errno in (errno.ELOOP, errno.ENOTDIR)
                raise FailedPrecondition(
                    f"the log path {path[:256]!r} leads through a symlink at {part[:64]!r}"
                    if linked
                    else f"the log path {path[:256]!r} cannot be reached at {part[:64]!r}: {exc.strerror}"
                ) from None
            os.close(fd)
            fd = step
    except BaseException:
        os.close(fd)
        raise
    return fd


def check(path: str) -> None:
    """FailedPrecondition unless `path` (a log file, which need not exist yet) is reached through no link."""
    directory = _walk(path, make=False)
    if directory is None:
        return  # made at the first open
    try:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISLNK(os.lstat(os.path.basename(path), dir_fd=directory).st_mode):
                raise FailedPrecondition(f"the log file {path[:256]!r} is a symlink")
    finally:
        os.close(directory)


def _made(path: str) -> int:
    directory = _walk(path, make=True)
    if directory is None:
        raise FailedPrecondition(f"the directory of the log file {path[:256]!r} went away while it was made")
    return directory


def make_directory(path: str) -> None:
    """Make the missing directories of the log file at `path`, following no link (for a runtime that
    opens the file itself)."""
    os.close(_made(path))


def open_for_append(path: str) -> int:
    """A descriptor appending to the log file at `path`, made with its directories if missing; no link is
    followed on the way (FailedPrecondition otherwise)."""
    directory = _made(path)
    try:
        return os.open(
            os.path.basename(path),
            os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
            FILE_MODE,
            dir_fd=directory,
        )
    except OSError as exc:
        raise FailedPrecondition(f"cannot open the log file {path[:256]!r}: {exc.strerror}") from None
    finally:
        os.close(directory)

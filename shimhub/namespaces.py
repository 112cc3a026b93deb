"""Linux namespaces made or entered on a thread of their own, and pinned to files.

A thread that unshares or joins a namespace takes it with it when it ends, so
the rest of the daemon never changes namespace.
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from shimhub.mounts import bind

CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000
FLAGS = {"uts": CLONE_NEWUTS, "ipc": CLONE_NEWIPC, "net": CLONE_NEWNET}
libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


def check(result: int, what: str) -> None:
    """Raise OSError with errno when a libc call returned non-zero."""
    if result != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"{what}: {os.strerror(error)}")


def on_own_thread(work: Callable[[], T], name: str) -> T:
    """Run `work` on a short-lived thread of its own; its result, or its exception re-raised here."""
    result: list[T] = []
    problem: list[Exception] = []

    def run() -> None:
        try:
            result.append(work())
        except Exception as exc:  # noqa: BLE001 - re-raised on the caller's thread
            problem.append(exc)

    thread = threading.Thread(target=run, name=name)
    thread.start()
    thread.join()
    if problem:
        raise problem[0]
    return result[0]


def pin_new(pins: dict[str, Path], hostname: str = "") -> None:
    """Create new namespaces of the kinds in `pins` ("ipc", "uts") and bind-mount each onto its file.

    The hostname is set in a new UTS namespace with the sethostname system call, so
    no text of a request ever reaches a command line.
    """

    def unshare_and_pin() -> None:
        check(libc.unshare(sum(FLAGS[kind] for kind in pins)), f"unshare {', '.join(pins)}")
        if "uts" in pins and hostname:
            socket.sethostname(hostname)
        own = f"/proc/self/task/{threading.get_native_id()}/ns"
        for kind, path in pins.items():
            path.touch()
            bind(f"{own}/{kind}", str(path))

    on_own_thread(unshare_and_pin, "pin-namespaces")


def is_pinned(path: str) -> bool:
    """Whether a namespace is pinned at `path` (an nsfs bind mount)."""
    try:
        return os.stat(path).st_dev == os.stat("/proc/self/ns/net").st_dev  # every namespace file is on nsfs
    except OSError:
        return False


def set_hostname(uts: str, hostname: str) -> None:
    """Set the hostname of the UTS namespace pinned at `uts` (from a thread that joins it and ends)."""

    def join_and_set() -> None:
        descriptor = os.open(uts, os.O_RDONLY | os.O_CLOEXEC)
        try:
            check(libc.setns(descriptor, CLONE_NEWUTS), f"setns {uts}")
        finally:
            os.close(descriptor)
        socket.sethostname(hostname)

    on_own_thread(join_and_set, "set-hostname")

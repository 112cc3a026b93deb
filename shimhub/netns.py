"""Named network namespaces pinned under /run/netns (the iproute2 convention)."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from attrs import define

from shimhub import namespaces
from shimhub.errors import PluginFailed, Unavailable

NETNS_DIR = Path("/run/netns")
TIMEOUT = 10.0
T = TypeVar("T")


def ip(*args: str) -> str:
    """Run iproute2's ip with `args`; its output, PluginFailed with ip's message on failure."""
    try:
        done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PluginFailed(f"ip {' '.join(args)}: {exc}") from exc
    if done.returncode != 0:
        raise PluginFailed(f"ip {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


#: Names of pod network namespaces start with this.
POD_PREFIX = "shimhub-"


def pod_name(sandbox_id: str) -> str:
    """The name a network backend gives pod `sandbox_id`'s namespace (so teardown finds it without a record)."""
    return f"{POD_PREFIX}{sandbox_id[:20]}"


def pod_path(sandbox_id: str) -> str:
    """Where pod `sandbox_id`'s namespace is pinned."""
    return str(NETNS_DIR / pod_name(sandbox_id))


def create(name: str) -> str:
    """Create network namespace `name` with its loopback up; return its path.

    A namespace already pinned there is adopted: shimhub makes the namespace of a pod in
    its own user namespace itself, so that the pod's user namespace owns it.
    """
    if not namespaces.is_pinned(str(NETNS_DIR / name)):
        ip("netns", "add", name)
    try:
        ip("-n", name, "link", "set", "lo", "up")
    except PluginFailed:
        delete(str(NETNS_DIR / name))
        raise
    return str(NETNS_DIR / name)


def delete(path: str) -> None:
    """Remove the namespace pinned at `path`; nothing to do if it is gone already."""
    pinned = Path(path)
    if pinned.parent != NETNS_DIR or not pinned.exists():
        return
    ip("netns", "delete", pinned.name)


@define(frozen=True)
class InterfaceCounters:
    """Traffic counters of one network interface."""

    name: str
    rx_bytes: int
    rx_errors: int
    tx_bytes: int
    tx_errors: int
    rx_packets: int = 0
    rx_dropped: int = 0
    tx_packets: int = 0
    tx_dropped: int = 0


def _parse_net_dev(text: str) -> list[InterfaceCounters]:
    counters = []
    for line in text.splitlines()[2:]:
        name, _, numbers = line.partition(":")
        fields = [int(value) for value in numbers.split()]
        counters.append(
            InterfaceCounters(
                name.strip(),
                rx_bytes=fields[0],
                rx_errors=fields[2],
                tx_bytes=fields[8],
                tx_errors=fields[10],
                rx_packets=fields[1],
                rx_dropped=fields[3],
                tx_packets=fields[9],
                tx_dropped=fields[11],
            )
        )
    return counters


def _run_inside(path: str, work: Callable[[], T], name: str) -> T:
    """Run `work` on a short-lived thread that has joined the network namespace at `path`.

    A namespace pinned to a file may have no process to enter through
    /proc/<pid>/ns/net; a thread's own namespace is left with the thread.
    Sockets created there stay in that namespace afterwards.
    """

    def inside() -> T:
        with open(path) as namespace:
            namespaces.check(namespaces.libc.setns(namespace.fileno(), namespaces.CLONE_NEWNET), f"setns {path}")
        return work()

    return namespaces.on_own_thread(inside, name)


def _same_namespace(pid: int, identity: tuple[int, int]) -> bool:
    try:
        info = os.stat(f"/proc/{pid}/ns/net")
    except OSError:
        return False
    return (info.st_dev, info.st_ino) == identity


def _through_process(path: str, pids: Iterable[int]) -> list[InterfaceCounters] | None:
    """The counters read through /proc/<pid>/net/dev of a process in the namespace at `path` (no thread to
    start, no setns); None when none of `pids` is in it. The namespace is checked before and after the read."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    identity = (info.st_dev, info.st_ino)
    for pid in pids:
        if pid > 0 and _same_namespace(pid, identity):
            try:
                with open(f"/proc/{pid}/net/dev") as dev:
                    text = dev.read()
            except OSError:
                continue
            if _same_namespace(pid, identity):
                return _parse_net_dev(text)
    return None


def interface_counters(path: str, pids: Iterable[int] = ()) -> list[InterfaceCounters]:
    """The counters of every interface in the namespace at `path` ([] when it is gone).

    `pids` are processes that may be in it (the pod's containers): read through one of them
    when it is; else a thread joins the namespace to read them."""

    def read() -> list[InterfaceCounters]:
        with open("/proc/thread-self/net/dev") as dev:
            return _parse_net_dev(dev.read())

    if not path or not os.path.exists(path):
        return []
    found = _through_process(path, pids)
    if found is not None:
        return found
    try:
        return _run_inside(path, read, "netns-counters")
    except OSError as exc:
        if not os.path.exists(path):
            return []
        raise PluginFailed(f"reading interface counters in {path}: {exc}") from None


def connect(path: str, port: int, timeout: float = TIMEOUT) -> socket.socket:
    """A TCP connection to `port` on the loopback of the namespace at `path` ("" = the host's).

    Tries 127.0.0.1, then ::1. Unavailable when nothing listens on either.
    """

    def dial() -> socket.socket:
        failures = []
        for host in ("127.0.0.1", "::1"):
            try:
                return socket.create_connection((host, port), timeout=timeout)
            except OSError as exc:
                failures.append(f"{host}: {exc.strerror or exc}")
        raise Unavailable(f"cannot connect to port {port} in the pod ({'; '.join(failures)})")

    try:
        connection = _run_inside(path, dial, "netns-connect") if path else dial()
    except OSError as exc:
        raise Unavailable(f"cannot enter the pod's network namespace: {exc}") from None
    connection.settimeout(None)
    return connection

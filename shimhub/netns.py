"""Named network namespaces pinned under /run/netns (the iproute2 convention)."""

from __future__ import annotations

import ctypes
import os
import subprocess
import threading
from pathlib import Path

from attrs import define

from shimhub.errors import PluginFailed

NETNS_DIR = Path("/run/netns")
TIMEOUT = 10.0
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _ip(*args: str) -> None:
    try:
        done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PluginFailed(f"ip {' '.join(args)}: {exc}") from exc
    if done.returncode != 0:
        raise PluginFailed(f"ip {' '.join(args)} failed: {done.stderr.strip()}")


def create(name: str) -> str:
    """Create network namespace `name` with its loopback up; return its path."""
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "set", "lo", "up")
    except PluginFailed:
        delete(str(NETNS_DIR / name))
        raise
    return str(NETNS_DIR / name)


def delete(path: str) -> None:
    """Remove the namespace pinned at `path`; nothing to do if it is gone already."""
    pinned = Path(path)
    if pinned.parent != NETNS_DIR or not pinned.exists():
        return
    _ip("netns", "delete", pinned.name)


@define(frozen=True)
class InterfaceCounters:
    """Traffic counters of one network interface."""

    name: str
    rx_bytes: int
    rx_errors: int
    tx_bytes: int
    tx_errors: int


def _parse_net_dev(text: str) -> list[InterfaceCounters]:
    counters = []
    for line in text.splitlines()[2:]:
        name, _, numbers = line.partition(":")
        fields = [int(value) for value in numbers.split()]
        counters.append(InterfaceCounters(name.strip(), fields[0], fields[2], fields[8], fields[10]))
    return counters


def interface_counters(path: str) -> list[InterfaceCounters]:
    """The counters of every interface in the namespace at `path` ([] when it is gone).

    Read on a short-lived thread that joins the namespace, because a namespace
    pinned to a file may have no process whose /proc/<pid>/net/dev shows it.
    """
    found: list[InterfaceCounters] = []
    problem: list[OSError] = []

    def read() -> None:
        try:
            with open(path) as namespace:
                if _libc.setns(namespace.fileno(), CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {path}: {os.strerror(ctypes.get_errno())}")
            with open("/proc/thread-self/net/dev") as dev:
                found.extend(_parse_net_dev(dev.read()))
        except OSError as exc:
            problem.append(exc)

    if not path or not os.path.exists(path):
        return []
    reader = threading.Thread(target=read, name="netns-counters")
    reader.start()
    reader.join()
    if problem and os.path.exists(path):
        raise PluginFailed(f"reading interface counters in {path}: {problem[0]}")
    return found

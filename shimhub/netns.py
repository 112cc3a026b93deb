"""Named network namespaces pinned under /run/netns (the iproute2 convention)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from shimhub.errors import PluginFailed

NETNS_DIR = Path("/run/netns")
TIMEOUT = 10.0


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

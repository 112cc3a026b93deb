"""The node's cgroup layout: which hierarchy is mounted where, and what it offers."""

from __future__ import annotations

from pathlib import Path

ROOT = Path("/sys/fs/cgroup")


def mode(root: Path = ROOT) -> str:
    """ "unified" (cgroup v2 only), "hybrid" (v1 controllers plus a v2 tree) or "legacy" (v1 only)."""
    if (root / "cgroup.controllers").exists():
        return "unified"
    if (root / "unified" / "cgroup.controllers").exists():
        return "hybrid"
    return "legacy"


def v2_controllers(root: Path = ROOT) -> list[str]:
    """The controllers enabled in the node's cgroup v2 tree (wherever it is mounted)."""
    for tree in (root, root / "unified"):
        listing = tree / "cgroup.controllers"
        if listing.exists():
            return listing.read_text().split()
    return []

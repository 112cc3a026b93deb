"""What a test may leave behind: nothing. Checks for mounts, namespaces, cgroups, processes and records."""

from __future__ import annotations

import os
from pathlib import Path


def _mounts_under(root: Path) -> list[str]:
    with open("/proc/self/mountinfo") as mountinfo:
        return [line.split()[4] for line in mountinfo if line.split()[4].startswith(str(root))]


def _processes_mentioning(root: Path) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(root) in cmdline and "shimhub serve" not in cmdline:
            found.append(f"{pid}: {cmdline[:120]}")
    return found


def _cgroups(ids: set[str]) -> list[str]:
    found = []
    for controller in Path("/sys/fs/cgroup").glob("*/shimhub"):
        found += [str(p) for p in controller.iterdir() if p.is_dir() and p.name.removeprefix("shimhub-") in ids]
    return found


def leftovers(root: Path, sandbox_ids: set[str], container_ids: set[str]) -> dict[str, list[str]]:
    """Everything still on the node from a daemon rooted at `root` whose objects had these ids."""
    found = {
        "mounts": _mounts_under(root),
        "processes": _processes_mentioning(root),
        "cgroups": _cgroups(container_ids),
        "netns": [
            n
            for n in (os.listdir("/run/netns") if os.path.isdir("/run/netns") else [])
            if any(n == f"shimhub-{i[:20]}" for i in sandbox_ids)
        ],
        "records": [str(p) for p in (root / "state").glob("*/*.json") if p.parent.name in ("sandboxes", "containers")],
    }
    return {kind: items for kind, items in found.items() if items}

"""What a test may leave behind: nothing.

`leftovers` looks for what a daemon rooted at a directory left on the node: mounts
under the root, processes naming it, cgroups and network namespaces of its pods,
records, and temporary files (half-written records, half-downloaded blobs,
half-unpacked layers). Given a `NodeSnapshot` taken before the test, it also
finds network namespaces created since for the daemon's pods and processes started
since that run in a network or PID namespace made since, are no descendants of the
test run and belong to the daemon (their cgroup or command line names one of its
pods or containers): container processes that lost their parent. Only what the
daemon under test made counts, so the checks hold on a node where other pods and
other shimhub daemons run.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable
from pathlib import Path

import psutil
from attrs import define, field

from shimhub import mountinfo, netns


def _netns_names() -> set[str]:
    return set(os.listdir(netns.NETNS_DIR)) if netns.NETNS_DIR.is_dir() else set()


def _namespace(pid: int, kind: str) -> int | None:
    """The inode of process `pid`'s namespace of `kind` (net, pid), None if it is gone."""
    try:
        return os.stat(f"/proc/{pid}/ns/{kind}").st_ino
    except OSError:
        return None


def _namespaces_of(pid: int) -> set[int]:
    """The inodes of process `pid`'s network and PID namespaces (empty if it is gone)."""
    return {ns for kind in ("net", "pid") if (ns := _namespace(pid, kind)) is not None}


def _namespaces_in_use() -> set[int]:
    """Network and PID namespaces that some process is in."""
    return {ns for pid in psutil.pids() for ns in _namespaces_of(pid)}


@define
class NodeSnapshot:
    """What was on the node before a test: named network namespaces, the namespaces processes were in, the time."""

    netns: set[str] = field(factory=_netns_names)
    namespaces: set[int] = field(factory=_namespaces_in_use)
    taken_at: float = field(factory=time.time)


def _mounts_under(root: Path) -> list[str]:
    return mountinfo.under(str(root))


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


def _names_one_of(pid: int, ids: set[str]) -> bool:
    """Whether process `pid`'s cgroup or command line names one of these pod or container ids (or prefixes)."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text() + Path(f"/proc/{pid}/cmdline").read_bytes().decode(
            errors="replace"
        )
    except OSError:
        return False
    return any(i in text for i in ids)


def _names_a_pod_of(netns_name: str, ids: set[str]) -> bool:
    """Whether a network namespace's name (see `netns.pod_name`) is that of one of these pods."""
    if not netns_name.startswith(netns.POD_PREFIX):
        return False
    part = netns_name.removeprefix(netns.POD_PREFIX)
    return any(i.startswith(part) or part.startswith(i) for i in ids)


#: A pod's or container's id, or the prefix of one that logs and names use.
_ID = re.compile(r"[0-9a-f]{12,64}")


def _stray_processes(before: NodeSnapshot, ids: set[str]) -> list[str]:
    """Live processes started since `before`, not under this test run, in a network or PID namespace made since,
    that belong to one of these pods or containers."""
    ours = {os.getpid(), *(p.pid for p in psutil.Process().children(recursive=True))}
    found = []
    for process in psutil.process_iter(["pid", "create_time", "status", "cmdline"]):
        info = process.info
        if info["pid"] in ours or info["create_time"] < before.taken_at or info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if _namespaces_of(info["pid"]) <= before.namespaces or not _names_one_of(info["pid"], ids):
            continue
        found.append(f"{info['pid']}: {' '.join(info['cmdline'] or [])[:120]}")
    return found


def exited(process: psutil.Process) -> bool:
    """Whether `process` has exited (a zombie has: only its parent has yet to collect it)."""
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _cgroups(ids: set[str]) -> list[str]:
    """Cgroups of these containers anywhere in the node's trees (v1 or v2, cgroupfs or systemd scopes)."""
    names = {f"shimhub-{i}{suffix}" for i in ids for suffix in ("", ".scope")} | {
        f"shimhub-conmon-{i}.scope" for i in ids
    }
    found = []
    for directory, subdirectories, _files in os.walk("/sys/fs/cgroup"):
        found += [os.path.join(directory, name) for name in subdirectories if name in names]
    return sorted(found)


def _temporary_files(root: Path) -> list[str]:
    """Half-written records (*.tmp), half-downloaded blobs (ingest/) and half-unpacked layers (<driver>/tmp/)."""
    state, storage = root / "state", root / "storage"
    found = [*state.rglob("*.tmp"), *state.glob("**/ingest/*"), *storage.glob("*/tmp/*")]
    return sorted(str(path) for path in found)


def _ids_under(root: Path) -> set[str]:
    """Ids of the pods and containers whose records, directories or layers are still under `root`."""
    places = ("state/sandboxes/*", "state/containers/*", "run/pods/*", "storage/*/containers/*")
    names = {path.name.split(".")[0] for place in places for path in root.glob(place)}
    return {name for name in names if _ID.fullmatch(name)}


def ids_in(text: str) -> set[str]:
    """The pod and container ids (or their 12-character prefixes) a daemon's log names."""
    return set(_ID.findall(text))


def leftovers(
    root: Path,
    sandbox_ids: set[str],
    container_ids: set[str],
    before: NodeSnapshot | None = None,
    logged_ids: Iterable[str] = (),
) -> dict[str, list[str]]:
    """Everything still on the node from a daemon rooted at `root` whose objects had these ids (and the ids its
    log names, for objects it made and forgot)."""
    names = _netns_names()
    found = {
        "mounts": _mounts_under(root),
        "processes": _processes_mentioning(root),
        "cgroups": _cgroups(container_ids),
        "netns": sorted(names & {netns.pod_name(i) for i in sandbox_ids}),
        "records": [str(p) for p in (root / "state").glob("*/*.json") if p.parent.name in ("sandboxes", "containers")],
        "temporary files": _temporary_files(root),
    }
    if before is not None:
        ids = sandbox_ids | container_ids | set(logged_ids) | _ids_under(root)
        made = {name for name in names - before.netns if _names_a_pod_of(name, ids)}
        found["netns"] = sorted(set(found["netns"]) | made)
        found["stray processes"] = _stray_processes(before, ids)
    return {kind: items for kind, items in found.items() if items}

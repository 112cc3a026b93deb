"""Fitting CRI resource limits to what the node's cgroups can enforce.

The kubelet sends limits for every resource it knows (hugepage limits of 0
for each page size, swap equal to memory, ...), whether or not the node has
the controller that enforces them where the OCI runtime puts containers. As
containerd does, limits the node cannot enforce are left out, and each kind
of drop is logged once at warning level, with its reason.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from attrs import define

from shimhub import cgroups
from shimhub_proto.cri.v1 import api_pb2 as cri

log = logging.getLogger(__name__)

HUGEPAGES = Path("/sys/kernel/mm/hugepages")
PROC_CGROUPS = Path("/proc/cgroups")
_UNITS = {"KB": 1, "MB": 1 << 10, "GB": 1 << 20, "TB": 1 << 30}


@define(frozen=True)
class NodeCgroups:
    """What the node offers to containers: cgroup mode, usable controllers, swap accounting, page sizes."""

    mode: str
    controllers: frozenset[str]
    swap: bool
    page_sizes_kb: frozenset[int]

    @classmethod
    def probe(cls, root: Path = cgroups.ROOT) -> NodeCgroups:
        mode = cgroups.mode(root)
        if mode == "unified":
            controllers = frozenset(cgroups.v2_controllers(root))
            swap = any(root.glob("*/memory.swap.max"))
        else:  # the v1 hierarchies are where runtimes put containers; a controller only in v2 is out of reach
            controllers = frozenset(_v1_controllers())
            swap = (root / "memory" / "memory.memsw.limit_in_bytes").exists()
        sizes = frozenset(
            int(entry.name.removeprefix("hugepages-").removesuffix("kB"))
            for entry in (HUGEPAGES.iterdir() if HUGEPAGES.is_dir() else [])
            if entry.name.startswith("hugepages-")
        )
        return cls(mode=mode, controllers=controllers, swap=swap, page_sizes_kb=sizes)


def _v1_controllers() -> list[str]:
    """Controllers mounted in a cgroup v1 hierarchy (hierarchy 0 in /proc/cgroups: v2 only, or none)."""
    found = []
    for line in PROC_CGROUPS.read_text().splitlines():
        if line.startswith("#"):
            continue
        name, hierarchy, _count, enabled = line.split()[:4]
        if hierarchy != "0" and enabled == "1":
            found.append(name)
    return found


def page_size_kb(page_size: str) -> int | None:
    """A CRI hugepage size ("2MB", "1GB") in kB; None when it is not one."""
    number, unit = page_size[:-2], page_size[-2:].upper()
    if not number.isdigit() or unit not in _UNITS:
        return None
    return int(number) * _UNITS[unit]


_logged: set[str] = set()
_logged_guard = threading.Lock()


def _once(message: str) -> None:
    with _logged_guard:
        if message in _logged:
            return
        _logged.add(message)
    log.warning("%s", message)


_node: NodeCgroups | None = None


def probed() -> NodeCgroups:
    """This node's cgroups, probed once."""
    global _node
    if _node is None:
        _node = NodeCgroups.probe()
    return _node


def fit(resources: cri.LinuxContainerResources, node: NodeCgroups | None = None) -> list[str]:
    """Clear, in place, the limits `node` cannot enforce; return what was dropped and why."""
    node = node or probed()
    dropped: list[str] = []

    def drop(fields: tuple[str, ...], why: str) -> None:
        present = [name for name in fields if _set(resources, name)]
        for name in present:
            resources.ClearField(name)
        if present:
            dropped.append(f"{', '.join(present)}: {why}")

    if "cpu" not in node.controllers:
        drop(("cpu_shares", "cpu_quota", "cpu_period"), "the node has no usable cpu controller")
    if "cpuset" not in node.controllers:
        drop(("cpuset_cpus", "cpuset_mems"), "the node has no usable cpuset controller")
    if "memory" not in node.controllers:
        drop(("memory_limit_in_bytes", "memory_swap_limit_in_bytes"), "the node has no usable memory controller")
    elif not node.swap:
        drop(("memory_swap_limit_in_bytes",), "the node has no swap accounting")
    if node.mode != "unified":
        drop(("unified",), f"unified (cgroup v2) settings need a cgroup v2 node; this one is {node.mode}")
    if resources.hugepage_limits:
        if "hugetlb" not in node.controllers:
            where = "only in the cgroup v2 tree of this hybrid node" if node.mode == "hybrid" else "absent"
            drop(("hugepage_limits",), f"the hugetlb controller is {where}")
        else:
            kept = [h for h in resources.hugepage_limits if page_size_kb(h.page_size) in node.page_sizes_kb]
            gone = sorted({h.page_size for h in resources.hugepage_limits} - {h.page_size for h in kept})
            if gone:
                del resources.hugepage_limits[:]
                resources.hugepage_limits.extend(kept)
                dropped.append(f"hugepage_limits for {', '.join(gone)}: the node has no such page size")
    for reason in dropped:
        _once(f"resource limits left out, as the node cannot enforce them: {reason}")
    return dropped


def fitted(limits: cri.LinuxContainerResources) -> cri.LinuxContainerResources:
    """A copy of `limits` with what this node cannot enforce left out (see `fit`)."""
    enforced = cri.LinuxContainerResources()
    enforced.CopyFrom(limits)
    fit(enforced)
    return enforced


def _set(resources: cri.LinuxContainerResources, name: str) -> bool:
    """Whether a scalar, repeated or map field holds something (proto3 scalars have no presence)."""
    value = getattr(resources, name)
    return bool(len(value)) if hasattr(value, "__len__") and not isinstance(value, str) else bool(value)

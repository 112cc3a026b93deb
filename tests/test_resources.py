"""Which CRI resource limits reach the runtime, on nodes of each cgroup layout (no root needed)."""

from __future__ import annotations

import pytest

from shimhub.resources import NodeCgroups, fit, page_size_kb
from shimhub_proto.cri.v1 import api_pb2 as cri

pytestmark = pytest.mark.unit


def kubelet_burstable() -> cri.LinuxContainerResources:
    """What a kubelet sends for a Burstable container (plus a unified setting, as a pod may ask)."""
    return cri.LinuxContainerResources(
        cpu_period=100000,
        cpu_quota=25000,
        cpu_shares=102,
        memory_limit_in_bytes=64 << 20,
        memory_swap_limit_in_bytes=64 << 20,
        oom_score_adj=999,
        hugepage_limits=[cri.HugepageLimit(page_size="2MB"), cri.HugepageLimit(page_size="1GB")],
        unified={"memory.high": "50000000"},
    )


HYBRID = NodeCgroups(
    mode="hybrid",
    controllers=frozenset({"cpu", "cpuacct", "cpuset", "memory", "pids", "blkio", "devices"}),
    swap=True,
    page_sizes_kb=frozenset({2048, 1048576}),
)


def test_a_hybrid_node_without_hugetlb_in_v1_gets_everything_else() -> None:
    resources = kubelet_burstable()
    dropped = fit(resources, HYBRID)
    assert not resources.hugepage_limits and not resources.unified
    assert (resources.cpu_quota, resources.cpu_shares, resources.memory_limit_in_bytes) == (25000, 102, 64 << 20)
    assert resources.memory_swap_limit_in_bytes == 64 << 20 and resources.oom_score_adj == 999
    assert dropped == [
        "unified: unified (cgroup v2) settings need a cgroup v2 node; this one is hybrid",
        "hugepage_limits: the hugetlb controller is only in the cgroup v2 tree of this hybrid node",
    ]


def test_a_v2_node_keeps_unified_and_the_page_sizes_it_has() -> None:
    node = NodeCgroups(
        mode="unified",
        controllers=frozenset({"cpu", "cpuset", "memory", "pids", "io", "hugetlb"}),
        swap=False,
        page_sizes_kb=frozenset({2048}),
    )
    resources = kubelet_burstable()
    dropped = fit(resources, node)
    assert [h.page_size for h in resources.hugepage_limits] == ["2MB"]
    assert dict(resources.unified) == {"memory.high": "50000000"}
    assert resources.memory_swap_limit_in_bytes == 0 and resources.memory_limit_in_bytes == 64 << 20
    assert dropped == [
        "memory_swap_limit_in_bytes: the node has no swap accounting",
        "hugepage_limits for 1GB: the node has no such page size",
    ]


def test_page_sizes_as_the_kubelet_writes_them() -> None:
    assert [page_size_kb(size) for size in ("2MB", "1GB", "64KB", "2mb", "huge", "MB")] == [
        2048,
        1048576,
        64,
        2048,
        None,
        None,
    ]

"""On a cgroup v2 node (run inside the node `python3 -m tests.booted_node` boots): resources, stats, OOM, crun."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

import pytest

from shimhub import cgroups
from shimhub.testing import RuntimeConformance
from shimhub.testing.daemon import Pod, wait_for
from shimhub_proto.cri.v1 import api_pb2 as cri
from tests.test_runc import runc_config

NODE_MARKS = [
    pytest.mark.node,
    # inside the booted node (SHIMHUB_NODE=1) they run whatever the node is, so a wrong node fails them
    pytest.mark.skipif(
        cgroups.mode() != "unified" and not os.environ.get("SHIMHUB_NODE"),
        reason="needs a cgroup v2 (unified) node: python3 -m tests.booted_node runs them in one",
    ),
]
pytestmark = NODE_MARKS
MIB = 1024 * 1024
HANDLERS = ["runc", "crun"]


@pytest.fixture
def node(daemon_factory, shimhub_registry):
    daemon = daemon_factory(runc_config(shimhub_registry)).start()
    daemon.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image="test/busybox:1")))
    return daemon


def cgroup_of(pod: Pod, container_id: str) -> Path:
    """The container's cgroup directory on the node, from what its own process sees."""
    answer = pod.rt.ExecSync(cri.ExecSyncRequest(container_id=container_id, cmd=["cat", "/proc/self/cgroup"]))
    (line,) = answer.stdout.decode().splitlines()
    return Path("/sys/fs/cgroup") / line.split("::", 1)[1].lstrip("/")


def _weight(shares: int) -> int:
    """cpu.weight for CPU shares, as the OCI runtimes convert them."""
    return 1 + ((shares - 2) * 9999) // 262142


@pytest.mark.parametrize("handler", HANDLERS)
def test_resources_land_in_the_v2_files_and_update(node, tmp_path: Path, handler: str) -> None:
    pod = Pod(node, tmp_path, handler=handler)
    resources = cri.LinuxContainerResources(
        cpu_shares=512,
        cpu_quota=50000,
        cpu_period=100000,
        memory_limit_in_bytes=64 * MIB,
        hugepage_limits=[cri.HugepageLimit(page_size="2MB", limit=0)],  # as the kubelet always sends
        unified={"memory.high": str(48 * MIB)},
    )
    container = pod.run("app", ["sleep", "300"], linux=cri.LinuxContainerConfig(resources=resources))
    group = cgroup_of(pod, container)
    assert (group / "cpu.weight").read_text().strip() == str(_weight(512))
    assert (group / "cpu.max").read_text().split() == ["50000", "100000"]
    assert int((group / "memory.max").read_text()) == 64 * MIB
    assert int((group / "memory.high").read_text()) == 48 * MIB
    if "hugetlb" in cgroups.v2_controllers():
        assert (group / "hugetlb.2MB.max").read_text().strip() == "0"
    update = cri.LinuxContainerResources(cpu_quota=20000, cpu_period=100000, memory_limit_in_bytes=96 * MIB)
    pod.rt.UpdateContainerResources(cri.UpdateContainerResourcesRequest(container_id=container, linux=update))
    assert int((group / "memory.max").read_text()) == 96 * MIB
    assert (group / "cpu.max").read_text().split() == ["20000", "100000"]


@pytest.mark.parametrize("handler", HANDLERS)
def test_stats_from_v2_and_an_oom_kill(node, tmp_path: Path, handler: str) -> None:
    pod = Pod(node, tmp_path, handler=handler)
    busy = pod.run("busy", ["sh", "-c", "while :; do :; done"])

    def cpu_used() -> cri.ContainerStats | None:
        stats = pod.rt.ContainerStats(cri.ContainerStatsRequest(container_id=busy)).stats
        return stats if stats.cpu.usage_core_nano_seconds.value else None

    first = wait_for(cpu_used)
    assert first.memory.working_set_bytes.value > 0
    assert first.cpu.HasField("psi") and first.memory.HasField("psi") and first.io.HasField("psi")
    assert first.cpu.psi.Some.Avg10 >= 0 and first.memory.psi.HasField("Full")
    later = wait_for(
        lambda: (
            (s := cpu_used()) and s.cpu.usage_core_nano_seconds.value > first.cpu.usage_core_nano_seconds.value and s
        )
    )
    assert later.cpu.timestamp > first.cpu.timestamp
    limits = cri.LinuxContainerConfig(resources=cri.LinuxContainerResources(memory_limit_in_bytes=32 * MIB))
    hog = pod.run("hog", ["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"], linux=limits)  # a 64 MiB buffer
    final = pod.wait_exit(hog, 60)
    assert (final.exit_code, final.reason) == (137, "OOMKilled")


class TestCrunOnNode(RuntimeConformance):
    plugin = "runc"
    options: ClassVar[dict[str, Any]] = {"binary": "crun"}

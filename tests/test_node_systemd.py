"""The systemd cgroup driver on a node whose init is systemd (inside the node tests.booted_node boots)."""

from __future__ import annotations

import secrets
import subprocess
from pathlib import Path

import grpc
import pytest

from shimhub.testing import RuntimeConformance
from shimhub.testing.daemon import Pod, wait_for
from shimhub_proto.cri.v1 import api_pb2 as cri
from tests.test_node_cgroup2 import MIB, NODE_MARKS, cgroup_of
from tests.test_runc import runc_config

pytestmark = [
    *NODE_MARKS,
    pytest.mark.skipif(not Path("/run/systemd/system").is_dir(), reason="systemd is not init here"),
]


@pytest.fixture
def node(daemon_factory, shimhub_registry):
    daemon = daemon_factory('cgroup_driver = "systemd"\n' + runc_config(shimhub_registry)).start()
    daemon.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image="test/busybox:1")))
    return daemon


def _unit_state(unit: str) -> str:
    argv = ["systemctl", "show", "-p", "ActiveState", "--value", unit]
    return subprocess.run(argv, capture_output=True, text=True, check=False).stdout.strip()


@pytest.mark.parametrize("handler", ["runc", "crun"])
def test_containers_run_in_scopes_under_the_kubelets_slice(node, tmp_path: Path, handler: str) -> None:
    config = node.runtime.RuntimeConfig(cri.RuntimeConfigRequest())
    assert config.linux.cgroup_driver == cri.SYSTEMD
    slice_name = f"kubepods-burstable-pod{secrets.token_hex(4)}.slice"
    pod = Pod(
        node,
        tmp_path,
        handler=handler,
        linux=cri.LinuxPodSandboxConfig(
            cgroup_parent=slice_name,
            security_context=cri.LinuxSandboxSecurityContext(namespace_options=cri.NamespaceOption(pid=cri.CONTAINER)),
        ),
    )
    resources = cri.LinuxContainerResources(memory_limit_in_bytes=64 * MIB, cpu_quota=50000, cpu_period=100000)
    container = pod.run("app", ["sleep", "300"], linux=cri.LinuxContainerConfig(resources=resources))
    group = cgroup_of(pod, container)  # where the process and its limits are
    # crun runs the process, with its limits, in a leaf of the scope systemd delegated to it
    scope = group.parent if handler == "crun" and group.name == "container" else group
    assert scope.parts[-4:] == (
        "kubepods.slice",
        "kubepods-burstable.slice",
        slice_name,
        f"shimhub-{container}.scope",
    ), group
    assert _unit_state(scope.name) == "active"
    assert int((group / "memory.max").read_text()) == 64 * MIB
    assert (group / "cpu.max").read_text().split() == ["50000", "100000"]
    update = cri.LinuxContainerResources(memory_limit_in_bytes=96 * MIB)
    pod.rt.UpdateContainerResources(cri.UpdateContainerResourcesRequest(container_id=container, linux=update))
    assert int((group / "memory.max").read_text()) == 96 * MIB
    stats = pod.rt.ContainerStats(cri.ContainerStatsRequest(container_id=container)).stats
    assert stats.memory.working_set_bytes.value > 0
    assert 0 < stats.memory.available_bytes.value < 96 * MIB, "the limit, wherever the runtime put it"
    pod.rt.StopContainer(cri.StopContainerRequest(container_id=container, timeout=0))
    pod.rt.RemoveContainer(cri.RemoveContainerRequest(container_id=container))
    wait_for(lambda: _unit_state(scope.name) in ("inactive", ""))
    assert not scope.exists()


def test_conmon_in_a_scope_of_its_own_in_the_pods_slice(daemon_factory, shimhub_registry, tmp_path: Path) -> None:
    tables = '[runtimes.runc.options]\nconmon_cgroup = "pod"\n'
    daemon = daemon_factory('cgroup_driver = "systemd"\n' + runc_config(shimhub_registry, tables)).start()
    daemon.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image="test/busybox:1")))
    slice_name = f"kubepods-besteffort-pod{secrets.token_hex(4)}.slice"
    pod = Pod(daemon, tmp_path, linux=cri.LinuxPodSandboxConfig(cgroup_parent=slice_name))
    container = pod.run("app", ["sleep", "300"])
    unit = f"shimhub-conmon-{container}.scope"
    found = subprocess.run(["pgrep", "-f", f"conmon .*--cid {container}"], capture_output=True, text=True, check=False)
    (pid,) = found.stdout.split()
    assert Path(f"/proc/{pid}/cgroup").read_text().strip().endswith(f"/{slice_name}/{unit}")
    assert _unit_state(unit) == "active"
    pod.rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod.id))
    wait_for(lambda: _unit_state(unit) in ("inactive", ""))


class TestRuncWithSystemdOnNode(RuntimeConformance):
    """The whole runtime suite through the systemd driver, kill -9 and restart of shimhub included."""

    plugin = "runc"
    settings = 'cgroup_driver = "systemd"\n'


def test_a_cgroupfs_parent_is_invalid_argument(node, tmp_path: Path) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        Pod(node, tmp_path, linux=cri.LinuxPodSandboxConfig(cgroup_parent="/kubepods/burstable/pod0a1b"))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "is not a systemd slice name" in refused.value.details()

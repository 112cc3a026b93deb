"""Device policy per handler: a privileged container gets the host's devices unless its handler says not,
and device nodes may be owned by the container's user (containerd's and CRI-O's settings)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shimhub.testing.daemon import Pod
from shimhub_proto.cri.v1 import api_pb2 as cri
from tests.conftest import NEEDS_ROOT
from tests.test_runc import exec_sync, runc_config

pytestmark = [NEEDS_ROOT, pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse on this node")]

HANDLERS = (
    '[runtimes.sealed]\nplugin = "runc"\nprivileged_without_host_devices = true\n'
    '[runtimes.owned]\nplugin = "runc"\ndevice_ownership_from_security_context = true\n'
)


@pytest.fixture
def node(daemon_factory, registry):
    daemon = daemon_factory(runc_config(registry, HANDLERS)).start()
    daemon.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image="test/busybox:1")))
    return daemon


def _privileged() -> cri.LinuxContainerConfig:
    context = cri.LinuxContainerSecurityContext(privileged=True, run_as_user=cri.Int64Value(value=0))
    return cri.LinuxContainerConfig(security_context=context)


def _privileged_pod(node, directory: Path, handler: str) -> Pod:
    context = cri.LinuxSandboxSecurityContext(privileged=True, namespace_options=cri.NamespaceOption(pid=cri.CONTAINER))
    linux = cri.LinuxPodSandboxConfig(security_context=context)
    return Pod(node, directory, handler=handler, name=handler, uid=f"uid-{handler}", linux=linux)


def test_a_privileged_container_gets_the_hosts_devices_unless_its_handler_says_not(node, tmp_path: Path) -> None:
    pod = _privileged_pod(node, tmp_path / "a", "runc")
    container = pod.run("host-devices", ["sleep", "300"], linux=_privileged())
    assert exec_sync(pod, container, "stat", "-c", "%t:%T", "/dev/fuse").stdout == b"a:e5\n"
    assert exec_sync(pod, container, "sh", "-c", "exec 3<>/dev/fuse && echo opened").stdout == b"opened\n"
    sealed = _privileged_pod(node, tmp_path / "b", "sealed")
    container = sealed.run("no-host-devices", ["sleep", "300"], linux=_privileged())
    assert exec_sync(sealed, container, "ls", "/dev/fuse").exit_code != 0
    assert exec_sync(sealed, container, "ls", "/dev/null").exit_code == 0


def test_device_nodes_may_be_owned_by_the_containers_user(node, tmp_path: Path) -> None:
    device = cri.Device(container_path="/dev/given", host_path="/dev/fuse", permissions="rw")
    user = cri.LinuxContainerConfig(
        security_context=cri.LinuxContainerSecurityContext(
            run_as_user=cri.Int64Value(value=1000), run_as_group=cri.Int64Value(value=3000)
        )
    )
    for handler, owner in (("runc", b"0:0\n"), ("owned", b"1000:3000\n")):
        pod = Pod(node, tmp_path / handler, handler=handler, name=handler, uid=f"uid-{handler}")
        container = pod.run("user", ["sleep", "300"], linux=user, devices=[device])
        assert exec_sync(pod, container, "stat", "-c", "%u:%g", "/dev/given").stdout == owner, handler

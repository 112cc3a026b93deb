"""CDI devices in real containers, asked for as the kubelet asks: the CDI_devices field and the annotation."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import grpc
import pytest

from shimhub.testing.daemon import Pod
from shimhub_proto.cri.v1 import api_pb2 as cri
from tests.conftest import NEEDS_ROOT
from tests.test_runc import exec_sync, runc_config

pytestmark = [NEEDS_ROOT, pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse on this node")]
#: /dev/fuse's numbers: a device no OCI runtime allows by default, whose driver answers an open.
FUSE = (10, 229)
OPEN = "exec 3<>/dev/cdi-fuse && echo opened"


@pytest.fixture
def cdi_node(daemon_factory, registry, tmp_path: Path):
    node = tmp_path / "fuse-node"
    os.mknod(node, 0o666 | 0o020000, os.makedev(*FUSE))
    share = tmp_path / "share"
    share.mkdir()
    (share / "note").write_text("from the vendor\n")
    specs = tmp_path / "cdi"
    specs.mkdir()
    (specs / "fuse.yaml").write_text(
        "cdiVersion: 0.6.0\nkind: example.com/fuse\n"
        "containerEdits:\n  env: [CDI_SPEC=yes]\n"
        "devices:\n"
        f"- name: rw\n  containerEdits:\n    deviceNodes: [{{path: /dev/cdi-fuse, hostPath: {node}}}]\n"
        f"    mounts: [{{hostPath: {share}, containerPath: /cdi-share, options: [rbind, ro]}}]\n"
        "    env: [CDI_DEVICE=rw]\n"
        "- name: locked\n  containerEdits:\n"
        f"    deviceNodes: [{{path: /dev/cdi-fuse, hostPath: {node}, permissions: none}}]\n"
    )
    daemon = daemon_factory(f'cdi_spec_dirs = ["{tmp_path / "nowhere"}", "{specs}"]\n' + runc_config(registry)).start()
    daemon.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image="test/busybox:1")))
    return daemon, specs


@pytest.mark.parametrize("handler", ["runc", "crun"])
def test_a_cdi_device_is_injected_and_only_its_cgroup_rule_opens_it(cdi_node, tmp_path: Path, handler: str) -> None:
    daemon, specs = cdi_node
    if handler == "crun" and shutil.which("crun") is None:
        pytest.skip("crun is not installed")
    ready = {h.name for h in daemon.runtime.Status(cri.StatusRequest()).runtime_handlers}
    if handler not in ready:
        pytest.skip(f"handler {handler} is not ready on this node")
    pod = Pod(daemon, tmp_path / "pod", handler=handler)
    root = cri.LinuxContainerConfig(
        security_context=cri.LinuxContainerSecurityContext(run_as_user=cri.Int64Value(value=0))
    )
    asked = pod.run("asked", ["sleep", "300"], linux=root, CDI_devices=[cri.CDIDevice(name="example.com/fuse=rw")])
    assert exec_sync(pod, asked, "sh", "-c", OPEN).stdout == b"opened\n"
    environment = exec_sync(pod, asked, "env").stdout.decode().splitlines()
    assert "CDI_DEVICE=rw" in environment and "CDI_SPEC=yes" in environment
    assert exec_sync(pod, asked, "cat", "/cdi-share/note").stdout == b"from the vendor\n"
    info = json.loads(pod.rt.ContainerStatus(cri.ContainerStatusRequest(container_id=asked, verbose=True)).info["info"])
    assert info["cdi_devices"] == ["example.com/fuse=rw"]

    # the same node, injected without its cgroup rule: it is there and does not open
    claim = {"cdi.k8s.io/claim": "example.com/fuse=locked"}
    locked = pod.run("locked", ["sleep", "300"], linux=root, annotations=claim)
    assert exec_sync(pod, locked, "stat", "-c", "%t:%T", "/dev/cdi-fuse").stdout == b"a:e5\n"
    refused = exec_sync(pod, locked, "sh", "-c", OPEN)
    assert refused.exit_code != 0 and b"Operation not permitted" in refused.stderr, refused.stderr
    plain = pod.run("plain", ["sleep", "300"], linux=root)
    assert exec_sync(pod, plain, "ls", "/dev/cdi-fuse").exit_code != 0

    with pytest.raises(grpc.RpcError) as missing:
        pod.create("missing", ["true"], CDI_devices=[cri.CDIDevice(name="example.com/fuse=gone")])
    assert missing.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"CDI device 'example.com/fuse=gone' is not defined in any spec file of {tmp_path / 'nowhere'}, {specs}" in (
        missing.value.details()
    )
    assert "missing" not in [c.metadata.name for c in pod.rt.ListContainers(cri.ListContainersRequest()).containers]

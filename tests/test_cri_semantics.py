"""What the CRI and its clients (the kubelet, the upstream validation suite) expect, on runc."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import grpc
import pytest

from shimhub.testing.daemon import Pod
from shimhub_proto.cri.v1 import api_pb2 as cri
from tests.conftest import NEEDS_ROOT
from tests.test_runc import exec_sync, runc_config, security

pytestmark = NEEDS_ROOT


@pytest.fixture
def node(daemon_factory, registry):
    daemon = daemon_factory(runc_config(registry)).start()
    daemon.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image="test/busybox:1")))
    return daemon


def test_a_pod_without_hostname_gets_the_nodes(node, tmp_path: Path) -> None:
    """An empty hostname means the node's, as in containerd and CRI-O, whatever the pod's name (~70 chars here)."""
    pod = Pod(node, tmp_path, hostname="")
    long_named = Pod(node, tmp_path / "long", name="p" * 70, hostname="")
    for each in (pod, long_named):
        container = each.run("c", ["sleep", "300"])
        assert exec_sync(each, container, "hostname").stdout.decode() == socket.gethostname() + "\n"


def test_a_hostname_is_set_by_the_system_call_not_a_command_line(node, tmp_path: Path) -> None:
    pod = Pod(node, tmp_path, hostname="--file=/etc/machine-id")
    container = pod.run("c", ["sleep", "300"])
    assert exec_sync(pod, container, "hostname").stdout == b"--file=/etc/machine-id\n"


@pytest.mark.parametrize(
    ("hostname", "why"), [("h" * 65, "at most 64"), ("two\nlines", "control characters"), ("a b", "white space")]
)
def test_a_hostname_the_kernel_or_etc_hosts_cannot_take_is_refused(node, tmp_path: Path, hostname, why) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        Pod(node, tmp_path, hostname=hostname)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "hostname" in refused.value.details() and why in refused.value.details()
    assert list(node.runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items) == []


def test_run_as_group_without_a_user_is_refused(node, tmp_path: Path) -> None:
    pod = Pod(node, tmp_path)
    with pytest.raises(grpc.RpcError) as refused:
        pod.create("c", ["id"], linux=security(run_as_group=cri.Int64Value(value=3000)))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "run_as_group" in refused.value.details()
    sandbox = cri.LinuxPodSandboxConfig(
        security_context=cri.LinuxSandboxSecurityContext(run_as_group=cri.Int64Value(value=3000))
    )
    with pytest.raises(grpc.RpcError) as refused:
        Pod(node, tmp_path / "other", name="other", linux=sandbox)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # with a user, the group applies
    with_user = pod.run(
        "ok", ["id"], linux=security(run_as_user=cri.Int64Value(value=1000), run_as_group=cri.Int64Value(value=3000))
    )
    pod.wait_exit(with_user)
    assert pod.lines("ok") == ["uid=1000(app) gid=3000"]


def test_a_failed_create_leaves_no_log_file(node, tmp_path: Path) -> None:
    """The kubelet counts a container's attempts from the log files it finds."""
    pod = Pod(node, tmp_path)
    with pytest.raises(grpc.RpcError):
        pod.create("broken", ["true"], working_dir="/srv/hello.txt")  # a file: runc cannot chdir there
    assert not (pod.logs / "broken.log").exists()
    assert list(node.runtime.ListContainers(cri.ListContainersRequest()).containers) == []
    # and the failure is in the log at the default level, with the method and the pod
    failed = [line for line in node.log().splitlines() if f"CreateContainer (pod sandbox {pod.id}) failed" in line]
    assert failed and all(" ERROR " in line or " WARNING " in line for line in failed), failed


def test_evented_restart_leads_to_the_new_attempt(node, tmp_path: Path) -> None:
    """With the evented PLEG the kubelet takes the first status with a container's name in the pod's statuses."""
    events: list[cri.ContainerEventResponse] = []
    stream = node.runtime.GetContainerEvents(cri.GetEventsRequest())
    reader = threading.Thread(target=lambda: events.extend(stream), daemon=True)
    reader.start()
    pod = Pod(node, tmp_path)
    first = pod.run("app", ["sh", "-c", "exit 1"], metadata=cri.ContainerMetadata(name="app", attempt=0))
    pod.wait_exit(first)
    second = pod.run("app", ["sleep", "300"], metadata=cri.ContainerMetadata(name="app", attempt=1), log_path="a1.log")
    status = node.runtime.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod.id))
    assert [s.id for s in status.containers_statuses] == [second, first]
    stream.cancel()
    reader.join(10)
    started = [e for e in events if e.container_id == second and e.container_event_type == cri.CONTAINER_STARTED_EVENT]
    assert started, [(e.container_id[:12], e.container_event_type) for e in events]
    first_named = next(s for s in started[-1].containers_statuses if s.metadata.name == "app")
    assert (first_named.id, first_named.state) == (second, cri.CONTAINER_RUNNING)

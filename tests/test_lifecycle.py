"""Pod and container lifecycle through the CRI, on the test runtime plugin."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import grpc
import psutil
import pytest

from shimhub import netns
from shimhub.testing.daemon import host_network, pod_config, wait_for
from shimhub.testing.leaks import exited
from shimhub_proto.cri.v1 import api_pb2 as cri
from tests.conftest import NEEDS_ROOT

pytestmark = NEEDS_ROOT


def rpc_error(call, request):
    with pytest.raises(grpc.RpcError) as caught:
        call(request)
    return caught.value.code(), caught.value.details()


def make_pod(rt, tmp_path: Path, name: str = "web", **fields: object) -> tuple[str, cri.PodSandboxConfig]:
    config = pod_config(name=name, log_directory=str(tmp_path / "logs" / name), **fields)
    return rt.RunPodSandbox(cri.RunPodSandboxRequest(config=config)).pod_sandbox_id, config


def make_container(
    rt, pod_id: str, pod: cri.PodSandboxConfig, command: list[str], name: str = "main", **fields: object
) -> str:
    config = cri.ContainerConfig(metadata=cri.ContainerMetadata(name=name), command=command, **fields)
    request = cri.CreateContainerRequest(pod_sandbox_id=pod_id, config=config, sandbox_config=pod)
    return rt.CreateContainer(request).container_id


def status_of(rt, container_id: str) -> cri.ContainerStatus:
    return rt.ContainerStatus(cri.ContainerStatusRequest(container_id=container_id)).status


def test_pod_network_namespace_lives_until_stop(daemon, tmp_path: Path) -> None:
    rt = daemon.runtime
    pod_id, _ = make_pod(rt, tmp_path)
    pinned = Path(netns.pod_path(pod_id))
    assert pinned.exists()
    rt.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    assert not pinned.exists()
    status = rt.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id)).status
    assert status.state == cri.SANDBOX_NOTREADY
    rt.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod_id))  # idempotent
    rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id))  # idempotent
    rt.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id="0" * 64))  # unknown: nothing to do


def test_duplicate_pod_name_refused_and_identical_retry_answered(daemon, tmp_path: Path) -> None:
    rt = daemon.runtime
    pod_id, config = make_pod(rt, tmp_path)
    assert rt.RunPodSandbox(cri.RunPodSandboxRequest(config=config)).pod_sandbox_id == pod_id
    other = cri.PodSandboxConfig()
    other.CopyFrom(config)
    other.labels["changed"] = "yes"
    code, details = rpc_error(rt.RunPodSandbox, cri.RunPodSandboxRequest(config=other))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    assert details == f"pod sandbox name 'web_default_uid-1_0' is reserved for pod sandbox {pod_id}"
    assert len(rt.ListPodSandbox(cri.ListPodSandboxRequest()).items) == 1
    rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    assert rt.RunPodSandbox(cri.RunPodSandboxRequest(config=other)).pod_sandbox_id != pod_id


def test_duplicate_container_name(daemon, tmp_path: Path) -> None:
    rt = daemon.runtime
    pod_id, pod = make_pod(rt, tmp_path)
    first = make_container(rt, pod_id, pod, ["sleep", "30"])
    assert make_container(rt, pod_id, pod, ["sleep", "30"]) == first
    code, details = rpc_error(
        rt.CreateContainer,
        cri.CreateContainerRequest(
            pod_sandbox_id=pod_id,
            sandbox_config=pod,
            config=cri.ContainerConfig(metadata=cri.ContainerMetadata(name="main"), command=["true"]),
        ),
    )
    assert code == grpc.StatusCode.ALREADY_EXISTS
    assert details == f"container name 'main_web_default_uid-1_0' is reserved for container {first}"


def test_bad_requests(daemon, tmp_path: Path) -> None:
    rt = daemon.runtime
    code, details = rpc_error(rt.RunPodSandbox, cri.RunPodSandboxRequest(config=cri.PodSandboxConfig()))
    assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, "pod sandbox metadata.name is empty")
    pod_id, _pod = make_pod(rt, tmp_path)
    for log_path, message in [
        (
            "../../etc/cron.d/x",
            "log_path '../../etc/cron.d/x' must be relative to the pod's log_directory, without '..'",
        ),
        ("/var/log/x.log", "log_path '/var/log/x.log' must be relative to the pod's log_directory, without '..'"),
    ]:
        config = cri.ContainerConfig(metadata=cri.ContainerMetadata(name="c"), command=["true"], log_path=log_path)
        code, details = rpc_error(rt.CreateContainer, cri.CreateContainerRequest(pod_sandbox_id=pod_id, config=config))
        assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, message)
    code, details = rpc_error(rt.ContainerStatus, cri.ContainerStatusRequest(container_id="f" * 64))
    assert (code, details) == (grpc.StatusCode.NOT_FOUND, f"container {'f' * 64!r} not found")
    rt.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    config = cri.ContainerConfig(metadata=cri.ContainerMetadata(name="late"), command=["true"])
    code, details = rpc_error(rt.CreateContainer, cri.CreateContainerRequest(pod_sandbox_id=pod_id, config=config))
    assert (code, details) == (grpc.StatusCode.FAILED_PRECONDITION, f"pod sandbox {pod_id} is not ready")


def test_exec_sync_output_exit_code_and_timeout(daemon, tmp_path: Path) -> None:
    rt = daemon.runtime
    pod_id, pod = make_pod(rt, tmp_path)
    container_id = make_container(rt, pod_id, pod, ["sleep", "60"])
    code, details = rpc_error(rt.ExecSync, cri.ExecSyncRequest(container_id=container_id, cmd=["true"]))
    assert (code, details) == (grpc.StatusCode.FAILED_PRECONDITION, f"container {container_id} is not running")
    rt.StartContainer(cri.StartContainerRequest(container_id=container_id))
    result = rt.ExecSync(
        cri.ExecSyncRequest(container_id=container_id, cmd=["sh", "-c", "echo out; echo err >&2; exit 4"])
    )
    assert (result.stdout, result.stderr, result.exit_code) == (b"out\n", b"err\n", 4)
    started = time.monotonic()
    code, details = rpc_error(
        rt.ExecSync, cri.ExecSyncRequest(container_id=container_id, cmd=["sleep", "30"], timeout=1)
    )
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert details == f"command 'sleep' in container {container_id} timed out after 1 s"
    assert time.monotonic() - started < 10
    # The test runtime has no streaming hooks: the streaming RPCs say so instead of handing out URLs.
    code, details = rpc_error(rt.Exec, cri.ExecRequest(container_id=container_id, cmd=["true"], stdout=True))
    assert (code, details) == (grpc.StatusCode.UNIMPLEMENTED, "runtime plugin 'proc' does not implement runtime_exec")
    code, _ = rpc_error(rt.PortForward, cri.PortForwardRequest(pod_sandbox_id=pod_id, port=[80]))
    assert code == grpc.StatusCode.UNIMPLEMENTED


def test_stop_escalates_to_sigkill_after_the_timeout(daemon, tmp_path: Path) -> None:
    rt = daemon.runtime
    pod_id, pod = make_pod(rt, tmp_path)
    container_id = make_container(rt, pod_id, pod, ["sh", "-c", "trap '' TERM; while true; do sleep 0.1; done"])
    rt.StartContainer(cri.StartContainerRequest(container_id=container_id))
    assert status_of(rt, container_id).state == cri.CONTAINER_RUNNING
    time.sleep(0.3)  # let the shell install its trap
    started = time.monotonic()
    rt.StopContainer(cri.StopContainerRequest(container_id=container_id, timeout=1))
    took = time.monotonic() - started
    final = status_of(rt, container_id)
    assert final.state == cri.CONTAINER_EXITED
    assert final.exit_code == 137
    assert 1.0 <= took < 8, took
    rt.StopContainer(cri.StopContainerRequest(container_id=container_id, timeout=1))  # idempotent


def test_list_filters(daemon, tmp_path: Path) -> None:
    rt = daemon.runtime
    web_id, web = make_pod(rt, tmp_path, "web", labels={"app": "web"})
    db_id, _db = make_pod(rt, tmp_path, "db", labels={"app": "db"}, linux=host_network())
    running = make_container(rt, web_id, web, ["sleep", "60"], name="a", labels={"tier": "front"})
    created = make_container(rt, web_id, web, ["sleep", "60"], name="b")
    rt.StartContainer(cri.StartContainerRequest(container_id=running))
    rt.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=db_id))

    def pods(**filter_fields: object) -> list[str]:
        items = rt.ListPodSandbox(cri.ListPodSandboxRequest(filter=cri.PodSandboxFilter(**filter_fields))).items
        return sorted(item.id for item in items)

    assert pods() == sorted([web_id, db_id])
    assert pods(label_selector={"app": "db"}) == [db_id]
    assert pods(state=cri.PodSandboxStateValue(state=cri.SANDBOX_READY)) == [web_id]
    assert pods(id=db_id[:8]) == [db_id]

    def containers(**filter_fields: object) -> list[str]:
        request = cri.ListContainersRequest(filter=cri.ContainerFilter(**filter_fields))
        return sorted(c.id for c in rt.ListContainers(request).containers)

    assert containers() == sorted([running, created])
    assert containers(state=cri.ContainerStateValue(state=cri.CONTAINER_RUNNING)) == [running]
    assert containers(state=cri.ContainerStateValue(state=cri.CONTAINER_CREATED)) == [created]
    assert containers(label_selector={"tier": "front"}) == [running]
    assert containers(pod_sandbox_id=db_id) == []
    streamed = [c.id for part in rt.StreamContainers(cri.StreamContainersRequest()) for c in part.containers]
    assert sorted(streamed) == sorted([running, created])


def test_removing_a_pod_removes_its_containers_and_processes(daemon, tmp_path: Path) -> None:
    rt = daemon.runtime
    pod_id, pod = make_pod(rt, tmp_path)
    container_id = make_container(rt, pod_id, pod, ["sleep", "300"])
    rt.StartContainer(cri.StartContainerRequest(container_id=container_id))
    info = rt.ContainerStatus(cri.ContainerStatusRequest(container_id=container_id, verbose=True)).info["info"]
    pid = json.loads(info)["runtime_data"]["pid"]
    os.kill(pid, 0)
    process = psutil.Process(pid)
    rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    assert rt.ListContainers(cri.ListContainersRequest()).containers == []
    wait_for(lambda: exited(process))


def test_plugin_failure_reaches_the_client_without_a_traceback(daemon, tmp_path: Path) -> None:
    rt = daemon.runtime
    pod_id, pod = make_pod(rt, tmp_path, linux=host_network())
    container_id = make_container(rt, pod_id, pod, ["/nonexistent/binary"])
    code, details = rpc_error(rt.StartContainer, cri.StartContainerRequest(container_id=container_id))
    assert code == grpc.StatusCode.INTERNAL
    assert details.startswith(
        "runtime plugin 'proc' failed in runtime_container_start: RuntimeError: the command did not start: "
        "FileNotFoundError: [Errno 2] No such file or directory: '/nonexistent/binary'"
    )
    assert "Traceback" not in details
    assert "Traceback" in daemon.log()  # the operator gets it

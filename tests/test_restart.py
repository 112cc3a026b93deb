"""State survives a restart: same ids, states, names, and containers still managed."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from shimhub.testing.daemon import pod_config, wait_for
from shimhub_proto.cri.v1 import api_pb2 as cri
from tests.conftest import NEEDS_ROOT, PROC_CONFIG

pytestmark = NEEDS_ROOT


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_pods_and_containers_survive_a_restart(daemon_factory, tmp_path: Path, how: str) -> None:
    daemon = daemon_factory(PROC_CONFIG).start()
    rt = daemon.runtime
    config = pod_config(log_directory=str(tmp_path / "logs"), labels={"app": "kept"})
    pod_id = rt.RunPodSandbox(cri.RunPodSandboxRequest(config=config)).pod_sandbox_id

    def container(name: str, command: list[str]) -> str:
        request = cri.CreateContainerRequest(
            pod_sandbox_id=pod_id,
            config=cri.ContainerConfig(
                metadata=cri.ContainerMetadata(name=name), command=command, log_path=f"{name}.log"
            ),
        )
        return rt.CreateContainer(request).container_id

    long_running = container("server", ["sleep", "300"])
    short = container("job", ["sh", "-c", "exit 3"])
    never_started = container("idle", ["true"])
    for container_id in (long_running, short):
        rt.StartContainer(cri.StartContainerRequest(container_id=container_id))
    wait_for(lambda: rt.ContainerStatus(cri.ContainerStatusRequest(container_id=short)).status.exit_code == 3)
    before = {c.id: c for c in rt.ListContainers(cri.ListContainersRequest()).containers}

    if how == "sigterm":
        assert daemon.stop() == 0
    else:
        daemon.kill()
    daemon.start()
    rt = daemon.runtime

    pods = rt.ListPodSandbox(cri.ListPodSandboxRequest()).items
    assert [(p.id, p.state, dict(p.labels)) for p in pods] == [(pod_id, cri.SANDBOX_READY, {"app": "kept"})]
    after = {c.id: c for c in rt.ListContainers(cri.ListContainersRequest()).containers}
    assert {cid: c.state for cid, c in after.items()} == {cid: c.state for cid, c in before.items()}
    assert after[long_running].state == cri.CONTAINER_RUNNING
    status = rt.ContainerStatus(cri.ContainerStatusRequest(container_id=short)).status
    assert (status.state, status.exit_code, status.log_path) == (
        cri.CONTAINER_EXITED,
        3,
        str(tmp_path / "logs" / "job.log"),
    )
    assert after[never_started].state == cri.CONTAINER_CREATED

    # Names are still held, and the kept containers are still managed.
    changed = cri.PodSandboxConfig()
    changed.CopyFrom(config)
    changed.hostname = "other"
    with pytest.raises(grpc.RpcError) as taken:
        rt.RunPodSandbox(cri.RunPodSandboxRequest(config=changed))
    assert taken.value.code() == grpc.StatusCode.ALREADY_EXISTS
    rt.StopContainer(cri.StopContainerRequest(container_id=long_running, timeout=5))
    stopped = rt.ContainerStatus(cri.ContainerStatusRequest(container_id=long_running)).status
    assert stopped.state == cri.CONTAINER_EXITED
    rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    assert not list((daemon.root / "state" / "sandboxes").glob("*.json"))
    assert not list((daemon.root / "state" / "containers").glob("*.json"))

"""No kind of call can take the workers other calls need (the kubelet's relist must always answer)."""

from __future__ import annotations

import grpc

from shimhub.testing.daemon import pod_config
from shimhub_proto.cri.v1 import api_pb2 as cri
from tests.conftest import NEEDS_ROOT

pytestmark = NEEDS_ROOT
#: More than the 64 workers that once served every call.
SLOW_EXECS = 100
STREAMS = 100


def test_slow_execs_and_event_streams_leave_status_and_list_calls_answering(daemon) -> None:
    rt = daemon.runtime
    sandbox_id = rt.RunPodSandbox(cri.RunPodSandboxRequest(config=pod_config())).pod_sandbox_id
    config = cri.ContainerConfig(metadata=cri.ContainerMetadata(name="c"), command=["sleep", "300"])
    container_id = rt.CreateContainer(cri.CreateContainerRequest(pod_sandbox_id=sandbox_id, config=config)).container_id
    rt.StartContainer(cri.StartContainerRequest(container_id=container_id))
    streams = [rt.GetContainerEvents(cri.GetEventsRequest()) for _ in range(STREAMS)]
    slow = cri.ExecSyncRequest(container_id=container_id, cmd=["sleep", "6"], timeout=30)
    execs = [rt.ExecSync.future(slow, timeout=60) for _ in range(SLOW_EXECS)]
    try:
        # Every slow call is in flight now (or refused for its lane), and the relist still answers.
        assert rt.Version(cri.VersionRequest(), timeout=10).runtime_name == "shimhub"
        listed = rt.ListContainers(cri.ListContainersRequest(), timeout=10).containers
        assert [c.id for c in listed] == [container_id]
        assert rt.ListPodSandbox(cri.ListPodSandboxRequest(), timeout=10).items[0].id == sandbox_id
    finally:
        for stream in streams:
            stream.cancel()
    for done in execs:
        try:
            assert done.result().exit_code == 0
        except grpc.RpcError as refused:  # a lane may turn some away, never the relist
            assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

"""A runtime plugin shipped as its own distribution works with no change to shimhub."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

from shimhub.testing.daemon import pod_config, wait_for
from shimhub_proto.cri.v1 import api_pb2 as cri
from tests.conftest import NEEDS_ROOT

pytestmark = NEEDS_ROOT

CONFIG = """
default_runtime = "default-proc"
[runtimes.default-proc]
plugin = "proc"
[runtimes.proc]
plugin = "proc"
[network]
backend = "host"
"""


def test_listed_by_shimhub_plugins(daemon_factory) -> None:
    listing = daemon_factory(CONFIG).command("plugins")
    line = next(line for line in listing.stdout.splitlines() if " proc " in line)
    assert line.split()[:4] == ["runtime", "proc", "shimhub-procrun", "1.2.0"]
    assert "[ok]" in line
    assert listing.returncode == 0, listing.stdout + listing.stderr


def test_selected_by_runtime_handler_and_runs_a_container(daemon_factory, tmp_path: Path) -> None:
    daemon = daemon_factory(CONFIG).start()
    rt = daemon.runtime
    logs = tmp_path / "pod-logs"
    config = pod_config(log_directory=str(logs))
    pod_id = rt.RunPodSandbox(cri.RunPodSandboxRequest(config=config, runtime_handler="proc")).pod_sandbox_id
    status = rt.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id)).status
    assert status.runtime_handler == "proc"
    assert status.state == cri.SANDBOX_READY

    container = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="hello"),
        command=["sh", "-c", "echo hello from proc; ip -o link show | wc -l; exit 7"],
        log_path="hello/0.log",
    )
    container_id = rt.CreateContainer(
        cri.CreateContainerRequest(pod_sandbox_id=pod_id, config=container, sandbox_config=config)
    ).container_id
    rt.StartContainer(cri.StartContainerRequest(container_id=container_id))

    def exited() -> cri.ContainerStatus | None:
        got = rt.ContainerStatus(cri.ContainerStatusRequest(container_id=container_id)).status
        return got if got.state == cri.CONTAINER_EXITED else None

    final = wait_for(exited)
    assert final.exit_code == 7
    assert final.reason == "Error"
    assert final.log_path == str(logs / "hello" / "0.log")
    output = [line.split(" ", 3)[3] for line in (logs / "hello" / "0.log").read_text().splitlines()]
    assert output[0] == "hello from proc"
    # The pod has its own network namespace (from the host backend): only loopback is in it.
    assert output[1].strip() == "1"

    rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    with pytest.raises(grpc.RpcError) as gone:
        rt.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id))
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    assert not any(name.startswith(f"shimhub-{pod_id[:20]}") for name in os.listdir("/run/netns"))

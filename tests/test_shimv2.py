"""The shim v2 runtime: pods and containers through Debian's containerd-shim-runc-v2, over ttrpc."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import grpc
import psutil
import pytest

from shimhub.testing.daemon import Pod, wait_for
from shimhub.testing.leaks import exited
from shimhub_proto.cri.v1 import api_pb2 as cri
from tests.conftest import NEEDS_ROOT

SHIM = "containerd-shim-runc-v2"
#: Where the shim keeps runc's state for shimhub's tasks (runc's root in the shim's namespace).
RUNC_STATE = Path("/run/containerd/runc/shimhub")
pytestmark = [
    NEEDS_ROOT,
    pytest.mark.skipif(shutil.which(SHIM) is None, reason=f"{SHIM} is not installed (Debian package containerd)"),
]


def shim_config(registry, handler: str = "") -> str:
    return (
        f'default_runtime = "shim"\n[runtimes.shim]\nplugin = "shimv2"\n{handler}'
        f'[runtimes.shim.options]\nshim = "{SHIM}"\n'
        f'[network]\nbackend = "host"\n[storage]\ndriver = "overlay"\n{registry.config()}'
    )


@pytest.fixture
def node(daemon_factory, registry):
    daemon = daemon_factory(shim_config(registry)).start()
    daemon.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image="test/busybox:1")))
    return daemon


def shim_processes(root: Path) -> list[int]:
    """Pids of shims started by the daemon rooted at `root`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmdline and cmdline[0].endswith(SHIM.encode()) and str(root).encode() in b" ".join(cmdline):
            found.append(int(pid))
    return found


def cri_log(pod: Pod, name: str) -> list[tuple[str, str, str]]:
    """(stream, tag, text) of each line of a container's CRI log."""
    lines = (pod.logs / f"{name}.log").read_text().splitlines()
    return [tuple(line.split(" ", 3)[1:]) for line in lines]  # type: ignore[misc]


def test_container_runs_through_the_shim_with_cri_logs_and_exit_code(node, tmp_path: Path) -> None:
    pod = Pod(node, tmp_path, handler="shim")
    shims = shim_processes(node.root)
    assert len(shims) == 1, "the pod's sandbox runs in one shim"
    container = pod.run("main", ["sh", "-c", "echo hello; echo oops >&2; printf partial; exit 7"])
    status = pod.wait_exit(container)
    assert status.exit_code == 7
    assert status.reason == "Error"
    assert shim_processes(node.root) == shims, "the container joined the pod's shim (grouped by sandbox id)"
    lines = cri_log(pod, "main")  # each stream in order (the two streams are separate pipes)
    assert [line for line in lines if line[0] == "stdout"] == [("stdout", "F", "hello"), ("stdout", "P", "partial")]
    assert [line for line in lines if line[0] == "stderr"] == [("stderr", "F", "oops")]
    timestamp = (pod.logs / "main.log").read_text().split(" ", 1)[0]
    assert time.strptime(timestamp[:19], "%Y-%m-%dT%H:%M:%S") and timestamp.endswith("Z")


def test_exec_sync_stats_and_stop(node, tmp_path: Path) -> None:
    pod = Pod(node, tmp_path, handler="shim")
    container = pod.run("sleeper", ["sh", "-c", "trap 'echo bye; exit 0' TERM; while true; do sleep 0.1; done"])
    result = node.runtime.ExecSync(
        cri.ExecSyncRequest(container_id=container, cmd=["sh", "-c", "uname -n; echo err >&2; exit 3"], timeout=10)
    )
    assert (result.exit_code, result.stdout, result.stderr) == (3, b"podhost\n", b"err\n")
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as error:
        node.runtime.ExecSync(cri.ExecSyncRequest(container_id=container, cmd=["sleep", "30"], timeout=1))
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 10
    ps = node.runtime.ExecSync(cri.ExecSyncRequest(container_id=container, cmd=["ps", "-o", "args"], timeout=10))
    assert b"sleep 30" not in ps.stdout, "the timed-out command was killed"
    stats = node.runtime.ContainerStats(cri.ContainerStatsRequest(container_id=container)).stats
    assert stats.cpu.usage_core_nano_seconds.value > 0
    assert stats.memory.working_set_bytes.value > 0
    node.runtime.StopContainer(cri.StopContainerRequest(container_id=container, timeout=10))
    status = pod.status(container)
    assert (status.state, status.exit_code) == (cri.CONTAINER_EXITED, 0), "the stop signal reached the trap"
    assert ("stdout", "F", "bye") in cri_log(pod, "sleeper")


def test_stop_escalates_to_sigkill(node, tmp_path: Path) -> None:
    pod = Pod(node, tmp_path, handler="shim")
    container = pod.run("stubborn", ["sh", "-c", "trap '' TERM; while true; do sleep 0.1; done"])
    started = time.monotonic()
    node.runtime.StopContainer(cri.StopContainerRequest(container_id=container, timeout=1))
    assert 1 <= time.monotonic() - started < 8
    assert pod.status(container).exit_code == 137


def test_shimhub_restart_reconnects_to_the_running_shim(node, tmp_path: Path) -> None:
    pod = Pod(node, tmp_path, handler="shim")
    container = pod.run("ticker", ["sh", "-c", "i=0; while true; do echo tick-$i; i=$((i+1)); sleep 0.2; done"])
    shims = shim_processes(node.root)
    node.kill()  # kill -9: nothing is shut down gracefully
    time.sleep(1)  # output written while shimhub is down waits in the FIFO
    node.start()
    assert shim_processes(node.root) == shims
    assert pod.status(container).state == cri.CONTAINER_RUNNING
    result = node.runtime.ExecSync(cri.ExecSyncRequest(container_id=container, cmd=["echo", "still"], timeout=10))
    assert result.stdout == b"still\n"
    wait_for(lambda: len(cri_log(pod, "ticker")) > 12, timeout=10)
    ticks = [int(text.split("-")[1]) for _, _, text in cri_log(pod, "ticker")]
    assert ticks == list(range(len(ticks))), "no line was lost or repeated across the restart"
    node.runtime.StopContainer(cri.StopContainerRequest(container_id=container, timeout=0))
    assert pod.status(container).exit_code == 137


@pytest.mark.parametrize("runc_state", ["kept", "lost"])
def test_a_killed_shim_is_reported_and_cleaned_up(node, tmp_path: Path, runc_state: str) -> None:
    """With its runc state lost as well, `runc delete` finds nothing to kill, and the shim's cleanup succeeds
    all the same: the container's cgroup is what shimhub still has."""
    pod = Pod(node, tmp_path, handler="shim")
    container = pod.run("victim", ["sleep", "300"])
    (shim,) = [psutil.Process(pid) for pid in shim_processes(node.root)]
    (victim,) = [p for p in shim.children(recursive=True) if p.cmdline() == ["sleep", "300"]]
    (address,) = {c.laddr for c in shim.net_connections("unix") if c.laddr.startswith("/run/containerd/s/")}
    shim.kill()
    if runc_state == "lost":
        shutil.rmtree(RUNC_STATE / container)
    status = wait_for(lambda: (s := pod.status(container)).state == cri.CONTAINER_EXITED and s, timeout=10)
    assert status.exit_code == 137
    assert "shim exited unexpectedly" in status.message
    assert exited(victim), "reported as killed, the container's process is gone"
    with pytest.raises(grpc.RpcError) as error:
        node.runtime.ExecSync(cri.ExecSyncRequest(container_id=container, cmd=["true"], timeout=5))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    node.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod.id))
    assert not os.path.exists(address), "the dead shim's socket was removed"
    assert shim_processes(node.root) == [], "cleaning up started no shim"


def test_allowed_annotations_and_the_pod_grouping_reach_the_shim(daemon_factory, registry, tmp_path: Path) -> None:
    node = daemon_factory(shim_config(registry, 'allowed_annotations = ["io.katacontainers."]\n')).start()
    node.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image="test/busybox:1")))
    annotations = {"io.katacontainers.config.hypervisor.default_vcpus": "2", "example.com/secret": "no"}
    pod = Pod(node, tmp_path, handler="shim", annotations=annotations)
    container = pod.create("main", ["true"], annotations=annotations)
    tasks = node.root / "run" / "plugins" / "runtime" / "shim" / "tasks"
    sandbox_spec = json.loads((tasks / pod.id / "config.json").read_text())["annotations"]
    container_spec = json.loads((tasks / container / "config.json").read_text())["annotations"]
    for spec, kind in ((sandbox_spec, "sandbox"), (container_spec, "container")):
        assert spec["io.katacontainers.config.hypervisor.default_vcpus"] == "2"
        assert "example.com/secret" not in spec, "only allowed annotations reach the shim"
        assert spec["io.kubernetes.cri.container-type"] == kind
        assert spec["io.kubernetes.cri.sandbox-id"] == pod.id

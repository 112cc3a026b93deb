"""The CRI requests a real kubelet sent, replayed against shimhub on runc in the kubelet's order.

The recordings (`kubelet-cri/` of the project's shared data, or the directory named by
SHIMHUB_KUBELET_CRI) hold every RunPodSandbox, CreateContainer and PullImage a kubelet
sent for five static pods. They are replayed as recorded, with only the node-specific
parts moved: the kubelet's directories under the test's own, the recorded image id and
name to the test registry's busybox, and (scenario c) nginx replaced by busybox httpd.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from shimhub.testing.daemon import Daemon, wait_for
from shimhub.testing.kubelet import localize, recordings_dir, scenario_calls
from shimhub_proto.cri.v1 import api_pb2 as cri
from tests.conftest import NEEDS_ROOT

pytestmark = [NEEDS_ROOT, pytest.mark.slow]


RECORDINGS = recordings_dir()
IMAGE = "test/busybox:1"
HOST_PORT = 18090


def recorded(scenario: str) -> list[dict[str, Any]]:
    """The recorded RunPodSandbox/CreateContainer/PullImage calls of one scenario, in order."""
    try:
        return scenario_calls(scenario)
    except FileNotFoundError as missing:
        if os.environ.get("CI"):
            pytest.fail(str(missing))  # in CI the recordings are beside the checkout: their absence is a fault
        pytest.skip(str(missing))


class Kubelet:
    """Replays recorded requests with the node-specific parts moved under `root`."""

    def __init__(self, daemon: Daemon, root: Path, image_id: str, registry_host: str) -> None:
        self.daemon = daemon
        self.registry_host = registry_host
        self.root = root
        self.image_id = image_id
        self.sandboxes: list[str] = []

    def localize(self, request: dict[str, Any]) -> dict[str, Any]:
        return localize(request, self.root, self.image_id, IMAGE)

    def run_pod(self, call: dict[str, Any]) -> str:
        request = json_format.ParseDict(self.localize(call["request"]), cri.RunPodSandboxRequest())
        sandbox_id = self.daemon.runtime.RunPodSandbox(request, timeout=240).pod_sandbox_id
        self.sandboxes.append(sandbox_id)
        return sandbox_id

    def create(self, call: dict[str, Any], sandbox_id: str, **override: Any) -> str:
        moved = self.localize(call["request"])
        moved["pod_sandbox_id"] = sandbox_id
        moved["config"].update(override)
        request = json_format.ParseDict(moved, cri.CreateContainerRequest())
        container_id = self.daemon.runtime.CreateContainer(request, timeout=120).container_id
        self.daemon.runtime.StartContainer(cri.StartContainerRequest(container_id=container_id), timeout=120)
        return container_id

    def exec(self, container_id: str, *cmd: str) -> str:
        answer = self.daemon.runtime.ExecSync(
            cri.ExecSyncRequest(container_id=container_id, cmd=list(cmd), timeout=5), timeout=125
        )
        assert answer.exit_code == 0, (cmd, answer)
        return answer.stdout.decode()

    def status(self, container_id: str) -> cri.ContainerStatus:
        return self.daemon.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=container_id)).status

    def teardown(self) -> None:
        """What the kubelet did when the manifests went: stop containers, stop pods, remove, stop again, remove."""
        rt = self.daemon.runtime
        for sandbox_id in self.sandboxes:
            for container in rt.ListContainers(
                cri.ListContainersRequest(filter=cri.ContainerFilter(pod_sandbox_id=sandbox_id))
            ).containers:
                if container.state == cri.CONTAINER_RUNNING:
                    rt.StopContainer(cri.StopContainerRequest(container_id=container.id, timeout=5), timeout=125)
            rt.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=120)
            for container in rt.ListContainers(
                cri.ListContainersRequest(filter=cri.ContainerFilter(pod_sandbox_id=sandbox_id))
            ).containers:
                rt.RemoveContainer(cri.RemoveContainerRequest(container_id=container.id), timeout=120)
                with pytest.raises(grpc.RpcError) as gone:
                    rt.ContainerStatus(cri.ContainerStatusRequest(container_id=container.id))
                assert gone.value.code() == grpc.StatusCode.NOT_FOUND
            rt.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=120)
            rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=120)
        assert rt.ListPodSandbox(cri.ListPodSandboxRequest()).items == []


def runc_cni_config(registry, network) -> str:
    return (
        'default_runtime = "runc"\n[runtimes.runc]\nplugin = "runc"\n[storage]\ndriver = "overlay"\n'
        f"{registry.config()}{network.table()}"
    )


@pytest.fixture
def kubelet_cgroups() -> Iterator[None]:
    """The kubelet makes the pod cgroups it names as parents, and removes them; here the test does."""
    made = [p for p in Path("/sys/fs/cgroup").glob("*/kubepods") if p.is_dir()]
    yield
    for top in Path("/sys/fs/cgroup").glob("*/kubepods"):
        if top in made:
            continue
        for directory in sorted((d for d in top.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts)):
            directory.rmdir()
        top.rmdir()


@pytest.fixture
def kubelet(kubelet_cgroups, daemon_factory, registry, network, tmp_path: Path) -> Kubelet:
    network.conflist()
    daemon = daemon_factory(runc_cni_config(registry, network)).start()
    daemon.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=IMAGE)))
    image_id = daemon.images.ImageStatus(cri.ImageStatusRequest(image=cri.ImageSpec(image=IMAGE))).image.id
    return Kubelet(daemon, tmp_path, image_id, registry.open.host)


def _cgroup_value(pid: int, controller: str, name: str) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return (Path("/sys/fs/cgroup") / controller / path.lstrip("/") / name).read_text().strip()
    raise AssertionError(f"process {pid} has no {controller} cgroup")


def _pid(kubelet: Kubelet, container_id: str) -> int:
    answer = kubelet.daemon.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=container_id, verbose=True))
    return int(json.loads(answer.info["info"])["runtime_data"]["pid"])


def test_burstable_pod_with_hugepage_limits_runs_as_the_kubelet_asked(kubelet: Kubelet) -> None:
    """Scenario a: cpu/memory limits, hugepage limits of 0, run as 1000:3000 with group 2000, caps, ro rootfs."""
    calls = recorded("a")
    sandbox_id = kubelet.run_pod(calls[0])
    app = kubelet.create(calls[1], sandbox_id)
    sidecar = kubelet.create(calls[2], sandbox_id)
    for container_id in (app, sidecar):
        status = kubelet.status(container_id)
        assert status.state == cri.CONTAINER_RUNNING
        # as the kubelet shows them: image = the tag it was created from, imageID = a repository digest
        assert status.image.image == f"{kubelet.registry_host}/{IMAGE}"
        assert status.image_ref.startswith(f"{kubelet.registry_host}/test/busybox@sha256:")
        assert status.image_id == kubelet.image_id
    listed = kubelet.daemon.runtime.ListContainers(cri.ListContainersRequest()).containers
    assert {(c.image.image, c.image_ref, c.image_id) for c in listed} == {
        (status.image.image, status.image_ref, status.image_id)
    }
    assert kubelet.exec(app, "id") == "uid=1000(app) gid=3000 groups=2000\n"
    assert kubelet.exec(app, "sh", "-c", "echo $GREETING $POD_MODE") == "hello burstable\n"
    assert kubelet.exec(app, "hostname") == "sc-a-burstable-node-1\n"
    status = kubelet.exec(app, "cat", "/proc/self/status")
    assert "Seccomp:\t2" in status  # the pod asked for RuntimeDefault
    assert "NoNewPrivs:\t1" in status
    assert "CapBnd:\t0000000000000400" in status, status  # NET_BIND_SERVICE only
    pid = _pid(kubelet, app)
    assert _cgroup_value(pid, "cpu", "cpu.cfs_quota_us") == "25000"
    assert _cgroup_value(pid, "cpu", "cpu.shares") == "102"
    assert _cgroup_value(pid, "memory", "memory.limit_in_bytes") == "67108864"
    assert Path(f"/proc/{pid}/oom_score_adj").read_text().strip() == "999"
    answer = kubelet.daemon.runtime.ExecSync(
        cri.ExecSyncRequest(container_id=app, cmd=["touch", "/rootfs-is-read-only"], timeout=5)
    )
    assert answer.exit_code != 0
    assert "dropped hugepage limits" in kubelet.daemon.log() or "hugetlb" in kubelet.daemon.log()
    kubelet.teardown()


def test_crash_looping_container_attempts_and_log_files(kubelet: Kubelet) -> None:
    """Scenario b: the same container created 5 times (attempts 0-4), each exiting 1; newest status first."""
    calls = recorded("b")
    sandbox_id = kubelet.run_pod(calls[0])
    creates = [call for call in calls if call["method"] == "CreateContainer"]
    previous = ""
    for attempt, call in enumerate(creates):
        container_id = kubelet.create(call, sandbox_id)
        final = wait_for(lambda cid=container_id: (s := kubelet.status(cid)).state == cri.CONTAINER_EXITED and s, 30)
        assert (final.exit_code, final.reason, final.metadata.attempt) == (1, "Error", attempt)
        pod = kubelet.daemon.runtime.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id))
        assert pod.containers_statuses[0].id == container_id, "newest attempt first"
        if previous:  # the kubelet keeps only the latest exited instance
            kubelet.daemon.runtime.RemoveContainer(cri.RemoveContainerRequest(container_id=previous))
        previous = container_id
    logs = Path(
        kubelet.daemon.runtime.PodSandboxStatus(
            cri.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id)
        ).status.metadata.name
    )  # only to keep the name handy in a failure message
    log_dir = kubelet.root / "pods"
    attempts = sorted(p.name for p in log_dir.rglob("fail/*.log"))
    assert attempts == [f"{n}.log" for n in range(5)], logs
    assert "about to fail" in (next(log_dir.rglob("fail/4.log"))).read_text()
    kubelet.teardown()


def test_init_container_then_server_behind_a_host_port(kubelet: Kubelet) -> None:
    """Scenario c: an init container that completes, then a server reachable on hostPort 18090."""
    calls = recorded("c")
    sandbox_id = kubelet.run_pod(calls[0])
    init = kubelet.create(calls[1], sandbox_id)
    final = wait_for(lambda: (s := kubelet.status(init)).state == cri.CONTAINER_EXITED and s, 30)
    assert (final.exit_code, final.reason) == (0, "Completed")
    kubelet.create(
        calls[2],
        sandbox_id,
        command=["sh", "-c", "echo served-by-pod > /tmp/index.html; exec httpd -f -p 80 -h /tmp"],
    )

    def fetch() -> bytes:
        try:
            with socket.create_connection(("127.0.0.1", HOST_PORT), timeout=2) as conn:
                conn.sendall(b"GET /index.html HTTP/1.0\r\n\r\n")
                return b"".join(iter(lambda: conn.recv(4096), b""))
        except OSError:
            return b""

    assert b"served-by-pod" in wait_for(fetch, 20)
    kubelet.teardown()


def test_guaranteed_pod_sharing_its_pid_namespace(kubelet: Kubelet) -> None:
    """Scenario d: shareProcessNamespace, hostname myhost, dnsConfig, Guaranteed limits."""
    calls = recorded("d")
    sandbox_id = kubelet.run_pod(calls[0])
    first = kubelet.create(calls[1], sandbox_id)
    second = kubelet.create(calls[2], sandbox_id)
    assert kubelet.exec(first, "hostname") == "myhost\n"
    resolv = kubelet.exec(first, "cat", "/etc/resolv.conf")
    assert "search" in resolv and "options ndots:2 edns0" in resolv
    second_pid = _pid(kubelet, second)
    assert kubelet.exec(first, "readlink", "/proc/self/ns/pid") == kubelet.exec(second, "readlink", "/proc/self/ns/pid")
    assert Path(f"/proc/{second_pid}/oom_score_adj").read_text().strip() in ("-997", "0")
    kubelet.teardown()


def test_pod_with_a_long_name_gets_the_kubelets_hostname(kubelet: Kubelet) -> None:
    """Scenario e: a 93-character pod name; the kubelet sent a 62-character hostname."""
    calls = recorded("e")
    sandbox_id = kubelet.run_pod(calls[0])
    container_id = kubelet.create(calls[1], sandbox_id)
    assert kubelet.exec(container_id, "hostname") == "sc-e-this-pod-name-is-deliberately-much-longer-than-sixty-four\n"
    time.sleep(0.1)
    kubelet.teardown()

"""Reliability: restarts keep every workload, a crash inside an RPC is rolled back or finished, and
twenty concurrent clients churning pods, containers and pulls get no error they did not deserve.

The node is real: runc, the CNI bridge and host-local IPAM, overlay, and images pulled from the
test registry. Crashes are real SIGKILLs at the crash points of shimhub.faults.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import grpc
import psutil
import pytest

from shimhub import mountinfo, netns
from shimhub.testing.daemon import Daemon, Pod, pod_config, wait_for
from shimhub.testing.leaks import leftovers
from shimhub_proto.cri.v1 import api_pb2 as cri
from shimhub_proto.cri.v1 import api_pb2_grpc
from tests.conftest import NEEDS_ROOT, Network, assert_image_store_empty

pytestmark = [
    NEEDS_ROOT,
    pytest.mark.skipif(not Path("/usr/lib/cni/bridge").exists(), reason="containernetworking-plugins is not installed"),
]

BUSYBOX = "test/busybox:1"
#: How far a file time (the kernel's coarse clock) may lag behind time.time_ns().
COARSE_TICK = 10_000_000
#: A second image, pulled by the tests that pull (nothing else on the node uses it).
OTHER_IMAGE = "test/docker:1"


def node_config(network: Network, registry) -> str:
    """runc on a CNI bridge, overlay storage, images from the test registry."""
    network.conflist()
    return (
        f'default_runtime = "runc"\n[runtimes.runc]\nplugin = "runc"\n{network.table()}'
        f'[storage]\ndriver = "overlay"\n{registry.config()}'
    )


@pytest.fixture
def node(daemon_factory, registry, network: Network) -> Daemon:
    daemon = daemon_factory(node_config(network, registry)).start()
    daemon.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=BUSYBOX)), timeout=120)
    return daemon


def pod_ip(pod: Pod) -> str:
    return pod.rt.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod.id)).status.network.ip


def answer(ip: str, port: int) -> bytes:
    """What a server in a pod says on connect."""
    with socket.create_connection((ip, port), timeout=10) as connection:
        return connection.recv(100)


# -- restarts -------------------------------------------------------------------------------------


def node_view(daemon: Daemon) -> dict[str, object]:
    """What the kubelet sees of every pod and container: ids, states, addresses, log paths."""
    rt = daemon.runtime
    pods = rt.ListPodSandbox(cri.ListPodSandboxRequest()).items
    containers = rt.ListContainers(cri.ListContainersRequest()).containers
    return {
        "pods": {
            p.id: (
                p.metadata.name,
                p.state,
                rt.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=p.id)).status.network.ip,
            )
            for p in pods
        },
        "containers": {
            c.id: (
                c.pod_sandbox_id,
                c.metadata.name,
                c.state,
                rt.ContainerStatus(cri.ContainerStatusRequest(container_id=c.id)).status.log_path,
            )
            for c in containers
        },
    }


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_a_restart_keeps_every_pod_and_container_with_its_address(node: Daemon, tmp_path: Path, how: str) -> None:
    trigger = tmp_path / "trigger"
    trigger.mkdir()
    gate = [cri.Mount(container_path="/trigger", host_path=str(trigger))]
    pods = [Pod(node, tmp_path / name, name=name, uid=f"uid-{name}") for name in ("a", "b")]
    servers, jobs = {}, {}
    for number, pod in enumerate(pods):
        servers[pod.id] = pod.run("server", ["nc", "-ll", "-p", "8080", "-e", "echo", f"pod-{number}"])
        # Exits when the test says so: while shimhub is down.
        waiting = f"until [ -e /trigger/go ]; do sleep 0.1; done; echo finished-{number}; exit {3 + number}"
        jobs[pod.id] = pod.run("job", ["sh", "-c", waiting], mounts=gate)
    addresses = {pod.id: pod_ip(pod) for pod in pods}
    for number, pod in enumerate(pods):
        assert wait_for(lambda ip=addresses[pod.id]: _answers(ip), 30) == f"pod-{number}\n".encode()
    before = node_view(node)

    if how == "sigterm":
        assert node.stop() == 0, node.log()
    else:
        node.kill()
    down_at = time.time_ns()
    (trigger / "go").touch()
    for pod in pods:
        wait_for(lambda p=pod: "finished" in p.output("job"), 20)
    # The output comes a moment before the exit, which is what the finish time records.
    wait_for(
        lambda: not [p for p in psutil.process_iter(["cmdline"]) if "/trigger/go" in " ".join(p.info["cmdline"] or [])],
        20,
    )
    up_at = time.time_ns()
    node.start()

    after = node_view(node)
    assert after["pods"] == before["pods"], "the same pods, states and addresses"
    for container_id, (pod_id, name, state, log_path) in before["containers"].items():
        now = after["containers"][container_id]
        expected = cri.CONTAINER_EXITED if name == "job" else state
        assert now == (pod_id, name, expected, log_path)
    for number, pod in enumerate(pods):
        status = pod.status(jobs[pod.id])
        assert status.exit_code == 3 + number, "the real exit code of a container that exited while shimhub was down"
        # the exit file's time comes from the kernel's coarse clock, a tick behind time.time_ns() at most
        assert down_at - COARSE_TICK <= status.finished_at <= up_at, "its real finish time"
        assert pod.lines("job") == [f"finished-{number}"]
        assert pod.status(servers[pod.id]).state == cri.CONTAINER_RUNNING
        assert answer(addresses[pod.id], 8080) == f"pod-{number}\n".encode(), "still serving on the same address"
        shown = pod.rt.ExecSync(
            cri.ExecSyncRequest(container_id=servers[pod.id], cmd=["ip", "-o", "-4", "addr"], timeout=10)
        )
        assert f"inet {addresses[pod.id]}/" in shown.stdout.decode()


def _answers(ip: str) -> bytes:
    try:
        return answer(ip, 8080)
    except OSError:
        return b""


# -- crashes inside RPCs --------------------------------------------------------------------------

CRASH_POINTS = [
    "run_pod:saved",
    "run_pod:network",
    "run_pod:sandbox",
    "create_container:saved",
    "create_container:rootfs",
    "create_container:runtime",
    "pull:blob",
    "pull:layer",
    "remove_pod:containers",
    "remove_pod:runtime",
    "remove_pod:network",
]


def records(daemon: Daemon, kind: str) -> set[str]:
    """Ids of the records the daemon has on disk (`kind`: sandboxes or containers)."""
    return {path.stem for path in (daemon.root / "state" / kind).glob("*.json")}


def traces(ids: set[str]) -> list[str]:
    """Mounts, processes, cgroups and network namespaces that name one of `ids` (or its short form)."""
    names = {i for full in ids for i in (full, full[:12], full[:20])}
    found = [m.mount_point for m in mountinfo.mounts() if any(n in m.mount_point for n in names)]
    for process in psutil.process_iter(["cmdline", "status"]):
        command = " ".join(process.info["cmdline"] or [])
        if process.info["status"] != psutil.STATUS_ZOMBIE and any(n in command for n in names):
            found.append(command)
    for place in [*Path("/sys/fs/cgroup").glob("*/shimhub/*"), *netns.NETNS_DIR.glob("*")]:
        if any(n in place.name for n in names):
            found.append(str(place))
    return found


def crash_during(daemon: Daemon, call: Callable[[], object]) -> None:
    """`call` must kill the daemon at its crash point: the client sees the connection drop."""
    with pytest.raises(grpc.RpcError) as dropped:
        call()
    assert dropped.value.code() == grpc.StatusCode.UNAVAILABLE, dropped.value.details()
    assert daemon.proc is not None and daemon.proc.wait(10) == -9, daemon.log()[-2000:]


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_a_crash_inside_an_rpc_is_rolled_back_or_finished(
    daemon_factory, registry, network: Network, tmp_path: Path, point: str
) -> None:
    daemon = daemon_factory(node_config(network, registry), env={"SHIMHUB_CRASH_AT": point}).start()
    rpc = point.partition(":")[0]
    config = pod_config(log_directory=str(tmp_path / "logs"))
    run_pod = cri.RunPodSandboxRequest(config=config)
    container = cri.CreateContainerRequest(
        config=cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name="c"),
            image=cri.ImageSpec(image=BUSYBOX),
            command=["sh", "-c", "echo made-it; sleep 600"],
            log_path="c.log",
        ),
        sandbox_config=config,
    )
    pull = cri.PullImageRequest(image=cri.ImageSpec(image=OTHER_IMAGE))
    if rpc != "pull":
        daemon.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=BUSYBOX)), timeout=120)
    if rpc in ("create_container", "remove_pod"):
        container.pod_sandbox_id = daemon.runtime.RunPodSandbox(run_pod).pod_sandbox_id
    if rpc == "remove_pod":
        started = daemon.runtime.CreateContainer(container).container_id
        daemon.runtime.StartContainer(cri.StartContainerRequest(container_id=started))

    crash_during(
        daemon,
        {
            "run_pod": lambda: daemon.runtime.RunPodSandbox(run_pod),
            "create_container": lambda: daemon.runtime.CreateContainer(container),
            "pull": lambda: daemon.images.PullImage(pull, timeout=120),
            "remove_pod": lambda: daemon.runtime.RemovePodSandbox(
                cri.RemovePodSandboxRequest(pod_sandbox_id=container.pod_sandbox_id)
            ),
        }[rpc],
    )
    half_made = records(daemon, "containers") if rpc == "create_container" else records(daemon, "sandboxes")
    if rpc != "pull":
        assert half_made, f"the crash at {point} left no record to recover from"
    daemon.env.pop("SHIMHUB_CRASH_AT")
    daemon.start()
    rt, images = daemon.runtime, daemon.images

    assert records(daemon, "sandboxes") | records(daemon, "containers") <= {container.pod_sandbox_id}
    assert not traces(half_made), f"after a crash at {point}, the half-made object left {traces(half_made)}"
    assert leftovers(daemon.root, half_made, half_made).get("temporary files") is None
    if rpc == "run_pod":
        assert rt.ListPodSandbox(cri.ListPodSandboxRequest()).items == []
        assert network.allocations() == [], "the rolled-back pod's address is free again"
        retried = rt.RunPodSandbox(run_pod).pod_sandbox_id  # the name is free again
        status = rt.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=retried)).status
        assert status.state == cri.SANDBOX_READY and status.network.ip.startswith(f"10.231.{network.octet}.")
    elif rpc == "create_container":
        assert rt.ListContainers(cri.ListContainersRequest()).containers == []
        retried = rt.CreateContainer(container).container_id
        rt.StartContainer(cri.StartContainerRequest(container_id=retried))
        assert wait_for(
            lambda: (tmp_path / "logs" / "c.log").exists() and "made-it" in (tmp_path / "logs" / "c.log").read_text(),
            20,
        )
    elif rpc == "pull":
        assert [i.repo_tags for i in images.ListImages(cri.ListImagesRequest()).images] == [], "no half-pulled image"
        assert_image_store_empty(daemon, "overlay")
        pulled = images.PullImage(pull, timeout=120).image_ref
        assert images.ImageStatus(cri.ImageStatusRequest(image=cri.ImageSpec(image=OTHER_IMAGE))).image.id == pulled
    else:
        assert rt.ListPodSandbox(cri.ListPodSandboxRequest()).items == [], "the removal was finished"
        assert rt.ListContainers(cri.ListContainersRequest()).containers == []
        assert network.allocations() == []
        assert leftovers(daemon.root, half_made, set(), daemon.before) == {}
    assert "Traceback" not in daemon.log().split("killing shimhub")[-1], "recovery went without an error"


# -- concurrency ----------------------------------------------------------------------------------

CLIENTS = 20
CHURN_SECONDS = 40.0
PULLERS = 6


class Churn:
    """Counts of what the clients did, and every error they got, in one place."""

    def __init__(self, daemon: Daemon, logs: Path) -> None:
        self.socket = f"unix:{daemon.socket}"
        self.logs = logs
        self.deadline = time.monotonic() + CHURN_SECONDS
        self.lock = threading.Lock()
        self.ops: Counter[str] = Counter()
        self.errors: list[str] = []
        self.list_seconds: list[float] = []

    def count(self, op: str) -> None:
        with self.lock:
            self.ops[op] += 1

    def failed(self, who: str, exc: BaseException) -> None:
        detail = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.RpcError) else repr(exc)
        with self.lock:
            self.errors.append(f"{who}: {detail}")

    def client(self, who: str, body: Callable[[api_pb2_grpc.RuntimeServiceStub], None]) -> None:
        """Run `body` with a connection of its own until the deadline; record what goes wrong."""
        with grpc.insecure_channel(self.socket) as channel:
            rt = api_pb2_grpc.RuntimeServiceStub(channel)
            try:
                while time.monotonic() < self.deadline:
                    body(rt)
            except Exception as exc:  # noqa: BLE001 - every failure is reported by the test
                self.failed(who, exc)

    def pod_churner(self, number: int) -> Callable[[api_pb2_grpc.RuntimeServiceStub], None]:
        """Run a pod with a container, exec into it, stop and remove it; again."""
        rounds = iter(range(10**6))

        def body(rt: api_pb2_grpc.RuntimeServiceStub) -> None:
            name = f"churn-{number}-{next(rounds)}"
            config = pod_config(name=name, uid=name, log_directory=str(self.logs / name))
            pod_id = rt.RunPodSandbox(cri.RunPodSandboxRequest(config=config), timeout=120).pod_sandbox_id
            self.count("RunPodSandbox")
            ip = rt.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id)).status.network.ip
            assert ip, f"pod {name} got no address"
            container = cri.ContainerConfig(
                metadata=cri.ContainerMetadata(name="main"),
                image=cri.ImageSpec(image=BUSYBOX),
                command=["sleep", "600"],
                log_path="main.log",
            )
            request = cri.CreateContainerRequest(pod_sandbox_id=pod_id, config=container, sandbox_config=config)
            container_id = rt.CreateContainer(request, timeout=120).container_id
            rt.StartContainer(cri.StartContainerRequest(container_id=container_id), timeout=120)
            self.count("CreateContainer+StartContainer")
            done = rt.ExecSync(cri.ExecSyncRequest(container_id=container_id, cmd=["echo", name], timeout=20))
            assert done.stdout == f"{name}\n".encode(), f"ExecSync in {name} said {done.stdout!r}"
            self.count("ExecSync")
            rt.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=120)
            rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=120)
            self.count("StopPodSandbox+RemovePodSandbox")

        return body

    def container_churner(self, number: int, pod_id: str, config: cri.PodSandboxConfig) -> Callable:
        """In one long-lived pod: create, start, wait for the exit code, remove; again."""
        rounds = iter(range(10**6))

        def body(rt: api_pb2_grpc.RuntimeServiceStub) -> None:
            round_number = next(rounds)
            code = round_number % 7
            container = cri.ContainerConfig(
                metadata=cri.ContainerMetadata(name=f"job-{round_number}"),
                image=cri.ImageSpec(image=BUSYBOX),
                command=["sh", "-c", f"exit {code}"],
            )
            request = cri.CreateContainerRequest(pod_sandbox_id=pod_id, config=container, sandbox_config=config)
            container_id = rt.CreateContainer(request, timeout=120).container_id
            rt.StartContainer(cri.StartContainerRequest(container_id=container_id), timeout=120)
            self.count("CreateContainer+StartContainer")

            def exited() -> cri.ContainerStatus | None:
                status = rt.ContainerStatus(cri.ContainerStatusRequest(container_id=container_id)).status
                return status if status.state == cri.CONTAINER_EXITED else None

            status = wait_for(exited, 60, 0.1)
            assert status.exit_code == code, f"client {number}: exit code {status.exit_code}, not {code}"
            listed = rt.ListContainers(
                cri.ListContainersRequest(filter=cri.ContainerFilter(pod_sandbox_id=pod_id))
            ).containers
            assert container_id in {c.id for c in listed}
            rt.RemoveContainer(cri.RemoveContainerRequest(container_id=container_id), timeout=120)
            self.count("RemoveContainer")

        return body

    def lister(self, rt: api_pb2_grpc.RuntimeServiceStub) -> None:
        """The kubelet's relist: every pod and container, with stats."""
        started = time.monotonic()
        rt.ListPodSandbox(cri.ListPodSandboxRequest())
        rt.ListContainers(cri.ListContainersRequest())
        rt.ListContainerStats(cri.ListContainerStatsRequest())
        with self.lock:
            self.list_seconds.append(time.monotonic() - started)
        self.count("relist")
        time.sleep(0.2)


def test_twenty_clients_churning_pods_containers_and_pulls(node: Daemon, network: Network, tmp_path: Path) -> None:
    churn = Churn(node, tmp_path / "logs")
    long_lived = []
    for number in range(CLIENTS // 2, CLIENTS):
        pod = Pod(node, tmp_path / f"home-{number}", name=f"home-{number}", uid=f"home-{number}")
        long_lived.append((number, pod))
    workers = [
        threading.Thread(target=churn.client, args=(f"pods-{n}", churn.pod_churner(n))) for n in range(CLIENTS // 2)
    ]
    workers += [
        threading.Thread(target=churn.client, args=(f"containers-{n}", churn.container_churner(n, pod.id, pod.config)))
        for n, pod in long_lived
    ]
    workers.append(threading.Thread(target=churn.client, args=("relist", churn.lister)))
    pulled: list[str] = []

    def pull() -> None:
        with grpc.insecure_channel(churn.socket) as channel:
            try:
                request = cri.PullImageRequest(image=cri.ImageSpec(image=OTHER_IMAGE))
                pulled.append(api_pb2_grpc.ImageServiceStub(channel).PullImage(request, timeout=120).image_ref)
                churn.count("PullImage")
            except grpc.RpcError as exc:
                churn.failed("puller", exc)

    workers += [threading.Thread(target=pull) for _ in range(PULLERS)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(CHURN_SECONDS + 300)
    assert not any(worker.is_alive() for worker in workers), "a client hung"

    listing = sorted(churn.list_seconds)
    print(
        f"\n{CLIENTS} clients for {CHURN_SECONDS:.0f} s: {dict(churn.ops)}; "
        f"relist p50 {listing[len(listing) // 2] * 1e3:.0f} ms, max {listing[-1] * 1e3:.0f} ms"
    )
    assert churn.errors == []
    assert len(set(pulled)) == 1 and len(pulled) == PULLERS, "concurrent pulls of one image agree on it"
    assert churn.ops["RunPodSandbox"] >= CLIENTS // 2 and churn.ops["RemoveContainer"] >= CLIENTS // 2
    remaining = {p.metadata.name for p in node.runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items}
    assert remaining == {pod.config.metadata.name for _, pod in long_lived}, "every churned pod was removed"
    assert node.remove_everything() == {}
    assert network.allocations() == []
    ingest = node.root / "state" / "images" / "content" / "ingest"
    assert not ingest.exists() or os.listdir(ingest) == []

"""Stats, metrics and the container event stream, on real runc containers and a real CNI network."""

from __future__ import annotations

import json
import queue
import re
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shimhub.testing.daemon import Pod, wait_for
from shimhub_proto.cri.v1 import api_pb2 as cri
from tests.conftest import NEEDS_ROOT, Network
from tests.test_runc import exec_sync, runc_config, security

pytestmark = NEEDS_ROOT


@pytest.fixture
def cni_node(daemon_factory, registry, tmp_path: Path):
    network = Network(tmp_path / "net")
    network.conflist()
    cni = network.daemon_config().split("[network]", 1)[1]
    daemon = daemon_factory(runc_config(registry).replace('[network]\nbackend = "host"\n', f"[network]{cni}")).start()
    daemon.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image="test/busybox:1")))
    yield daemon
    network.cleanup()


def container_stats(node, container_id: str) -> cri.ContainerStats:
    return node.runtime.ContainerStats(cri.ContainerStatsRequest(container_id=container_id)).stats


def test_cpu_memory_processes_and_writable_layer(cni_node, tmp_path: Path) -> None:
    pod = Pod(cni_node, tmp_path)
    burner = pod.run("burner", ["sh", "-c", "while :; do :; done"])
    hog = pod.run(
        "hog",
        ["sh", "-c", "dd if=/dev/zero of=/dev/shm/fill bs=1M count=50 2>/dev/null; sleep 1; echo x > /big; sleep 300"],
        linux=security(run_as_user=cri.Int64Value(value=0)),
    )
    first = container_stats(cni_node, burner)
    time.sleep(1.0)
    second = container_stats(cni_node, burner)
    assert second.attributes.id == burner and second.attributes.metadata.name == "burner"
    assert second.cpu.usage_core_nano_seconds.value > first.cpu.usage_core_nano_seconds.value + 3 * 10**8
    assert second.cpu.usage_nano_cores.value > 3 * 10**8  # a busy loop: a good part of one core per second

    def fifty_megabytes() -> cri.ContainerStats | None:
        stats = container_stats(cni_node, hog)
        return stats if stats.memory.working_set_bytes.value >= 50 * 2**20 else None

    memory = wait_for(fifty_megabytes, timeout=20).memory  # /dev/shm is charged to the container's memory
    assert memory.usage_bytes.value >= memory.working_set_bytes.value
    assert memory.page_faults.value > 0
    layer = wait_for(lambda: (s := container_stats(cni_node, hog)).writable_layer.used_bytes.value > 0 and s)
    assert layer.writable_layer.inodes_used.value >= 1
    assert layer.writable_layer.fs_id.mountpoint

    listed = cni_node.runtime.ListContainerStats(
        cri.ListContainerStatsRequest(filter=cri.ContainerStatsFilter(pod_sandbox_id=pod.id))
    ).stats
    assert sorted(s.attributes.id for s in listed) == sorted([burner, hog])
    only = cni_node.runtime.ListContainerStats(
        cri.ListContainerStatsRequest(filter=cri.ContainerStatsFilter(id=hog[:12]))
    ).stats
    assert [s.attributes.id for s in only] == [hog]

    pod_stats = cni_node.runtime.PodSandboxStats(cri.PodSandboxStatsRequest(pod_sandbox_id=pod.id)).stats
    assert pod_stats.attributes.id == pod.id
    assert sorted(c.attributes.id for c in pod_stats.linux.containers) == sorted([burner, hog])
    assert pod_stats.linux.process.process_count.value >= 2  # the busy shell, and the sleep the other shell became
    assert pod_stats.linux.memory.working_set_bytes.value >= 50 * 2**20
    streamed = [
        s
        for part in cni_node.runtime.StreamPodSandboxStats(cri.StreamPodSandboxStatsRequest())
        for s in part.pod_sandbox_stats
    ]
    assert [s.attributes.id for s in streamed] == [pod.id]

    cni_node.runtime.RemoveContainer(cri.RemoveContainerRequest(container_id=hog))
    with pytest.raises(grpc.RpcError) as gone:
        container_stats(cni_node, hog)
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND


#: cAdvisor's container metrics that the upstream CRI validation suite requires of ListPodSandboxMetrics.
REQUIRED_METRICS = (
    "container_blkio_device_usage_total", "container_cpu_cfs_periods_total",
    "container_cpu_cfs_throttled_periods_total",
    "container_cpu_cfs_throttled_seconds_total", "container_cpu_system_seconds_total",
    "container_cpu_usage_seconds_total", "container_cpu_user_seconds_total", "container_file_descriptors",
    "container_fs_inodes_free", "container_fs_inodes_total", "container_fs_limit_bytes",
    "container_fs_reads_bytes_total", "container_fs_reads_total", "container_fs_usage_bytes",
    "container_fs_writes_bytes_total", "container_fs_writes_total", "container_last_seen", "container_memory_cache",
    "container_memory_failcnt", "container_memory_failures_total", "container_memory_kernel_usage",
    "container_memory_mapped_file", "container_memory_max_usage_bytes", "container_memory_rss",
    "container_memory_swap", "container_memory_usage_bytes", "container_memory_working_set_bytes",
    "container_network_receive_bytes_total", "container_network_receive_errors_total",
    "container_network_receive_packets_dropped_total", "container_network_receive_packets_total",
    "container_network_transmit_bytes_total", "container_network_transmit_errors_total",
    "container_network_transmit_packets_dropped_total", "container_network_transmit_packets_total",
    "container_oom_events_total", "container_processes", "container_sockets", "container_spec_cpu_period",
    "container_spec_cpu_shares", "container_spec_memory_limit_bytes", "container_spec_memory_swap_limit_bytes",
    "container_start_time_seconds", "container_threads", "container_threads_max",
)  # fmt: skip


#: Series that exist only where the node's cgroups count block I/O per device.
BLOCK_IO_METRICS = {
    "container_blkio_device_usage_total",
    "container_fs_reads_bytes_total",
    "container_fs_reads_total",
    "container_fs_writes_bytes_total",
    "container_fs_writes_total",
}


def _node_accounts_block_io() -> bool:
    """Whether a cgroup here sees the direct writes of its process (this node's cgroup v1 blkio counts nothing
    unless a throttle limit is set; cAdvisor reads the same files and serves no series either)."""
    probe = Path("/sys/fs/cgroup/blkio/shimhub-io-probe")
    if not probe.parent.exists():
        return (
            Path("/sys/fs/cgroup/cgroup.controllers").exists()
            and "io" in Path("/sys/fs/cgroup/cgroup.controllers").read_text().split()
        )
    probe.mkdir(exist_ok=True)
    target = Path(tempfile.mkdtemp()) / "probe"
    try:
        subprocess.run(
            ["sh", "-c", f"echo $$ > {probe}/cgroup.procs; exec dd if=/dev/zero of={target} bs=4096 count=16 "
             "oflag=direct"],
            capture_output=True, check=True,
        )  # fmt: skip
        return (probe / "blkio.throttle.io_service_bytes_recursive").read_text().strip() != "Total 0"
    finally:
        target.unlink(missing_ok=True)
        target.parent.rmdir()
        probe.rmdir()


def test_pod_network_traffic_and_metrics(cni_node, tmp_path: Path) -> None:
    server = Pod(cni_node, tmp_path / "server", name="server", uid="server")
    pod = Pod(cni_node, tmp_path / "client", name="client", uid="client")
    server.run("sender", ["nc", "-ll", "-p", "8080", "-e", "dd", "if=/dev/zero", "bs=1000", "count=100"])
    limits = cri.LinuxContainerResources(
        cpu_period=100000, cpu_quota=50000, cpu_shares=512, memory_limit_in_bytes=64 << 20,
        memory_swap_limit_in_bytes=64 << 20,
    )  # fmt: skip
    talker = pod.run("talker", ["sleep", "300"], linux=cri.LinuxContainerConfig(resources=limits))
    address = cni_node.runtime.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=server.id)).status
    before = cni_node.runtime.PodSandboxStats(cri.PodSandboxStatsRequest(pod_sandbox_id=pod.id)).stats.linux.network
    assert before.default_interface.name == "eth0"
    fetch = f"nc -w 2 {address.network.ip} 8080 | wc -c"
    assert wait_for(lambda: exec_sync(pod, talker, "sh", "-c", fetch).stdout.strip() == b"100000")
    after = cni_node.runtime.PodSandboxStats(cri.PodSandboxStatsRequest(pod_sandbox_id=pod.id)).stats.linux.network
    assert after.default_interface.rx_bytes.value - before.default_interface.rx_bytes.value >= 100_000
    assert after.default_interface.tx_bytes.value > before.default_interface.tx_bytes.value
    sent = cni_node.runtime.PodSandboxStats(cri.PodSandboxStatsRequest(pod_sandbox_id=server.id)).stats.linux.network
    assert sent.default_interface.tx_bytes.value >= 100_000

    descriptors = cni_node.runtime.ListMetricDescriptors(cri.ListMetricDescriptorsRequest()).descriptors
    names = {d.name for d in descriptors}
    assert {"container_cpu_usage_seconds_total", "container_memory_working_set_bytes"} <= names
    assert "container_network_receive_bytes_total" in names
    metrics = cni_node.runtime.ListPodSandboxMetrics(cri.ListPodSandboxMetricsRequest()).pod_metrics
    [ours] = [m for m in metrics if m.pod_sandbox_id == pod.id]
    received = [m for m in ours.metrics if m.name == "container_network_receive_bytes_total"]
    eth0 = next(m for m in received if m.label_values[-1] == "eth0")
    assert eth0.value.value >= after.default_interface.rx_bytes.value
    keys = next(d for d in descriptors if d.name == eth0.name).label_keys
    assert len(keys) == len(eth0.label_values)
    [container] = ours.container_metrics
    working_set = next(m for m in container.metrics if m.name == "container_memory_working_set_bytes")
    assert working_set.metric_type == cri.GAUGE and working_set.value.value > 0
    assert dict(zip(keys, working_set.label_values, strict=False))["container"] == "talker"

    # Every name the upstream validation suite requires is described and served, with cAdvisor's label keys.
    assert set(REQUIRED_METRICS) <= names, sorted(set(REQUIRED_METRICS) - names)
    exec_sync(pod, talker, "sh", "-c", "dd if=/dev/zero of=/direct bs=4096 count=64 oflag=direct 2>/dev/null; sync")
    served = cni_node.runtime.ListPodSandboxMetrics(cri.ListPodSandboxMetricsRequest()).pod_metrics
    [ours] = [m for m in served if m.pod_sandbox_id == pod.id]
    series = [*ours.metrics, *ours.container_metrics[0].metrics]
    by_name = {d.name: d for d in descriptors}
    for metric in series:
        assert len(metric.label_values) == len(by_name[metric.name].label_keys), metric.name
    required = set(REQUIRED_METRICS) - (set() if _node_accounts_block_io() else BLOCK_IO_METRICS)
    assert required <= {m.name for m in series}, sorted(required - {m.name for m in series})
    streamed = [
        m
        for part in cni_node.runtime.StreamPodSandboxMetrics(cri.StreamPodSandboxMetricsRequest())
        for m in part.pod_sandbox_metrics
    ]
    assert {m.pod_sandbox_id for m in streamed} == {server.id, pod.id}
    limit = next(m for m in ours.container_metrics[0].metrics if m.name == "container_spec_cpu_shares")
    assert limit.value.value == 512


def test_event_stream_sees_a_containers_life_in_order(cni_node, tmp_path: Path) -> None:
    received: queue.Queue[cri.ContainerEventResponse] = queue.Queue()
    streams = [cni_node.runtime.GetContainerEvents(cri.GetEventsRequest()) for _ in range(2)]

    def drain(stream, into: list) -> None:
        try:
            for event in stream:
                into.append(event)
                received.put(event)
        except grpc.RpcError:
            pass  # cancelled at the end of the test

    seen: list[list[cri.ContainerEventResponse]] = [[], []]
    readers = [threading.Thread(target=drain, args=(s, seen[i]), daemon=True) for i, s in enumerate(streams)]
    for reader in readers:
        reader.start()
    time.sleep(0.5)  # the subscriptions are in place
    pod = Pod(cni_node, tmp_path)
    short = pod.run("short", ["sh", "-c", "sleep 1; exit 4"])  # exits on its own: nobody asks for its status
    wait_for(lambda: len(seen[0]) >= 3 and len(seen[1]) >= 3, timeout=15)
    cni_node.runtime.RemoveContainer(cri.RemoveContainerRequest(container_id=short))
    wait_for(lambda: len(seen[0]) >= 4 and len(seen[1]) >= 4, timeout=10)
    for stream in streams:
        stream.cancel()
    for events in seen:
        assert [e.container_event_type for e in events] == [
            cri.CONTAINER_CREATED_EVENT,
            cri.CONTAINER_STARTED_EVENT,
            cri.CONTAINER_STOPPED_EVENT,
            cri.CONTAINER_DELETED_EVENT,
        ]
        assert {e.container_id for e in events} == {short}
        assert all(e.pod_sandbox_status.id == pod.id for e in events)
        stopped = events[2].containers_statuses
        assert [(s.id, s.state, s.exit_code) for s in stopped] == [(short, cri.CONTAINER_EXITED, 4)]
        assert events[3].containers_statuses == []
        assert [e.created_at for e in events] == sorted(e.created_at for e in events)


def test_metrics_endpoint_status_and_inspect(daemon_factory, registry, tmp_path: Path) -> None:
    node = daemon_factory('metrics_address = "127.0.0.1:0"\n' + runc_config(registry)).start()
    address = re.search(r"serving metrics on http://([\d.]+:\d+)/metrics", node.log()).group(1)
    node.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image="test/busybox:1")))
    for _ in range(3):
        node.runtime.Version(cri.VersionRequest())
    for _ in range(2):
        with pytest.raises(grpc.RpcError):
            node.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id="no-such-container"))
    pod = Pod(node, tmp_path)
    secret = cri.KeyValue(key="PASSWORD", value="hunter2")
    container_id = pod.run("sleeper", ["sleep", "300"], envs=[secret])

    def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as answer:
            text = answer.read().decode()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    samples = scrape()
    calls = "shimhub_grpc_requests_total"
    assert samples[(calls, (("code", "OK"), ("method", "RuntimeService/Version")))] == 3
    assert samples[(calls, (("code", "NOT_FOUND"), ("method", "RuntimeService/ContainerStatus")))] == 2
    assert samples[("shimhub_grpc_request_duration_seconds_count", (("method", "RuntimeService/Version"),))] == 3
    assert samples[("shimhub_image_pull_duration_seconds_count", ())] == 1
    assert samples[("shimhub_image_pull_bytes_total", ())] > 0
    assert samples[("shimhub_pods", (("handler", "runc"), ("state", "ready")))] == 1
    assert samples[("shimhub_containers", (("handler", "runc"), ("state", "running")))] == 1
    hook = ("hook", "runtime_container_create"), ("kind", "runtime"), ("plugin", "runc")
    assert samples[("shimhub_plugin_call_duration_seconds_count", hook)] == 1

    # Records (the environment with its secrets) are never served to whoever reaches the port.
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"http://{address}/inspect/{container_id[:10]}", timeout=5)
    assert missing.value.code == 404 and b"PASSWORD" not in missing.value.read()

    shown = node.command("inspect", "--config", str(node.config_path), pod.id[:12])
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["record"]["handler"] == "runc"
    status = node.command("status", "--config", str(node.config_path))
    assert json.loads(status.stdout)["conditions"]["RuntimeReady"]["ready"] is True
    unknown = node.command("inspect", "--config", str(node.config_path), "feedfacefeedface")
    assert unknown.returncode != 0 and "NOT_FOUND" in unknown.stderr


def test_the_metrics_endpoint_bounds_idle_connections(daemon_factory, registry) -> None:
    """1000 idle sockets once exhausted the daemon's file descriptors: now they are closed, the CRI unharmed."""
    node = daemon_factory('metrics_address = "127.0.0.1:0"\n' + runc_config(registry)).start()
    host, port = re.search(r"serving metrics on http://([\d.]+):(\d+)/metrics", node.log()).groups()
    idle = []
    try:
        for _ in range(300):
            idle.append(socket.create_connection((host, int(port)), timeout=5))
        daemon = psutil.Process(node.proc.pid)
        wait_for(lambda: daemon.num_fds() < 200, timeout=20)  # the ones past the limit are closed at once
        assert node.runtime.Version(cri.VersionRequest(), timeout=5).runtime_name == "shimhub"
    finally:
        for sock in idle:
            sock.close()
    with urllib.request.urlopen(f"http://{host}:{port}/status", timeout=15) as answer:
        assert "handlers" in json.load(answer)

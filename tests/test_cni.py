"""The CNI backend on the real plugin binaries: addresses, reachability, hostPorts, errors, cleanup."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from shimhub import netns
from shimhub.testing.daemon import pod_config, wait_for
from shimhub_proto.cri.v1 import api_pb2 as cri
from tests.conftest import NEEDS_ROOT

pytestmark = [
    NEEDS_ROOT,
    pytest.mark.skipif(
        not os.path.exists("/usr/lib/cni/bridge"), reason="containernetworking-plugins is not installed"
    ),
]


def run_pod(rt, name: str, **fields: object) -> str:
    return rt.RunPodSandbox(
        cri.RunPodSandboxRequest(config=pod_config(name=name, uid=f"uid-{name}", **fields))
    ).pod_sandbox_id


def serve(rt, pod_id: str, port: int, reply: str) -> str:
    """A container in the pod answering `reply` to every connection on `port`."""
    config = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="server"),
        command=["busybox", "nc", "-ll", "-p", str(port), "-e", "echo", reply],
    )
    container_id = rt.CreateContainer(cri.CreateContainerRequest(pod_sandbox_id=pod_id, config=config)).container_id
    rt.StartContainer(cri.StartContainerRequest(container_id=container_id))
    return container_id


def ips(rt, pod_id: str) -> list[str]:
    status = rt.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id)).status.network
    return [status.ip, *(extra.ip for extra in status.additional_ips)]


def test_pods_get_distinct_addresses_and_reach_each_other(daemon_factory, network) -> None:
    network.conflist()
    rt = daemon_factory(network.daemon_config()).start().runtime
    server_pod, client_pod = run_pod(rt, "server"), run_pod(rt, "client")
    server_ips, client_ips = ips(rt, server_pod), ips(rt, client_pod)
    assert server_ips[0].startswith(f"10.231.{network.octet}.") and ":" in server_ips[1]
    assert client_ips[0].startswith(f"10.231.{network.octet}.") and client_ips[0] != server_ips[0]
    serve(rt, server_pod, 8080, "hello-from-server")
    client = serve(rt, client_pod, 9090, "unused")
    reply = wait_for(
        lambda: (
            rt.ExecSync(
                cri.ExecSyncRequest(
                    container_id=client, cmd=["busybox", "nc", "-w", "2", server_ips[0], "8080"], timeout=5
                )
            ).stdout
        )
    )
    assert reply == b"hello-from-server\n"
    assert len(network.allocations()) == 4  # one IPv4 and one IPv6 address per pod
    for pod_id in (server_pod, client_pod):
        rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    assert network.allocations() == []


def test_host_port_is_reachable_on_loopback(daemon_factory, network) -> None:
    network.conflist()
    rt = daemon_factory(network.daemon_config()).start().runtime
    host_port = 20000 + secrets.randbelow(20000)
    mapping = cri.PortMapping(protocol=cri.TCP, container_port=8080, host_port=host_port, host_ip="127.0.0.1")
    pod_id = run_pod(rt, "web", port_mappings=[mapping])
    serve(rt, pod_id, 8080, "through-the-host-port")

    def fetch() -> bytes:
        try:
            with socket.create_connection(("127.0.0.1", host_port), timeout=2) as conn:
                return conn.recv(100)
        except OSError:
            return b""

    assert wait_for(fetch) == b"through-the-host-port\n"
    rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    rules = subprocess.run(["iptables-save", "-t", "nat"], capture_output=True, text=True, check=True).stdout
    assert str(host_port) not in rules
    assert pod_id not in rules


def test_no_config_then_config_picked_up_without_restart(daemon_factory, network) -> None:
    rt = daemon_factory(network.daemon_config()).start().runtime

    def network_ready() -> cri.RuntimeCondition:
        return next(c for c in rt.Status(cri.StatusRequest()).status.conditions if c.type == "NetworkReady")

    assert not network_ready().status
    assert network_ready().message == f"network backend 'cni': no network config in {network.conf_dir}"
    with pytest.raises(grpc.RpcError) as refused:
        run_pod(rt, "early")
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    network.conflist("00-broken.conflist", plugins=[])
    assert "00-broken.conflist: 'plugins' must be a non-empty list" in network_ready().message
    network.conflist("10-good.conflist")
    assert wait_for(lambda: network_ready().status)
    assert ips(rt, run_pod(rt, "later"))[0].startswith(f"10.231.{network.octet}.")


def test_missing_plugin_and_plugin_error_leave_nothing(daemon_factory, network) -> None:
    network.conflist(plugins=[{"type": "no-such-cni-plugin"}])
    rt = daemon_factory(network.daemon_config()).start().runtime
    ready = next(c for c in rt.Status(cri.StatusRequest()).status.conditions if c.type == "NetworkReady")
    assert "needs CNI plugin(s) no-such-cni-plugin, not found in /usr/lib/cni" in ready.message
    network.conflist(
        plugins=[
            {
                "type": "bridge",
                "bridge": network.bridge,
                "ipam": {"type": "host-local", "dataDir": str(network.ipam), "ranges": [[{"subnet": "not-a-subnet"}]]},
            }
        ]
    )
    time.sleep(0.01)
    with pytest.raises(grpc.RpcError) as failed:
        run_pod(rt, "broken")
    assert failed.value.code() == grpc.StatusCode.INTERNAL
    assert "CNI plugin bridge ADD failed" in failed.value.details()
    assert "not-a-subnet" in failed.value.details()
    assert rt.ListPodSandbox(cri.ListPodSandboxRequest()).items == []
    assert network.allocations() == []


def test_teardown_after_a_restart(daemon_factory, network) -> None:
    network.conflist()
    daemon = daemon_factory(network.daemon_config()).start()
    pod_id = run_pod(daemon.runtime, "survivor")
    assert len(network.allocations()) == 2
    daemon.kill()
    daemon.start()
    daemon.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    assert network.allocations() == []
    assert not Path(netns.pod_path(pod_id)).exists()
    daemon.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod_id))  # idempotent


def test_a_hundred_pods_leave_nothing_behind(daemon_factory, network) -> None:
    network.conflist()
    rt = daemon_factory(network.daemon_config()).start().runtime
    started = time.monotonic()
    pod_ids = [run_pod(rt, f"p{i}") for i in range(100)]
    assert len({ips(rt, p)[0] for p in pod_ids}) == 100
    for pod_id in pod_ids:
        rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    took = time.monotonic() - started
    assert network.allocations() == []
    assert not set(os.listdir(netns.NETNS_DIR)) & {netns.pod_name(p) for p in pod_ids}
    links = subprocess.run(
        ["ip", "-o", "link", "show", "master", network.bridge], capture_output=True, text=True, check=True
    ).stdout
    assert links == ""
    rules = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout
    assert not any(p in rules for p in pod_ids)
    print(f"100 pods created and removed in {took:.1f} s")

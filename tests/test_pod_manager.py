"""The pod manager's lifecycle policy, in process, against a fake runtime and network: no root, no daemon."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shimhub.config import Config
from shimhub.containers import ContainerManager
from shimhub.errors import InvalidArgument, PluginFailed
from shimhub.extensions import Extensions
from shimhub.hooktypes import PodNetwork
from shimhub.locks import KeyedLocks
from shimhub.names import NameRegistry
from shimhub.pods import PodManager
from shimhub.records import SANDBOX_NOTREADY, SANDBOX_READY
from shimhub.state import StateStore
from shimhub.testing.daemon import pod_config
from shimhub_proto.cri.v1 import api_pb2 as cri

pytestmark = pytest.mark.unit


class FakePlugin:
    """A runtime or network plugin facade that logs each hook it is called with; `failing` hooks raise."""

    #: Pinning a pod's namespaces needs root: the facade stands for a runtime of API 1.x, which sets its
    #: pods up itself (the core's part is tested with real runtimes).
    builds_own_spec = True

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls
        self.failing: set[str] = set()

    def implements(self, hook: str) -> bool:
        return True

    def takes(self, hook: str, argument: str) -> bool:
        return False

    def call(self, hook: str, **kwargs: Any) -> Any:
        self.calls.append(hook)
        if hook in self.failing:
            raise PluginFailed(f"{hook} failed")
        if hook == "network_pod_setup":
            return PodNetwork(netns_path="/run/netns/fake", ips=["10.0.0.2"])
        return None

    def require(self) -> FakePlugin:
        return self

    def installed(self) -> FakePlugin:
        return self


class FakeHandler:
    name = "fake"

    def __init__(self, plugin: FakePlugin) -> None:
        self.backend = type("Backend", (), {"plugin": plugin})()
        self._plugin = plugin

    def require(self) -> FakePlugin:
        return self._plugin

    def installed(self) -> FakePlugin:
        return self._plugin

    def allowed_annotations(self, annotations: dict[str, str]) -> dict[str, str]:
        return {}


class FakeNode:
    """Real store, locks and name registries; a fake handler and network backend sharing one call log."""

    def __init__(self, root: Path) -> None:
        self.calls: list[str] = []
        self.events: list[str] = []
        self.runtime = FakePlugin(self.calls)
        self.network = FakePlugin(self.calls)
        handler = FakeHandler(self.runtime)
        self.handlers = type(
            "Handlers", (), {"get": lambda _self, name: handler, "select": lambda _self, *a: handler}
        )()
        self.store = StateStore(root)
        self.locks = KeyedLocks()
        self.pod_names = NameRegistry("pod sandbox")
        self.container_names = NameRegistry("container")
        self.config = Config()
        self.extensions = Extensions([])

    def emit(self, event: str, sandbox: Any, container: Any = None) -> None:
        self.events.append(event)


@pytest.fixture
def node(tmp_path: Path) -> FakeNode:
    return FakeNode(tmp_path)


def _pods(node: FakeNode) -> PodManager:
    return PodManager(node, ContainerManager(node))  # type: ignore[arg-type]


def _host_network() -> cri.LinuxPodSandboxConfig:
    options = cri.NamespaceOption(network=cri.NODE)
    return cri.LinuxPodSandboxConfig(security_context=cri.LinuxSandboxSecurityContext(namespace_options=options))


def test_a_pod_gets_its_network_then_its_sandbox_and_a_retry_gets_the_same_pod(node: FakeNode) -> None:
    pods = _pods(node)
    first = pods.run(pod_config(), "", "digest-1", None)
    assert node.calls == ["network_pod_setup", "runtime_sandbox_run"]
    record = node.store.sandbox(first)
    assert (record.state, record.network.ips, node.events) == (SANDBOX_READY, ["10.0.0.2"], ["sandbox_ready"])
    assert pods.run(pod_config(), "", "digest-1", None) == first, "the kubelet's retry of the same request"
    assert node.calls == ["network_pod_setup", "runtime_sandbox_run"]


def test_a_failed_sandbox_is_rolled_back_and_its_name_freed(node: FakeNode) -> None:
    pods = _pods(node)
    node.runtime.failing = {"runtime_sandbox_run"}
    with pytest.raises(PluginFailed, match="runtime_sandbox_run failed"):
        pods.run(pod_config(), "", "digest-1", None)
    assert node.calls == ["network_pod_setup", "runtime_sandbox_run", "runtime_sandbox_remove", "network_pod_teardown"]
    assert node.store.sandboxes() == []
    node.runtime.failing = set()
    assert pods.run(pod_config(), "", "digest-2", None), "the name is free for the next attempt"


def test_stop_then_remove_release_the_network_once_and_announce_each_step(node: FakeNode) -> None:
    pods = _pods(node)
    pod_id = pods.run(pod_config(), "", "digest-1", None)
    node.calls.clear()
    pods.stop(pod_id)
    pods.stop(pod_id)  # the kubelet stops again before removing
    assert node.store.sandbox(pod_id).state == SANDBOX_NOTREADY
    pods.remove(pod_id)
    pods.remove(pod_id)
    assert node.calls == [
        "runtime_sandbox_stop",
        "network_pod_teardown",
        "runtime_sandbox_stop",
        "runtime_sandbox_remove",
    ]
    assert node.events == ["sandbox_ready", "sandbox_stopped", "sandbox_removed"]
    assert node.store.sandboxes() == []


def test_a_host_network_pod_never_calls_the_network_backend(node: FakeNode) -> None:
    pods = _pods(node)
    pod_id = pods.run(pod_config(linux=_host_network()), "", "digest-1", None)
    pods.remove(pod_id)
    assert node.calls == ["runtime_sandbox_run", "runtime_sandbox_stop", "runtime_sandbox_remove"]


def test_a_slice_parent_on_a_cgroupfs_node_is_refused_before_anything_is_made(node: FakeNode) -> None:
    linux = cri.LinuxPodSandboxConfig(cgroup_parent="kubepods-burstable-pod1.slice")
    with pytest.raises(InvalidArgument, match="is a systemd slice name"):
        _pods(node).run(pod_config(linux=linux), "", "digest-1", None)
    assert (node.calls, node.store.sandboxes()) == ([], [])


def test_a_pod_a_runtime_of_api_1_set_up_is_adopted_as_it_was() -> None:
    from shimhub.oci.pod import adopted

    namespaces = {"network": "/run/netns/n", "ipc": "/x/ipc", "uts": "/x/uts", "pid": ""}
    kept = {"dir": "/old/pods/abc", "hostname": "web", "shm": "/x/shm", "namespaces": namespaces, "infra_pid": 42}
    pod = adopted(kept)
    assert pod is not None
    assert (pod.dir, pod.hostname, pod.shm, pod.infra_pid) == (kept["dir"], "web", "/x/shm", 42)
    assert pod.namespaces == kept["namespaces"]
    assert adopted({"dir": ""}) is None and adopted(None) is None  # type: ignore[arg-type]

"""NRI: plugins that shimhub starts and plugins that connect to its socket, speaking NRI's protocol.

The plugin is `shimhub.testing.nri_plugin`, which writes NRI's framing itself;
its configuration file (``<index>-<name>.conf``) says what it does.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from shimhub.testing.daemon import Daemon, Pod, wait_for
from shimhub_proto.cri.v1 import api_pb2 as cri
from tests.conftest import NEEDS_ROOT
from tests.test_runc import exec_sync, runc_config

pytestmark = NEEDS_ROOT
IMAGE = "test/busybox:1"


class NriNode:
    """A daemon with NRI enabled, its plugin directories under `root`."""

    def __init__(self, daemon_factory, registry, root: Path, extra: str = "", request_timeout: float = 1.0) -> None:
        self.root = root
        self.plugins = root / "plugins"
        self.configs = root / "conf.d"
        self.socket = root / "nri.sock"
        for directory in (self.plugins, self.configs):
            directory.mkdir(parents=True)
        self.settings = (
            f'[nri]\nenable = true\nsocket = "{self.socket}"\nplugin_path = "{self.plugins}"\n'
            f'plugin_config_path = "{self.configs}"\nrequest_timeout = {request_timeout}\n{extra}'
        )
        self.factory, self.registry = daemon_factory, registry
        self.daemon: Daemon | None = None
        self.external: list[subprocess.Popen[bytes]] = []

    def configure(self, index: str, name: str, **settings: Any) -> Path:
        """The plugin's configuration; its events file."""
        events = self.root / f"{index}-{name}.events"
        settings.setdefault("events_file", str(events))
        (self.configs / f"{index}-{name}.conf").write_text(json.dumps(settings))
        return events

    def install(self, index: str, name: str) -> None:
        """A plugin shimhub starts from its plugin directory."""
        program = self.plugins / f"{index}-{name}"
        program.write_text(f"#!/bin/sh\nexec {sys.executable} -m shimhub.testing.nri_plugin\n")
        program.chmod(0o755)

    def start(self) -> Daemon:
        self.daemon = self.factory(runc_config(self.registry, self.settings)).start()
        self.daemon.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=IMAGE)))
        return self.daemon

    def connect(self, index: str, name: str) -> None:
        """A plugin that connects to the socket itself; waits until shimhub has taken it."""
        process = subprocess.Popen([sys.executable, "-m", "shimhub.testing.nri_plugin", str(self.socket), name, index])
        self.external.append(process)
        wait_for(lambda: f"{index}-{name}" in self.plugin_names(), 20)

    def plugin_names(self) -> list[str]:
        assert self.daemon is not None
        info = json.loads(self.daemon.runtime.Status(cri.StatusRequest(verbose=True)).info["status"])
        return [f"{p['index']}-{p['name']}" for p in info["nri"]["plugins"]]

    def stop(self) -> None:
        for process in self.external:
            process.kill()
            process.wait()


@pytest.fixture
def nri_node(daemon_factory, shimhub_registry, tmp_path: Path):
    node = NriNode(daemon_factory, shimhub_registry, tmp_path / "nri")
    yield node
    node.stop()


def _calls(events: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in events.read_text().splitlines()] if events.exists() else []


def _spec(daemon: Daemon, container_id: str) -> dict[str, Any]:
    (found,) = daemon.root.glob(f"state/**/containers/{container_id}/config.json")  # the runc plugin's bundle
    return json.loads(found.read_text())


def test_a_started_plugin_adjusts_containers_and_follows_the_lifecycle(nri_node: NriNode, tmp_path: Path) -> None:
    shared = tmp_path / "from-the-plugin"
    shared.mkdir()
    (shared / "note").write_text("mounted by NRI\n")
    events = nri_node.configure("10", "adjuster", mode="adjust", mount_source=str(shared))
    nri_node.install("10", "adjuster")
    daemon = nri_node.start()
    assert nri_node.plugin_names() == ["10-adjuster"]
    pod = Pod(daemon, tmp_path / "pod")
    container = pod.run("app", ["sleep", "300"])
    assert b"NRI_ADDED=by-adjuster\n" in exec_sync(pod, container, "env").stdout
    assert exec_sync(pod, container, "cat", "/nri-mount/note").stdout == b"mounted by NRI\n"
    device = exec_sync(pod, container, "stat", "-c", "%F %t:%T", "/dev/nri-null").stdout
    assert device == b"character special file 1:3\n"
    assert exec_sync(pod, container, "sh", "-c", "echo gone > /dev/nri-null").exit_code == 0  # the cgroup allows it
    limit = exec_sync(pod, container, "cat", "/sys/fs/cgroup/memory/memory.limit_in_bytes").stdout
    assert limit == b"67108864\n"
    assert _spec(daemon, container)["annotations"]["nri.test/added"] == "adjuster"
    pod.rt.StopContainer(cri.StopContainerRequest(container_id=container, timeout=0))
    pod.rt.RemoveContainer(cri.RemoveContainerRequest(container_id=container))
    pod.rt.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod.id))
    pod.rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod.id))
    methods = [call["method"] for call in _calls(events)]
    expected = ["Configure", "Synchronize", "RunPodSandbox", "CreateContainer", "PostCreateContainer",
                "StartContainer", "PostStartContainer", "StopContainer", "StopPodSandbox"]  # fmt: skip
    assert [m for m in methods if m in expected][: len(expected)] == expected, methods
    wait_for(lambda: "RemovePodSandbox" in [c["method"] for c in _calls(events)], 10)
    created = next(c for c in _calls(events) if c["method"] == "CreateContainer")["request"]
    assert created["pod"]["id"] == pod.id and created["container"]["name"] == "app"
    assert created["container"]["args"] == ["sleep", "300"]


def test_a_connecting_plugin_is_synchronized_and_evicts(nri_node: NriNode, tmp_path: Path) -> None:
    daemon = nri_node.start()
    pod = Pod(daemon, tmp_path / "pod")
    victim = pod.run("victim", ["sleep", "300"])
    events = nri_node.configure("20", "evictor", mode="evict")
    nri_node.connect("20", "evictor")
    synchronized = next(c for c in _calls(events) if c["method"] == "Synchronize")["request"]
    assert [p["id"] for p in synchronized["pods"]] == [pod.id]
    assert [c["id"] for c in synchronized["containers"]] == [victim]
    pod.run("trigger", ["sleep", "300"])
    wait_for(lambda: pod.status(victim).state == cri.CONTAINER_EXITED, 20)
    assert "evicts container" in daemon.log() and "the trigger came" in daemon.log()


@pytest.mark.parametrize("mode", ["hang", "crash"])
def test_a_plugin_that_hangs_or_crashes_fails_the_container_within_its_timeout(
    nri_node: NriNode, tmp_path: Path, mode
) -> None:
    daemon = nri_node.start()
    nri_node.configure("30", mode, mode=mode)
    nri_node.connect("30", mode)
    pod = Pod(daemon, tmp_path / "pod")
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as failed:
        pod.create("app", ["sleep", "300"])  # request_timeout is 1 s
    assert time.monotonic() - started < 10
    expected = grpc.StatusCode.DEADLINE_EXCEEDED if mode == "hang" else grpc.StatusCode.UNAVAILABLE
    assert failed.value.code() == expected, failed.value.details()
    assert f"NRI plugin 30-{mode} did not answer CreateContainer" in failed.value.details()
    assert daemon.runtime.ListContainers(cri.ListContainersRequest()).containers == []
    assert nri_node.plugin_names() == []
    assert f"NRI: plugin 30-{mode} disconnected" in daemon.log()


def test_with_fail_open_a_hanging_plugin_is_left_out(daemon_factory, shimhub_registry, tmp_path) -> None:
    node = NriNode(daemon_factory, shimhub_registry, tmp_path / "nri", "fail_open = true\n")
    daemon = node.start()
    node.configure("30", "hang", mode="hang")
    node.connect("30", "hang")
    pod = Pod(daemon, tmp_path / "pod")
    container = pod.run("app", ["sleep", "300"])
    assert pod.status(container).state == cri.CONTAINER_RUNNING
    node.stop()


def test_a_node_state_of_5_mib_synchronizes_in_parts(daemon_factory, shimhub_registry, tmp_path) -> None:
    node = NriNode(daemon_factory, shimhub_registry, tmp_path / "nri")
    daemon = node.start()
    big = {"big": "x" * (200 << 10)}  # each list answer stays under the test client's 4 MiB
    for number in range(13):  # 13 pods and 13 containers of 200 KiB: 5.2 MiB of node state
        pod = Pod(daemon, tmp_path / f"pod{number}", name=f"pod{number}", uid=f"uid{number}", annotations=big)
        pod.create("app", ["sleep", "300"], annotations=big)
    events = node.configure("10", "late")
    node.connect("10", "late")
    parts = [c for c in _calls(events) if c["method"] == "Synchronize"]
    assert len(parts) >= 2, "5 MiB of node state in one message"
    assert [bool(c["request"].get("more")) for c in parts] == [True] * (len(parts) - 1) + [False]
    assert sum(len(c["request"].get("pods", [])) for c in parts) == 13
    assert sum(len(c["request"].get("containers", [])) for c in parts) == 13
    node.stop()


def test_an_adjustment_the_node_does_not_allow_fails_the_creation(daemon_factory, shimhub_registry, tmp_path) -> None:
    node = NriNode(daemon_factory, shimhub_registry, tmp_path / "nri", 'allowed_adjustments = ["env", "annotations"]\n')
    node.configure("10", "adjuster", mode="adjust", mount_source=str(tmp_path))
    node.install("10", "adjuster")
    daemon = node.start()
    pod = Pod(daemon, tmp_path / "pod")
    with pytest.raises(grpc.RpcError) as refused:
        pod.create("app", ["sleep", "300"])
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "NRI plugin 10-adjuster adjusts mounts, devices, resources" in refused.value.details()
    assert daemon.runtime.ListContainers(cri.ListContainersRequest()).containers == []


def test_a_pod_is_not_listed_while_a_plugin_handles_its_run_pod_sandbox(daemon_factory, shimhub_registry, tmp_path):
    node = NriNode(daemon_factory, shimhub_registry, tmp_path / "nri", request_timeout=10.0)
    node.configure("10", "slow", pod_delay=3)
    node.install("10", "slow")
    daemon = node.start()
    started = time.monotonic()
    running = threading.Thread(target=Pod, args=(daemon, tmp_path / "pod"))
    running.start()
    seen_before = []
    while running.is_alive() and time.monotonic() - started < 2.5:
        seen_before += daemon.runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items
        time.sleep(0.1)
    running.join(30)
    assert time.monotonic() - started >= 3, "RunPodSandbox answered before the plugin did"
    assert seen_before == [], "the pod was listed while the plugin handled RunPodSandbox"
    assert len(daemon.runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items) == 1


def test_a_plugin_that_fails_run_pod_sandbox_fails_the_pod(nri_node: NriNode, tmp_path: Path) -> None:
    nri_node.configure("10", "gate", pod_error="pods of this namespace are not admitted")
    nri_node.install("10", "gate")
    daemon = nri_node.start()
    with pytest.raises(grpc.RpcError) as refused:
        Pod(daemon, tmp_path / "pod")
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "NRI plugin 10-gate failed RunPodSandbox: pods of this namespace are not admitted" in refused.value.details()
    assert daemon.runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items == []
    assert daemon.remove_everything() == {}, "the refused pod left something behind"


def test_a_container_that_exits_at_once_is_started_before_it_is_stopped(nri_node: NriNode, tmp_path: Path) -> None:
    events = nri_node.configure("10", "observer")
    nri_node.install("10", "observer")
    daemon = nri_node.start()
    pod = Pod(daemon, tmp_path / "pod")
    container = pod.run("quick", ["false"])
    pod.wait_exit(container)
    wait_for(lambda: "StopContainer" in [c["method"] for c in _calls(events)], 10)
    methods = [c["method"] for c in _calls(events) if c["method"] in ("StartContainer", "StopContainer")]
    assert methods == ["StartContainer", "StopContainer"], methods

"""The conformance suite for runtime plugins: what the kubelet relies on, through a real shimhub.

Subclass `RuntimeConformance` in a test module, set `plugin` (and `options` for the
handler's options table), and run pytest. One daemon serves the whole class with
the plugin as its default handler, the built-in host network backend (each pod
its own loopback-only network namespace) and the overlay storage driver; each
test runs pods from the kit's busybox image and removes them, and anything left on
the node (processes, mounts, cgroups, namespaces, records) fails the test.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import grpc
import pytest
import tomli_w

from shimhub.testing.daemon import POD_TIMEOUT, Daemon, Pod, wait_for
from shimhub.testing.readiness import not_ready
from shimhub_proto.cri.v1 import api_pb2 as cri

#: A CRI log line: time, stream, tag, message.
CRI_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+(Z|[+-]\d\d:\d\d) (stdout|stderr) (F|P) (.*)$")


class RuntimeNode:
    """The class's daemon, and the pods the current test made on it."""

    def __init__(self, daemon: Daemon, directory: Path, handler: str) -> None:
        self.daemon = daemon
        self.directory = directory
        self.handler = handler
        self.pods: list[Pod] = []

    @property
    def rt(self) -> Any:
        return self.daemon.runtime

    def pod(self, name: str = "conformance") -> Pod:
        """A new pod on the handler under test."""
        uid = secrets.token_hex(6)  # a pod a failed test left behind must not be taken for this one
        pod = Pod(self.daemon, self.directory / uid, handler=self.handler, name=name, uid=uid)
        self.pods.append(pod)
        return pod


class RuntimeConformance:
    """The runtime plugin contract, checked against a real shimhub. Subclass and set `plugin`."""

    #: The plugin's entry point name (group ``shimhub.runtime``).
    plugin: ClassVar[str] = ""
    #: The handler's options table.
    options: ClassVar[dict[str, Any]] = {}
    #: Seconds a container may take to show its output or exit (a VM boots first).
    patience: ClassVar[float] = 30.0
    #: Top-level settings of the daemon's config, as TOML (e.g. 'cgroup_driver = "systemd"\n').
    settings: ClassVar[str] = ""

    @pytest.fixture(scope="class")
    def runtime_node(self, shimhub_registry: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RuntimeNode]:
        """A shimhub serving the plugin under test as handler "conformance", with the kit's image pulled."""
        if not self.plugin:
            pytest.fail(f"{type(self).__name__}: set `plugin` to the runtime plugin's entry point name")
        directory = tmp_path_factory.mktemp(f"runtime-{self.plugin}")
        handler = {"runtimes": {"conformance": {"plugin": self.plugin, "options": dict(self.options)}}}
        config = (
            f"{self.settings}"
            'default_runtime = "conformance"\n'
            f"{tomli_w.dumps(handler)}\n"
            '[network]\nbackend = "host"\n[storage]\ndriver = "overlay"\n'
            f"{shimhub_registry.config()}"
        )
        (directory / "node").mkdir()
        daemon = Daemon(directory / "node", config).start()
        try:
            ready = {c.type: c for c in daemon.runtime.Status(cri.StatusRequest()).status.conditions}["RuntimeReady"]
            if not ready.status:
                not_ready("runtime", self.plugin, ready.message)
            daemon.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image="test/busybox:1")), timeout=120)
            yield RuntimeNode(daemon, directory, "conformance")
        finally:
            daemon.stop()
            daemon.kill()

    @pytest.fixture
    def node(self, runtime_node: RuntimeNode) -> Iterator[RuntimeNode]:
        """The class's node; after the test its pods are removed and nothing may be left."""
        runtime_node.pods = []
        yield runtime_node
        left = runtime_node.daemon.remove_everything()
        assert not left, f"runtime_sandbox_remove / runtime_container_remove left things on the node: {left}"

    # -- pods ---------------------------------------------------------------------------------

    def test_pod_lifecycle(self, node: RuntimeNode) -> None:
        """runtime_sandbox_run, _stop and _remove: ready, not ready, gone."""
        pod = node.pod()
        status = node.rt.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod.id)).status
        assert (status.state, status.runtime_handler) == (cri.SANDBOX_READY, node.handler)
        node.rt.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod.id), timeout=POD_TIMEOUT)
        status = node.rt.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod.id)).status
        assert status.state == cri.SANDBOX_NOTREADY, "StopPodSandbox left the pod ready"
        node.rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod.id), timeout=POD_TIMEOUT)
        with pytest.raises(grpc.RpcError) as gone:
            node.rt.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod.id))
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND

    def test_forced_removal_of_a_pod_with_a_running_container(self, node: RuntimeNode) -> None:
        """StopPodSandbox then RemovePodSandbox while a container runs (`crictl rmp -f`, the kubelet's pod garbage
        collection): no process, mount, namespace or record of the pod may stay."""
        pod = node.pod()
        container = pod.run("server", ["sleep", "3600"])
        wait_for(lambda: pod.status(container).state == cri.CONTAINER_RUNNING, self.patience)
        node.rt.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod.id), timeout=POD_TIMEOUT)
        node.rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod.id), timeout=POD_TIMEOUT)
        left = node.daemon.remove_everything()
        assert not left, f"runtime_sandbox_stop + runtime_sandbox_remove with a running container left: {left}"

    # -- containers ---------------------------------------------------------------------------

    def test_output_lands_in_a_cri_log_and_the_exit_code_is_reported(self, node: RuntimeNode) -> None:
        """runtime_container_create/_start/_state: output in the kubelet's log format, exit code, times."""
        pod = node.pod()
        started_before = time.time_ns()
        container = pod.run("job", ["sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 7"])
        final = pod.wait_exit(container, self.patience)
        assert final.exit_code == 7, f"runtime_container_state reported exit code {final.exit_code}, not 7"
        assert final.reason == "Error", f"runtime_container_state: reason {final.reason!r} for exit code 7"
        assert started_before <= final.started_at <= final.finished_at, (
            f"runtime_container_state: started_at {final.started_at} / finished_at {final.finished_at} out of order"
        )
        lines = wait_for(lambda: len(pod.output("job").splitlines()) >= 2 and pod.output("job").splitlines())
        parsed = [CRI_LOG_LINE.match(line) for line in lines]
        assert all(parsed), f"runtime_container_start: log lines not in the CRI format: {lines}"
        assert sorted((m.group(2), m.group(4)) for m in parsed if m) == [
            ("stderr", "to-stderr"),
            ("stdout", "to-stdout"),
        ], f"runtime_container_start: log lines {lines}"

    def test_created_running_and_exited_states(self, node: RuntimeNode) -> None:
        """runtime_container_state and list calls: CREATED before start, RUNNING, then EXITED 0 "Completed"."""
        pod = node.pod()
        container = pod.create("waiter", ["sleep", "2"])
        assert pod.status(container).state == cri.CONTAINER_CREATED, "runtime_container_state before start"
        node.rt.StartContainer(cri.StartContainerRequest(container_id=container), timeout=POD_TIMEOUT)
        assert pod.status(container).state == cri.CONTAINER_RUNNING, "runtime_container_state right after start"
        running = node.rt.ListContainers(
            cri.ListContainersRequest(
                filter=cri.ContainerFilter(state=cri.ContainerStateValue(state=cri.CONTAINER_RUNNING))
            )
        ).containers
        assert [c.id for c in running] == [container], "runtime_container_states: list by state RUNNING"
        final = pod.wait_exit(container, self.patience)
        assert (final.exit_code, final.reason) == (0, "Completed")

    def test_stop_honours_the_signal_then_kills_after_the_timeout(self, node: RuntimeNode) -> None:
        """runtime_container_kill/_wait (or _stop): SIGTERM reaches it; one ignoring it dies after `timeout`."""
        pod = node.pod()
        polite = pod.run("polite", ["sh", "-c", "trap 'echo got-term; exit 0' TERM; while :; do sleep 0.1; done"])
        stubborn = pod.run("stubborn", ["sh", "-c", "trap '' TERM; while :; do sleep 0.1; done"])
        for container in (polite, stubborn):
            wait_for(lambda c=container: pod.status(c).state == cri.CONTAINER_RUNNING, self.patience)
        time.sleep(0.5)  # the shells have set their traps
        node.rt.StopContainer(cri.StopContainerRequest(container_id=polite, timeout=10), timeout=POD_TIMEOUT)
        status = pod.status(polite)
        assert (status.state, status.exit_code) == (cri.CONTAINER_EXITED, 0), (
            f"runtime_container_kill/_wait (or _stop): after SIGTERM the trap should exit 0, got state {status.state} "
            f"exit code {status.exit_code}"
        )
        wait_for(lambda: "got-term" in pod.output("polite"), 5)
        began = time.monotonic()
        node.rt.StopContainer(cri.StopContainerRequest(container_id=stubborn, timeout=1), timeout=POD_TIMEOUT)
        took = time.monotonic() - began
        status = pod.status(stubborn)
        assert status.state == cri.CONTAINER_EXITED, (
            f"StopContainer: a process ignoring SIGTERM still runs {took:.1f} s after StopContainer(timeout=1)"
        )
        assert status.exit_code == 137, (
            f"runtime_container_kill/_wait (or _stop): SIGKILLed process reported {status.exit_code}"
        )
        assert took < 1 + 10, f"StopContainer took {took:.1f} s with timeout=1"

    def test_exec_sync(self, node: RuntimeNode) -> None:
        """ExecSync through runtime_exec (or runtime_exec_sync): output, exit code, and the timeout, after which
        the command and what it started are gone."""
        pod = node.pod()
        container = pod.run("server", ["sleep", "3600"])
        wait_for(lambda: pod.status(container).state == cri.CONTAINER_RUNNING, self.patience)
        request = cri.ExecSyncRequest(container_id=container, cmd=["sh", "-c", "echo out; echo err >&2; exit 3"])
        try:
            answer = node.rt.ExecSync(request, timeout=POD_TIMEOUT)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                pytest.skip("the plugin has neither runtime_exec nor runtime_exec_sync (optional hooks)")
            raise
        assert (answer.stdout, answer.stderr, answer.exit_code) == (b"out\n", b"err\n", 3), (
            f"runtime_exec_sync answered {answer}"
        )
        slow_command = ["sh", "-c", "sleep 31; true"]  # sh waits for a child of its own
        with pytest.raises(grpc.RpcError) as slow:
            node.rt.ExecSync(cri.ExecSyncRequest(container_id=container, cmd=slow_command, timeout=1), timeout=60)
        assert slow.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, (
            f"ExecSync: a command over its timeout gave {slow.value.code()}, not DEADLINE_EXCEEDED"
        )
        processes = node.rt.ExecSync(cri.ExecSyncRequest(container_id=container, cmd=["ps"]), timeout=POD_TIMEOUT)
        assert b"sleep 31" not in processes.stdout, f"a timed-out ExecSync left its command:\n{processes.stdout}"

    def test_stats(self, node: RuntimeNode) -> None:
        """runtime_container_stats: the kubelet's stats come from the CRI, so CPU and memory must be there."""
        pod = node.pod()
        container = pod.run("busy", ["sh", "-c", "while :; do :; done"])
        wait_for(lambda: pod.status(container).state == cri.CONTAINER_RUNNING, self.patience)

        def cpu_used() -> cri.ContainerStats | None:
            stats = node.rt.ContainerStats(cri.ContainerStatsRequest(container_id=container)).stats
            return stats if stats.cpu.usage_core_nano_seconds.value > 0 else None

        try:
            stats = wait_for(cpu_used, self.patience)
        except AssertionError:
            pytest.fail("runtime_container_stats: no CPU usage reported for a container spinning on a CPU")
        assert stats.memory.working_set_bytes.value > 0, "runtime_container_stats: no memory working set"

    def test_removing_the_pod_removes_its_running_containers(self, node: RuntimeNode) -> None:
        """RemovePodSandbox stops and removes running containers through the plugin."""
        pod = node.pod()
        container = pod.run("server", ["sleep", "3600"])
        wait_for(lambda: pod.status(container).state == cri.CONTAINER_RUNNING, self.patience)
        node.rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod.id), timeout=POD_TIMEOUT)
        with pytest.raises(grpc.RpcError) as gone:
            pod.status(container)
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND

    @pytest.mark.parametrize("how", ["sigterm", "sigkill"])
    def test_containers_outlive_a_restart_of_shimhub(self, node: RuntimeNode, how: str) -> None:
        """runtime_recover: running containers keep running, one that exits meanwhile reports its exit code."""
        pod = node.pod()
        server = pod.run("server", ["sleep", "3600"])
        job = pod.run("job", ["sh", "-c", "sleep 3; echo done; exit 5"])
        for container in (server, job):
            wait_for(lambda c=container: pod.status(c).state == cri.CONTAINER_RUNNING, self.patience)
        node.daemon.restart(how)
        assert pod.status(server).state == cri.CONTAINER_RUNNING, f"runtime_recover: lost a running container ({how})"
        final = pod.wait_exit(job, self.patience)
        assert final.exit_code == 5, (
            f"runtime_container_state: a container that exited while shimhub was down ({how}) "
            f"reported exit code {final.exit_code}, not 5"
        )
        assert "done" in pod.output("job"), "runtime_recover: the output of the restart's time was lost"
        node.rt.StopContainer(cri.StopContainerRequest(container_id=server, timeout=1), timeout=POD_TIMEOUT)
        assert pod.status(server).state == cri.CONTAINER_EXITED, "StopContainer after a restart"

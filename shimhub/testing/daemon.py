"""Running a real shimhub daemon from the tests, and talking CRI to it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc

from shimhub.testing.leaks import NodeSnapshot, ids_in, leftovers
from shimhub_proto.cri.v1 import api_pb2 as cri
from shimhub_proto.cri.v1 import api_pb2_grpc

#: Seconds a daemon has to serve its socket (a node booted under emulation starts Python slowly).
START_TIMEOUT = 60.0
#: Seconds a pod or container start may take (VM pods boot a guest, under emulation on some nodes).
POD_TIMEOUT = 180.0
#: The image the kit's registry holds: the node's static busybox and its applets in /bin.
BUSYBOX = "test/busybox:1"
T = TypeVar("T")


class Daemon:
    """One `shimhub serve` process with its own config, socket and state under `root`."""

    def __init__(
        self,
        root: Path,
        config: str,
        python: str = sys.executable,
        env: dict[str, str] | None = None,
        log_level: str = "debug",
    ) -> None:
        self.root = root
        self.log_level = log_level
        self.python = python
        self.env = {**os.environ, **(env or {})}
        self.config_path = root / "shimhub.toml"
        self.socket = root / "run" / "shimhub.sock"
        self.log_path = root / "shimhub.log"
        self.write_config(config)
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: grpc.Channel | None = None
        #: The node before this daemon ran anything: what remove_everything compares with.
        self.before = NodeSnapshot()

    def write_config(self, text: str) -> None:
        """Write the main config file, and a last drop-in keeping socket and directories under `root`."""
        self.config_path.write_text(text)
        dropins = self.root / "shimhub.d"
        dropins.mkdir(exist_ok=True)
        (dropins / "99-test-paths.toml").write_text(
            f'socket = "{self.socket}"\n'
            f'state_dir = "{self.root / "state"}"\n'
            f'run_dir = "{self.root / "run"}"\n'
            f'log_level = "{self.log_level}"\n'
            f'[storage]\nroot = "{self.root / "storage"}"\n'
            f'[user_namespaces]\nmount_dir = "{self.root / "idmapped"}"\n'
        )

    def command(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run a `shimhub` sub-command with this daemon's config."""
        return subprocess.run(
            [self.python, "-m", "shimhub", *args], capture_output=True, text=True, env=self.env, timeout=30, check=False
        )

    def start(self) -> Daemon:
        """Start serving and wait until the socket answers."""
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [self.python, "-m", "shimhub", "serve", "--config", str(self.config_path)],
            stdout=log,
            stderr=log,
            env=self.env,
            cwd=self.root,  # nothing the daemon starts may write where it happens to run
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"shimhub exited with {self.proc.returncode}:\n{self.log()}")
            if self.socket.exists():
                self.channel = grpc.insecure_channel(f"unix:{self.socket}")
                try:
                    grpc.channel_ready_future(self.channel).result(timeout=2)
                    return self
                except grpc.FutureTimeoutError:
                    self.channel.close()
            time.sleep(0.05)
        raise RuntimeError(f"shimhub did not start serving:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def runtime(self) -> api_pb2_grpc.RuntimeServiceStub:
        assert self.channel is not None
        return api_pb2_grpc.RuntimeServiceStub(self.channel)

    @property
    def images(self) -> api_pb2_grpc.ImageServiceStub:
        assert self.channel is not None
        return api_pb2_grpc.ImageServiceStub(self.channel)

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait; return the exit code."""
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL, as a crash would, and wait."""
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self, how: str = "sigterm") -> Daemon:
        """Stop (gracefully with "sigterm", as a crash with "sigkill") and start again."""
        if how == "sigterm":
            code = self.stop()
            assert code == 0, f"shimhub exited with {code} on SIGTERM:\n{self.log()}"
        else:
            self.kill()
        return self.start()

    def remove_everything(self) -> dict[str, list[str]]:
        """Remove every pod through the CRI, as the kubelet would; return what is still on the node."""
        stopped = self.proc is None or self.proc.poll() is not None or self.channel is None
        if stopped:
            if not list((self.root / "state" / "sandboxes").glob("*.json")):
                return {}
            self.start()  # stopped with pods left: a restart must find them again
        sandboxes = {p.id for p in self.runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items}
        containers = {c.id for c in self.runtime.ListContainers(cri.ListContainersRequest()).containers}
        for sandbox_id in sandboxes:
            self.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=120)
        found = leftovers(self.root, sandboxes, containers, self.before, ids_in(self.log()))
        return {f"{self.root.name}: {kind}": items for kind, items in found.items()}


class Pod:
    """A pod on a running daemon, with helpers to run containers from an image in it.

    Logs go under `directory`/logs. Containers get their own PID namespace unless
    `linux` says otherwise, as the kubelet asks by default.
    """

    def __init__(self, daemon: Daemon, directory: Path, handler: str = "", image: str = BUSYBOX, **fields: Any) -> None:
        self.daemon = daemon
        self.image = image
        self.logs = directory / "logs"
        fields.setdefault(
            "linux",
            cri.LinuxPodSandboxConfig(
                security_context=cri.LinuxSandboxSecurityContext(
                    namespace_options=cri.NamespaceOption(pid=cri.CONTAINER)
                )
            ),
        )
        fields.setdefault("hostname", "podhost")
        self.config = pod_config(log_directory=str(self.logs), **fields)
        request = cri.RunPodSandboxRequest(config=self.config, runtime_handler=handler)
        self.id = self.rt.RunPodSandbox(request, timeout=POD_TIMEOUT).pod_sandbox_id

    @property
    def rt(self) -> api_pb2_grpc.RuntimeServiceStub:
        """The daemon's runtime service, on its current connection (it changes on restart)."""
        return self.daemon.runtime

    def create(self, name: str, command: list[str] | None = None, **fields: Any) -> str:
        """Create container `name` from the pod's image, logging to `name`.log."""
        fields.setdefault("metadata", cri.ContainerMetadata(name=name))
        fields.setdefault("log_path", f"{name}.log")
        config = cri.ContainerConfig(image=cri.ImageSpec(image=self.image), command=command or [], **fields)
        request = cri.CreateContainerRequest(pod_sandbox_id=self.id, config=config, sandbox_config=self.config)
        return self.rt.CreateContainer(request, timeout=POD_TIMEOUT).container_id

    def run(self, name: str, command: list[str] | None = None, **fields: Any) -> str:
        """Create and start container `name`."""
        container_id = self.create(name, command, **fields)
        self.rt.StartContainer(cri.StartContainerRequest(container_id=container_id), timeout=POD_TIMEOUT)
        return container_id

    def status(self, container_id: str) -> cri.ContainerStatus:
        return self.rt.ContainerStatus(cri.ContainerStatusRequest(container_id=container_id)).status

    def wait_exit(self, container_id: str, timeout: float = 20) -> cri.ContainerStatus:
        """The container's status once it has exited."""
        return wait_for(lambda: (s := self.status(container_id)).state == cri.CONTAINER_EXITED and s, timeout)

    def output(self, name: str) -> str:
        """Container `name`'s log file, as written."""
        return (self.logs / f"{name}.log").read_text()

    def lines(self, name: str) -> list[str]:
        """The log's messages, without the CRI timestamp/stream/tag prefix."""
        return [line.split(" ", 3)[3] for line in self.output(name).splitlines()]


def pod_config(name: str = "pod", uid: str = "uid-1", attempt: int = 0, **fields: object) -> cri.PodSandboxConfig:
    """A minimal PodSandboxConfig."""
    return cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=name, namespace="default", uid=uid, attempt=attempt), **fields
    )


def host_network() -> cri.LinuxPodSandboxConfig:
    """Linux pod config for a host-network pod."""
    return cri.LinuxPodSandboxConfig(
        security_context=cri.LinuxSandboxSecurityContext(namespace_options=cri.NamespaceOption(network=cri.NODE))
    )


def wait_for(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.05) -> T:
    """Poll `predicate` until it returns something truthy; return that, or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)

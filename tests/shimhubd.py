"""Running a real shimhub daemon from the tests, and talking CRI to it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc

from shimhub_proto.cri.v1 import api_pb2 as cri
from shimhub_proto.cri.v1 import api_pb2_grpc

START_TIMEOUT = 20.0


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
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


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


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05):
    """Poll `predicate` until it returns something truthy; return that, or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)

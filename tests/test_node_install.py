"""./install on a stock Debian node, as an operator runs it (inside the node `python3 -m tests.booted_node` boots).

Debian's python3 is the only interpreter on the install's PATH; the node has no network, so pip takes the
wheels `tests.booted_node` put beside it (PIP_NO_INDEX, PIP_FIND_LINKS), as an offline node would.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from shimhub.testing import KitRegistry
from shimhub.testing.daemon import BUSYBOX, wait_for
from shimhub_proto.cri.v1 import api_pb2 as cri
from shimhub_proto.cri.v1 import api_pb2_grpc as cri_grpc

ROOT = Path(__file__).resolve().parent.parent
SOCKET = Path("/run/shimhub/shimhub.sock")
PREFIX = Path("/opt/shimhub")
#: A stock node's own churn, and what the test run itself uses: not what ./install leaves. /run is systemd's
#: (shimhub's part of it is checked by itself); /var/lib/cni is the CNI plugins' own state (host-local's
#: reservations), /run/netns ip-netns's, as on any CNI node; /root/.cache holds per-user caches.
CHURN = (
    "/proc", "/sys", "/dev", "/tmp", "/var/tmp", "/var/log", "/var/lib/systemd", "/var/cache/ldconfig", "/host",
    "/run", "/var/lib/cni", "/root/.cache",
)  # fmt: skip

pytestmark = [
    pytest.mark.node,
    pytest.mark.slow,
    pytest.mark.skipif(not os.environ.get("SHIMHUB_NODE"), reason="installs onto the node: runs in tests.booted_node"),
    pytest.mark.skipif(not Path("/run/systemd/system").is_dir(), reason="systemd is not init here"),
]


def node_files() -> set[str]:
    """Every path on the node's root filesystem, but its own churn and /run's system parts."""
    found: set[str] = set()
    device = os.stat("/").st_dev
    for top, dirs, files in os.walk("/"):
        dirs[:] = [
            name
            for name in dirs
            if not (path := os.path.join(top, name)).startswith(CHURN)
            and os.lstat(path).st_dev == device
            and not path.startswith(str(ROOT))
        ]
        found.update(os.path.join(top, name) for name in dirs + files)
    return found


def install(checkout: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """./install from `checkout` with Debian's python3 alone on PATH (and pip's offline settings)."""
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "PIP_NO_INDEX": os.environ.get("PIP_NO_INDEX", ""),
        "PIP_FIND_LINKS": os.environ.get("PIP_FIND_LINKS", ""),
        "HOME": "/root",
    }
    done = subprocess.run(
        ["./install", *args], cwd=checkout, env=env, capture_output=True, text=True, timeout=1500, check=False
    )
    assert done.returncode == 0, f"./install {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done


def systemctl(*args: str) -> str:
    done = subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"systemctl {' '.join(args)}: {done.stderr}"
    return done.stdout


class Session:
    """What a crictl session does, over the installed unit's socket."""

    def __init__(self) -> None:
        wait_for(SOCKET.exists, timeout=120)
        self.channel = grpc.insecure_channel(f"unix://{SOCKET}")
        self.runtime = cri_grpc.RuntimeServiceStub(self.channel)
        self.images = cri_grpc.ImageServiceStub(self.channel)
        wait_for(self.ready, timeout=120)

    def ready(self) -> bool:
        try:
            conditions = self.runtime.Status(cri.StatusRequest(), timeout=10).status.conditions
        except grpc.RpcError:
            return False
        return all(condition.status for condition in conditions)

    def remove_pod(self, pod_id: str) -> None:
        self.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=120)
        self.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=120)

    def close(self) -> None:
        self.channel.close()


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A writable copy of the checkout, as an operator clones it."""
    copy = tmp_path / "shimhub"
    shutil.copytree(
        ROOT,
        copy,
        ignore=shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "build", ".*_cache", "*.pyc"),
        symlinks=True,
    )
    return copy


@pytest.fixture
def registry_dropin(shimhub_registry: KitRegistry) -> Iterator[Path]:
    """The operator's drop-in naming the loopback registry (plain HTTP)."""
    dropin = Path("/etc/shimhub/shimhub.d/50-registry.toml")
    yield dropin
    dropin.unlink(missing_ok=True)


def mount_points() -> set[str]:
    return {line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()}


def test_install_serve_a_crictl_session_upgrade_and_uninstall(
    checkout: Path, registry_dropin: Path, shimhub_registry: KitRegistry, tmp_path: Path
) -> None:
    before, mounted = node_files(), mount_points()

    done = install(checkout)
    assert os.readlink("/usr/local/bin/shimhub") == str(PREFIX / "bin" / "shimhub")
    assert f"ExecStart={PREFIX}/bin/shimhub serve" in Path("/etc/systemd/system/shimhub.service").read_text()
    assert "runtime-endpoint: unix:///run/shimhub/shimhub.sock" in Path("/etc/crictl.yaml").read_text()
    assert "shimhub installed: shimhub " in done.stdout
    venv_python = (PREFIX / "bin" / "python3").resolve()
    assert venv_python == Path("/usr/bin/python3").resolve(), "the environment is not Debian's python3"
    installed = subprocess.run(["du", "-sm", str(PREFIX)], capture_output=True, text=True, check=True).stdout
    print(f"./install: {installed.split()[0]} MiB in {PREFIX}")

    registry_dropin.parent.mkdir(parents=True, exist_ok=True)
    registry_dropin.write_text(shimhub_registry.config())
    systemctl("start", "shimhub.service")
    session = Session()
    logs = tmp_path / "logs"
    logs.mkdir()
    try:
        kept = _one_container(session, "before-upgrade", logs, keep=True)
    finally:
        session.close()

    # an upgrade over the running install: config and state stay, the pod is found again
    install(checkout)
    assert systemctl("is-active", "shimhub.service").strip() == "active"
    session = Session()
    try:
        listed = session.runtime.ListPodSandbox(cri.ListPodSandboxRequest(), timeout=30).items
        assert kept in [pod.id for pod in listed], "the pod made before the upgrade is gone"
        session.remove_pod(kept)
        _one_container(session, "after-upgrade", logs, keep=False)
        session.images.RemoveImage(cri.RemoveImageRequest(image=cri.ImageSpec(image=BUSYBOX)), timeout=60)
    finally:
        session.close()

    registry_dropin.unlink()
    install(checkout, "--uninstall", "--purge")
    assert not Path("/etc/systemd/system/shimhub.service").exists()
    shutil.rmtree(logs)
    assert mount_points() - mounted - {"/run/netns"} == set(), "mounts left"
    assert not Path("/run/shimhub").exists()
    left, gone = sorted(node_files() - before), sorted(before - node_files())
    assert (left, gone) == ([], []), f"./install --uninstall left {left[:20]} and took {gone[:20]}"


def _one_container(session: Session, name: str, logs: Path, *, keep: bool) -> str:
    """pull, runp, create, start, exec, logs, stop, rm: the pod's id (removed unless `keep`)."""
    session.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=BUSYBOX)), timeout=300)
    pod_logs = logs / name
    pod_logs.mkdir()
    # as the kubelet sends it: the pod's network from CNI, a PID namespace per container
    namespaces = cri.NamespaceOption(network=cri.POD, pid=cri.CONTAINER, ipc=cri.POD)
    pod_config = cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=name, uid=f"uid-{name}", namespace="install"),
        log_directory=str(pod_logs),
        linux=cri.LinuxPodSandboxConfig(security_context=cri.LinuxSandboxSecurityContext(namespace_options=namespaces)),
    )
    pod_id = session.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=pod_config), timeout=120).pod_sandbox_id
    container = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="app"),
        image=cri.ImageSpec(image=BUSYBOX),
        command=["sh", "-c", f"echo hello from {name}; exec sleep 300"],
        log_path="app.log",
    )
    request = cri.CreateContainerRequest(pod_sandbox_id=pod_id, config=container, sandbox_config=pod_config)
    container_id = session.runtime.CreateContainer(request, timeout=120).container_id
    session.runtime.StartContainer(cri.StartContainerRequest(container_id=container_id), timeout=120)
    answer = session.runtime.ExecSync(
        cri.ExecSyncRequest(container_id=container_id, cmd=["cat", "/proc/1/cmdline"], timeout=60), timeout=90
    )
    assert (answer.exit_code, answer.stdout.split(b"\0")[:2]) == (0, [b"sleep", b"300"])
    log = pod_logs / "app.log"
    deadline = time.monotonic() + 30
    while f"hello from {name}" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert f"stdout F hello from {name}" in log.read_text()
    session.runtime.StopContainer(cri.StopContainerRequest(container_id=container_id, timeout=10), timeout=60)
    status = session.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=container_id), timeout=30)
    assert status.status.state == cri.CONTAINER_EXITED
    session.runtime.RemoveContainer(cri.RemoveContainerRequest(container_id=container_id), timeout=60)
    if not keep:
        session.remove_pod(pod_id)
    return pod_id

"""Pods in user namespaces of their own (hostUsers: false), from the recorded kubelet requests.

The kubelet sends such a pod's mappings in userns_options (mode POD), in the
sandbox and again in every container; the recordings hold mode NODE pods, so the
tests set the mappings as the kubelet does for hostUsers: false (65536 ids, root
of the pod at a multiple of 65536) and change nothing else.
"""

from __future__ import annotations

import copy
import fcntl
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from shimhub import userns
from shimhub.testing.daemon import Pod, wait_for
from shimhub_proto.cri.v1 import api_pb2 as cri
from tests import test_kubelet_replay as replay
from tests.conftest import NEEDS_ROOT
from tests.test_kubelet_replay import IMAGE, Kubelet, recorded, runc_cni_config
from tests.test_runc import exec_sync, runc_config

pytestmark = [NEEDS_ROOT, pytest.mark.skipif(bool(userns.node_support()), reason=userns.node_support() or "ok")]
FIRST = 3 * 65536
SECOND = 4 * 65536
NS_GET_USERNS = 0xB701


kubelet_cgroups = replay.kubelet_cgroups  # the fixture, for the kubelet's pods


@pytest.fixture
def kubelet(request, daemon_factory, registry, network, tmp_path: Path) -> Kubelet:
    request.getfixturevalue("kubelet_cgroups")
    network.conflist()
    # as an operator running the upstream validation suite sets it: its mappings start at host id 1000
    daemon = daemon_factory(runc_cni_config(registry, network) + "[user_namespaces]\nfirst_host_id = 1000\n").start()
    daemon.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=IMAGE)))
    image_id = daemon.images.ImageStatus(cri.ImageStatusRequest(image=cri.ImageSpec(image=IMAGE))).image.id
    return Kubelet(daemon, tmp_path, image_id, registry.open.host)


@pytest.fixture
def node(daemon_factory, registry):
    daemon = daemon_factory(runc_config(registry)).start()
    daemon.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=IMAGE)))
    return daemon


@pytest.fixture(autouse=True)
def reachable(tmp_path: Path) -> None:
    """The test's directories searchable by others, as a node's /run is (pytest makes them 0700)."""
    for directory in [tmp_path, *tmp_path.parents]:
        if str(directory).startswith(tempfile.gettempdir() + "/"):
            directory.chmod(directory.stat().st_mode | 0o001)


def _userns(base: int, length: int = 65536) -> dict[str, Any]:
    mapping = [{"host_id": base, "container_id": 0, "length": length}]
    return {"mode": "POD", "uids": mapping, "gids": mapping}


def with_userns(call: dict[str, Any], base: int, length: int = 65536) -> dict[str, Any]:
    """A recorded call as the kubelet sends it for a pod with hostUsers: false."""
    moved = copy.deepcopy(call)
    config = moved["request"]["config"]
    security = config.setdefault("linux", {}).setdefault("security_context", {})
    security.setdefault("namespace_options", {})["userns_options"] = _userns(base, length)
    return moved


def _pid(kubelet: Kubelet, container_id: str) -> int:
    answer = kubelet.daemon.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=container_id, verbose=True))
    return int(json.loads(answer.info["info"])["runtime_data"]["pid"])


def _host_ids(pid: int) -> tuple[int, int]:
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(status["Uid"].split()[0]), int(status["Gid"].split()[0])


def _owner(namespace: str) -> int:
    """The inode of the user namespace that owns `namespace` (the NS_GET_USERNS ioctl)."""
    with open(namespace) as file:
        owner = fcntl.ioctl(file.fileno(), NS_GET_USERNS)
    try:
        return os.fstat(owner).st_ino
    finally:
        os.close(owner)


def _mounts(root: Path) -> list[str]:
    with open("/proc/self/mountinfo") as table:
        return [line.split()[4] for line in table if line.split()[4].startswith(str(root))]


def test_the_kubelets_pod_runs_with_root_mapped_and_files_owned_by_the_range(kubelet: Kubelet) -> None:
    features = kubelet.daemon.runtime.Status(cri.StatusRequest()).runtime_handlers
    assert all(handler.features.user_namespaces for handler in features if handler.name in ("", "runc"))
    calls = recorded("a")
    sandbox_id = kubelet.run_pod(with_userns(calls[0], FIRST))
    app = kubelet.create(with_userns(calls[1], FIRST), sandbox_id)
    sidecar = kubelet.create(with_userns(calls[2], FIRST), sandbox_id)
    # inside: the ids the pod asked for; outside: the same ids moved into the pod's range
    assert kubelet.exec(app, "id") == "uid=1000(app) gid=3000 groups=2000\n"
    assert kubelet.exec(app, "cat", "/proc/self/uid_map").split() == ["0", str(FIRST), "65536"]
    assert _host_ids(_pid(kubelet, app)) == (FIRST + 1000, FIRST + 3000)
    namespace = kubelet.exec(app, "readlink", "/proc/self/ns/user")
    assert kubelet.exec(sidecar, "readlink", "/proc/self/ns/user") == namespace
    assert namespace != os.readlink("/proc/self/ns/user") + "\n"
    assert kubelet.exec(app, "hostname") == "sc-a-burstable-node-1\n"
    # the image's files are root's inside, and the pod's root's outside
    assert kubelet.exec(app, "stat", "-c", "%u:%g", "/bin/busybox") == "0:0\n"
    assert os.stat(f"/proc/{_pid(kubelet, app)}/root/bin/busybox").st_uid == FIRST
    # what the container writes to its own filesystem is stored with its host ids
    kubelet.exec(sidecar, "sh", "-c", "echo mine > /tmp/written")
    upper = kubelet.daemon.root / "storage" / "overlay" / "containers" / sidecar / "upper"
    assert (os.stat(upper / "tmp" / "written").st_uid, os.stat(upper / "tmp" / "written").st_gid) == (
        FIRST + 1000,
        FIRST + 3000,
    )
    # a volume keeps its files' ids: what the kubelet made root's is root's inside, what the app writes is 1000's
    volume = Path(json.loads(json.dumps(kubelet.localize(calls[1]["request"])))["config"]["mounts"][0]["host_path"])
    kubelet.exec(app, "sh", "-c", "echo shared > /etc/app-config/from-app")
    assert (os.stat(volume / "from-app").st_uid, os.stat(volume / "from-app").st_gid) == (1000, 3000)
    assert kubelet.exec(sidecar, "cat", "/config/from-app") == "shared\n"
    assert kubelet.exec(app, "stat", "-c", "%u", "/etc/hosts") == "0\n"
    # the pod's network, IPC and UTS namespaces belong to its user namespace (so root of the pod has rights there)
    pid = _pid(kubelet, app)
    for kind in ("net", "ipc", "uts"):
        assert _owner(f"/proc/{pid}/ns/{kind}") == os.stat(f"/proc/{pid}/ns/user").st_ino, kind
    kubelet.teardown()
    assert not _mounts(kubelet.daemon.root / "idmapped")
    assert not list((kubelet.daemon.root / "run" / "userns").iterdir())


def test_a_pod_sharing_its_pid_namespace_with_the_validation_suites_mapping(kubelet: Kubelet) -> None:
    calls = recorded("d")
    sandbox_id = kubelet.run_pod(with_userns(calls[0], 1000, 100000))  # the upstream suite's: 0 1000 100000
    container = kubelet.create(with_userns(calls[1], 1000, 100000), sandbox_id)
    assert kubelet.exec(container, "cat", "/proc/self/uid_map").split() == ["0", "1000", "100000"]
    processes = kubelet.exec(container, "ps", "-o", "comm")
    assert "catatonit" in processes, processes
    kubelet.teardown()


def test_pods_with_other_ranges_cannot_touch_each_others_files(node, tmp_path: Path) -> None:
    first = Pod(node, tmp_path / "a", name="a", uid="uid-a", linux=_pod_linux(FIRST))
    root = _container_linux(FIRST)
    writer = first.run("writer", ["sleep", "300"], linux=root)
    assert exec_sync(first, writer, "sh", "-c", "umask 077; echo secret > /tmp/secret").exit_code == 0
    upper = node.root / "storage" / "overlay" / "containers" / writer / "upper" / "tmp"
    assert os.stat(upper / "secret").st_uid == FIRST
    second = Pod(node, tmp_path / "b", name="b", uid="uid-b", linux=_pod_linux(SECOND))
    reader = second.run(
        "reader",
        ["sleep", "300"],
        linux=_container_linux(SECOND),
        mounts=[cri.Mount(container_path="/other", host_path=str(upper))],
    )
    listed = exec_sync(second, reader, "stat", "-c", "%u", "/other/secret")
    assert listed.stdout == b"65534\n"  # an id outside the second pod's range: nobody
    refused = exec_sync(second, reader, "cat", "/other/secret")
    assert refused.exit_code != 0 and b"Permission denied" in refused.stderr
    refused = exec_sync(second, reader, "sh", "-c", "echo x > /other/secret")
    assert refused.exit_code != 0
    assert (upper / "secret").read_text() == "secret\n"


def _as_nobody(*argv: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv],
        check=False,
        capture_output=True,
        timeout=30,
    )


def test_local_users_cannot_reach_a_pods_files_through_the_mounts_they_see(node, tmp_path: Path) -> None:
    """Every mount point made for the container is in /proc/self/mountinfo, which anyone reads: none of
    them lets another local user read the pod's volume or write into its root filesystem."""
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "token").write_text("service-account-token\n")
    (secrets / "token").chmod(0o644)
    pod = Pod(node, tmp_path / "a", name="a", uid="uid-a", linux=_pod_linux(FIRST))
    container = pod.run(
        "app",
        ["sleep", "300"],
        linux=_container_linux(FIRST),
        mounts=[cri.Mount(container_path="/var/run/secrets", host_path=str(secrets))],
    )
    assert exec_sync(pod, container, "cat", "/var/run/secrets/token").stdout == b"service-account-token\n"
    made = [path for path in _mounts(node.root) if container in path]
    assert any(path.endswith("volume-0") for path in made) and any("rootfs-" in path for path in made), made
    for path in made:
        for argv in (["cat", f"{path}/token"], ["sh", "-c", f"echo planted > {path}/tmp/planted"]):
            tried = _as_nobody(*argv)
            assert tried.returncode != 0, (argv, tried.stdout)
            assert b"Permission denied" in tried.stderr, (argv, tried.stderr)
    assert exec_sync(pod, container, "ls", "/tmp").stdout == b""


def _pod_linux(base: int) -> cri.LinuxPodSandboxConfig:
    options = json_format.ParseDict({"pid": "CONTAINER", "userns_options": _userns(base)}, cri.NamespaceOption())
    return cri.LinuxPodSandboxConfig(security_context=cri.LinuxSandboxSecurityContext(namespace_options=options))


def _container_linux(base: int) -> cri.LinuxContainerConfig:
    options = json_format.ParseDict({"pid": "CONTAINER", "userns_options": _userns(base)}, cri.NamespaceOption())
    return cri.LinuxContainerConfig(
        security_context=cri.LinuxContainerSecurityContext(namespace_options=options, run_as_user=cri.Int64Value())
    )


@pytest.mark.parametrize(
    ("mapping", "why"),
    [
        ({"mode": "NODE", "uids": [{"host_id": FIRST, "container_id": 0, "length": 65536}]}, "takes no uid"),
        ({**_userns(FIRST), "uids": [{"host_id": 0, "container_id": 0, "length": 65536}]}, "outside the ids"),
        ({**_userns(FIRST), "gids": []}, "needs gid mappings"),
        (
            {
                **_userns(FIRST),
                "uids": [
                    {"host_id": FIRST, "container_id": 0, "length": 65536},
                    {"host_id": FIRST + 10, "container_id": 70000, "length": 10},
                ],
            },
            "overlap on the host side",
        ),
        ({**_userns(FIRST), "uids": [{"host_id": FIRST, "container_id": 1, "length": 10}]}, "leave root"),
        ({**_userns(FIRST), "mode": "TARGET"}, "mode TARGET is not supported"),
    ],
)
def test_mappings_are_checked(node, tmp_path: Path, mapping: dict[str, Any], why: str) -> None:
    options = json_format.ParseDict({"userns_options": mapping}, cri.NamespaceOption())
    linux = cri.LinuxPodSandboxConfig(security_context=cri.LinuxSandboxSecurityContext(namespace_options=options))
    with pytest.raises(grpc.RpcError) as refused:
        Pod(node, tmp_path, linux=linux)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert why in refused.value.details()
    assert not node.runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items


def test_a_host_network_pod_and_a_runtime_without_support_are_refused(node, tmp_path: Path) -> None:
    options = json_format.ParseDict({"network": "NODE", "userns_options": _userns(FIRST)}, cri.NamespaceOption())
    linux = cri.LinuxPodSandboxConfig(security_context=cri.LinuxSandboxSecurityContext(namespace_options=options))
    with pytest.raises(grpc.RpcError) as refused:
        Pod(node, tmp_path / "host", linux=linux)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cannot share the node's network namespace" in refused.value.details()
    with pytest.raises(grpc.RpcError) as unsupported:
        Pod(node, tmp_path / "runsc", handler="runsc", linux=_pod_linux(FIRST))  # runsc reports no features
    assert unsupported.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "'runsc' cannot run pods in user namespaces" in unsupported.value.details()
    assert wait_for(lambda: not node.runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items)

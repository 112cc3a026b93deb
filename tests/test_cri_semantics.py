"""What the CRI and its clients (the kubelet, the upstream validation suite) expect, on runc."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import threading
from pathlib import Path

import grpc
import pytest

from shimhub.testing.daemon import Pod, pod_config
from shimhub_proto.cri.v1 import api_pb2 as cri
from tests.conftest import NEEDS_ROOT
from tests.test_runc import exec_sync, runc_config, security

pytestmark = NEEDS_ROOT


@pytest.fixture
def node(daemon_factory, registry):
    daemon = daemon_factory(runc_config(registry)).start()
    daemon.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image="test/busybox:1")))
    return daemon


def test_a_pod_without_hostname_gets_the_nodes(node, tmp_path: Path) -> None:
    """An empty hostname means the node's, as in containerd and CRI-O, whatever the pod's name (~70 chars here)."""
    pod = Pod(node, tmp_path, hostname="")
    long_named = Pod(node, tmp_path / "long", name="p" * 70, hostname="")
    for each in (pod, long_named):
        container = each.run("c", ["sleep", "300"])
        assert exec_sync(each, container, "hostname").stdout.decode() == socket.gethostname() + "\n"


def test_a_hostname_is_set_by_the_system_call_not_a_command_line(node, tmp_path: Path) -> None:
    pod = Pod(node, tmp_path, hostname="--file=/etc/machine-id")
    container = pod.run("c", ["sleep", "300"])
    assert exec_sync(pod, container, "hostname").stdout == b"--file=/etc/machine-id\n"


@pytest.mark.parametrize(
    ("hostname", "why"), [("h" * 65, "at most 64"), ("two\nlines", "control characters"), ("a b", "white space")]
)
def test_a_hostname_the_kernel_or_etc_hosts_cannot_take_is_refused(node, tmp_path: Path, hostname, why) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        Pod(node, tmp_path, hostname=hostname)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "hostname" in refused.value.details() and why in refused.value.details()
    assert list(node.runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items) == []


def test_run_as_group_without_a_user_is_refused(node, tmp_path: Path) -> None:
    pod = Pod(node, tmp_path)
    with pytest.raises(grpc.RpcError) as refused:
        pod.create("c", ["id"], linux=security(run_as_group=cri.Int64Value(value=3000)))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "run_as_group" in refused.value.details()
    sandbox = cri.LinuxPodSandboxConfig(
        security_context=cri.LinuxSandboxSecurityContext(run_as_group=cri.Int64Value(value=3000))
    )
    with pytest.raises(grpc.RpcError) as refused:
        Pod(node, tmp_path / "other", name="other", linux=sandbox)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # with a user, the group applies
    with_user = pod.run(
        "ok", ["id"], linux=security(run_as_user=cri.Int64Value(value=1000), run_as_group=cri.Int64Value(value=3000))
    )
    pod.wait_exit(with_user)
    assert pod.lines("ok") == ["uid=1000(app) gid=3000"]


def test_a_failed_create_leaves_no_log_file(node, tmp_path: Path) -> None:
    """The kubelet counts a container's attempts from the log files it finds."""
    pod = Pod(node, tmp_path)
    with pytest.raises(grpc.RpcError):
        pod.create("broken", ["true"], working_dir="/srv/hello.txt")  # a file: runc cannot chdir there
    assert not (pod.logs / "broken.log").exists()
    assert list(node.runtime.ListContainers(cri.ListContainersRequest()).containers) == []
    # and the failure is in the log at the default level, with the method and the pod
    failed = [line for line in node.log().splitlines() if f"CreateContainer (pod sandbox {pod.id}) failed" in line]
    assert failed and all(" ERROR " in line or " WARNING " in line for line in failed), failed


def test_evented_restart_leads_to_the_new_attempt(node, tmp_path: Path) -> None:
    """With the evented PLEG the kubelet takes the first status with a container's name in the pod's statuses."""
    events: list[cri.ContainerEventResponse] = []
    stream = node.runtime.GetContainerEvents(cri.GetEventsRequest())

    def read() -> None:
        with contextlib.suppress(grpc.RpcError):  # CANCELLED when the test is done with the stream
            events.extend(stream)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    pod = Pod(node, tmp_path)
    first = pod.run("app", ["sh", "-c", "exit 1"], metadata=cri.ContainerMetadata(name="app", attempt=0))
    pod.wait_exit(first)
    second = pod.run("app", ["sleep", "300"], metadata=cri.ContainerMetadata(name="app", attempt=1), log_path="a1.log")
    status = node.runtime.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod.id))
    assert [s.id for s in status.containers_statuses] == [second, first]
    stream.cancel()
    reader.join(10)
    started = [e for e in events if e.container_id == second and e.container_event_type == cri.CONTAINER_STARTED_EVENT]
    assert started, [(e.container_id[:12], e.container_event_type) for e in events]
    first_named = next(s for s in started[-1].containers_statuses if s.metadata.name == "app")
    assert (first_named.id, first_named.state) == (second, cri.CONTAINER_RUNNING)


@pytest.fixture
def host_dir_with_submount(tmp_path: Path):
    """A host directory with a tmpfs mounted below it."""
    top = tmp_path / "volume"
    (top / "sub").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(top / "sub")], check=True)
    yield top
    subprocess.run(["umount", "-l", str(top / "sub")], check=True)


def test_recursive_read_only_mounts_are_advertised_and_really_recursive(
    host_dir_with_submount: Path, node, tmp_path: Path
) -> None:
    handlers = {h.name: h for h in node.runtime.Status(cri.StatusRequest()).runtime_handlers}
    assert handlers["runc"].features.recursive_read_only_mounts
    pod = Pod(node, tmp_path)
    root = cri.Int64Value(value=0)
    script = "touch /v/top 2>/dev/null || echo top-ro; touch /v/sub/x 2>/dev/null || echo sub-ro"
    plain = cri.Mount(container_path="/v", host_path=str(host_dir_with_submount), readonly=True)
    rro = cri.Mount(container_path="/v", host_path=str(host_dir_with_submount), readonly=True, recursive_read_only=True)
    only_top = pod.run("plain", ["sh", "-c", script], mounts=[plain], linux=security(run_as_user=root))
    both = pod.run("rro", ["sh", "-c", script], mounts=[rro], linux=security(run_as_user=root))
    pod.wait_exit(only_top)
    pod.wait_exit(both)
    assert pod.lines("plain") == ["top-ro"]  # a plain read-only bind leaves submounts writable
    assert pod.lines("rro") == ["top-ro", "sub-ro"]


@pytest.mark.parametrize(
    ("mount", "privileged", "why"),
    [
        (dict(readonly=False, recursive_read_only=True), False, "needs readonly"),
        (
            dict(readonly=True, recursive_read_only=True, propagation=cri.PROPAGATION_HOST_TO_CONTAINER),
            False,
            "needs propagation PROPAGATION_PRIVATE",
        ),
        (dict(propagation=cri.PROPAGATION_BIDIRECTIONAL), False, "only for privileged"),
        (dict(propagation=cri.PROPAGATION_BIDIRECTIONAL), True, "is not shared"),
        (dict(propagation=cri.PROPAGATION_HOST_TO_CONTAINER), False, "shared or slave"),
    ],
    ids=["rro-without-ro", "rro-with-propagation", "bidirectional-unprivileged", "bidirectional-private", "slave"],
)
def test_mount_combinations_the_cri_or_the_host_forbid_are_refused(node, tmp_path: Path, mount, privileged, why):
    host = tmp_path / "private"  # on the node's root filesystem, which is a private mount here
    host.mkdir()
    pod = Pod(node, tmp_path)
    with pytest.raises(grpc.RpcError) as refused:
        pod.create(
            "c",
            ["true"],
            mounts=[cri.Mount(container_path="/v", host_path=str(host), **mount)],
            linux=security(privileged=privileged),
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert why in refused.value.details()


def test_supplemental_groups_policy_merge_and_strict(daemon_factory, registry, tmp_path: Path) -> None:
    """Merge adds the image's groups of the user; Strict only the CRI's; ContainerStatus.user says which."""
    from shimhub.testing.layers import tar
    from shimhub.testing.registry import Pusher, busybox_layer

    Pusher(registry.open).image(
        "test/groups",
        "1",
        [
            busybox_layer(),
            tar(
                ("etc", "dir", None),
                ("etc/passwd", "file", "root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n"),
                ("etc/group", "file", "root:x:0:\napp:x:1000:\nextra:x:4000:app\n"),
            ),
        ],
        {"Cmd": ["id", "-G"]},
    )
    node = daemon_factory(runc_config(registry)).start()
    assert node.runtime.Status(cri.StatusRequest()).features.supplemental_groups_policy
    node.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image="test/groups:1")))
    pod = Pod(node, tmp_path, image="test/groups:1")
    user = cri.Int64Value(value=1000)
    merged = pod.run("merge", linux=security(run_as_user=user, supplemental_groups=[2000]))
    strict = pod.run(
        "strict",
        linux=security(run_as_user=user, supplemental_groups=[2000], supplemental_groups_policy=cri.Strict),
    )
    for container_id in (merged, strict):
        pod.wait_exit(container_id)
    assert pod.lines("merge") == ["1000 2000 4000"]
    assert pod.lines("strict") == ["1000 2000"]
    merged_user = pod.status(merged).user.linux
    assert (merged_user.uid, merged_user.gid, list(merged_user.supplemental_groups)) == (1000, 1000, [1000, 2000, 4000])
    assert list(pod.status(strict).user.linux.supplemental_groups) == [1000, 2000]


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        (dict(dns_config=cri.DNSConfig(options=["ndots:2\nnameserver 6.6.6.6"])), "dns_config.options"),
        (dict(dns_config=cri.DNSConfig(searches=["a b"])), "dns_config.searches"),
        (dict(linux=cri.LinuxPodSandboxConfig(sysctls={"kernel.panic": "1"})), "is not namespaced"),
        (dict(linux=cri.LinuxPodSandboxConfig(sysctls={"net/../../kernel/panic": "1"})), "is not a sysctl name"),
        (
            dict(
                linux=cri.LinuxPodSandboxConfig(
                    sysctls={"net.ipv4.ip_forward": "1"},
                    security_context=cri.LinuxSandboxSecurityContext(
                        namespace_options=cri.NamespaceOption(network=cri.NODE)
                    ),
                )
            ),
            "shares with the node",
        ),
        (dict(linux=cri.LinuxPodSandboxConfig(sysctls={"kernel.shm_rmid_forced": "1\n2"})), "newline"),
    ],
    ids=["dns-newline", "dns-space", "node-sysctl", "sysctl-path", "host-net-sysctl", "sysctl-newline"],
)
def test_pod_settings_that_would_reach_the_node_are_refused(node, tmp_path: Path, fields, why) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        Pod(node, tmp_path, **fields)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert why in refused.value.details()


def test_log_paths_never_lead_out_through_symlinks(node, tmp_path: Path) -> None:
    pod = Pod(node, tmp_path)
    pod.logs.mkdir(parents=True, exist_ok=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (pod.logs / "out").symlink_to(outside)
    (pod.logs / "file.log").symlink_to(outside / "victim")
    for log_path, why in (("out/c.log", "through a symlink"), ("file.log", "is a symlink"), ("../x.log", "'..'")):
        with pytest.raises(grpc.RpcError) as refused:
            pod.create("c", ["true"], log_path=log_path)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert why in refused.value.details()
    assert list(outside.iterdir()) == []


def test_a_log_directory_swapped_for_a_symlink_later_is_not_followed(node, tmp_path: Path) -> None:
    pod = Pod(node, tmp_path)
    container = pod.run("c", ["sh", "-c", "while true; do echo tick; sleep 0.1; done"], log_path="app/c.log")
    outside = tmp_path / "outside"
    outside.mkdir()
    (pod.logs / "app").rename(pod.logs / "app.old")
    (pod.logs / "app").symlink_to(outside)
    with pytest.raises(grpc.RpcError) as refused:
        pod.rt.ReopenContainerLog(cri.ReopenContainerLogRequest(container_id=container))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "leads through a symlink at 'app'" in refused.value.details()
    assert list(outside.iterdir()) == []
    assert (pod.logs / "app.old" / "c.log").stat().st_size > 0


def test_a_log_directory_with_a_control_character_is_refused(node, tmp_path: Path) -> None:
    config = pod_config(log_directory=str(tmp_path / "logs\nforged"))
    with pytest.raises(grpc.RpcError) as refused:
        node.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "holds a control character" in refused.value.details()


def test_an_apparmor_profile_the_node_cannot_load_is_refused(node, tmp_path: Path) -> None:
    from shimhub import profiles

    if profiles.node_lsms()["apparmor"]:
        pytest.skip("this node has AppArmor")
    pod = Pod(node, tmp_path)
    localhost = cri.SecurityProfile(profile_type=cri.SecurityProfile.Localhost, localhost_ref="my-profile")
    with pytest.raises(grpc.RpcError) as refused:
        pod.create("c", ["true"], linux=security(apparmor=localhost))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "this node has no AppArmor" in refused.value.details()
    info = json.loads(node.runtime.Status(cri.StatusRequest(verbose=True)).info["status"])
    assert info["security_modules"] == {"apparmor": False, "selinux": False}


def test_an_image_stop_signal_that_is_no_signal_falls_back_to_sigterm(daemon_factory, registry, tmp_path) -> None:
    from shimhub.testing.registry import Pusher, busybox_layer

    Pusher(registry.open).image("test/badstop", "1", [busybox_layer()], {"Cmd": ["sleep", "300"], "StopSignal": "NOPE"})
    node = daemon_factory(runc_config(registry)).start()
    node.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image="test/badstop:1")))
    pod = Pod(node, tmp_path, image="test/badstop:1")
    container = pod.run("c", ["sh", "-c", "trap 'exit 143' TERM; while true; do sleep 0.2; done"])
    node.runtime.StopContainer(cri.StopContainerRequest(container_id=container, timeout=10), timeout=60)
    final = pod.status(container)
    assert (final.state, final.exit_code) == (cri.CONTAINER_EXITED, 143)  # SIGTERM, not a failed stop
    assert "is not a signal; SIGTERM stops the container" in node.log()

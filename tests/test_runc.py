"""The runc plugin: real pods and containers on runc (and runsc) under conmon."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from shimhub import cgroups
from shimhub.testing.daemon import Pod, wait_for
from shimhub_proto.cri.v1 import api_pb2 as cri
from shimhub_proto.cri.v1 import api_pb2_grpc
from tests.conftest import NEEDS_ROOT, Network

pytestmark = NEEDS_ROOT


def runc_config(registry, extra: str = "") -> str:
    return (
        f'default_runtime = "runc"\n[runtimes.runc]\nplugin = "runc"\n'
        f'[runtimes.runsc]\nplugin = "runc"\n[runtimes.runsc.options]\nbinary = "runsc"\n'
        f'runtime_args = ["--network=host"]\n'
        f'[runtimes.crun]\nplugin = "runc"\n[runtimes.crun.options]\nbinary = "crun"\n'
        f'[network]\nbackend = "host"\n[storage]\ndriver = "overlay"\n'
        f"{registry.config()}{extra}"
    )


@pytest.fixture
def node(daemon_factory, registry, tmp_path: Path):
    profiles = tmp_path / "seccomp"
    profiles.mkdir()
    daemon = daemon_factory(f'seccomp_profile_root = "{profiles}"\n' + runc_config(registry)).start()
    daemon.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image="test/busybox:1")))
    return daemon


def test_container_from_image_with_cri_log_and_exit_code(node, tmp_path: Path) -> None:
    pod = Pod(node, tmp_path)
    default = pod.run("default")  # the image's Cmd, as the image's User
    final = pod.wait_exit(default)
    assert (final.exit_code, final.reason) == (0, "Completed")
    assert pod.lines("default") == ["hello from the image"]
    logged = pod.output("default").splitlines()[0].split(" ")
    assert logged[1:3] == ["stdout", "F"]
    failing = pod.run("failing", ["sh", "-c", "echo to-out; echo to-err >&2; printf no-newline; exit 3"])
    final = pod.wait_exit(failing)
    assert (final.exit_code, final.reason) == (3, "Error")
    entries = [[*line.split(" ")[1:3], line.split(" ", 3)[3]] for line in pod.output("failing").splitlines()]
    assert sorted(entries) == sorted(
        [["stdout", "F", "to-out"], ["stderr", "F", "to-err"], ["stdout", "P", "no-newline"]]
    )


def exec_sync(pod: Pod, container_id: str, *cmd: str, timeout: int = 10) -> cri.ExecSyncResponse:
    return pod.rt.ExecSync(cri.ExecSyncRequest(container_id=container_id, cmd=list(cmd), timeout=timeout))


def security(**fields: object) -> cri.LinuxContainerConfig:
    return cri.LinuxContainerConfig(security_context=cri.LinuxContainerSecurityContext(**fields))


def test_two_containers_share_the_pods_ipc_network_and_hostname(node, tmp_path: Path) -> None:
    pod = Pod(node, tmp_path)
    first = pod.run("first", ["sleep", "300"])
    second = pod.run("second", ["sh", "-c", "nc -l -p 7070 -e echo pong-from-second"])
    for kind in ("ipc", "net", "uts"):
        ours = exec_sync(pod, first, "readlink", f"/proc/self/ns/{kind}").stdout
        theirs = exec_sync(pod, second, "readlink", f"/proc/self/ns/{kind}").stdout
        assert ours == theirs, kind
    assert (
        exec_sync(pod, first, "readlink", "/proc/self/ns/pid").stdout
        != exec_sync(pod, second, "readlink", "/proc/self/ns/pid").stdout
    )  # PID stays per container by default
    assert exec_sync(pod, first, "hostname").stdout == b"podhost\n"
    reply = wait_for(lambda: exec_sync(pod, first, "sh", "-c", "echo | nc 127.0.0.1 7070").stdout)
    assert reply == b"pong-from-second\n"
    assert exec_sync(pod, first, "cat", "/etc/hostname").stdout == b"podhost\n"


def test_shared_pid_namespace(node, tmp_path: Path) -> None:
    options = cri.NamespaceOption(pid=cri.POD)
    pod = Pod(
        node,
        tmp_path,
        linux=cri.LinuxPodSandboxConfig(security_context=cri.LinuxSandboxSecurityContext(namespace_options=options)),
    )
    pod.run("sleeper", ["sleep", "301"])
    watcher = pod.run("watcher", ["sleep", "300"])
    processes = exec_sync(pod, watcher, "ps", "-o", "args").stdout.decode()
    assert "sleep 301" in processes


def test_oom_kill_is_reported(node, tmp_path: Path) -> None:
    pod = Pod(node, tmp_path)
    limits = cri.LinuxContainerResources(memory_limit_in_bytes=16 << 20, memory_swap_limit_in_bytes=16 << 20)
    hog = pod.run(
        "hog",
        ["sh", "-c", "x=$(head -c 64000000 /dev/zero | tr '\\0' a); echo survived"],
        linux=cri.LinuxContainerConfig(resources=limits),
    )
    final = pod.wait_exit(hog, timeout=60)
    assert final.reason == "OOMKilled"
    assert final.exit_code == 137
    assert "survived" not in pod.output("hog")
    assert not (node.root / "oom").exists(), "conmon wrote its oom marker into shimhub's working directory"


def test_stop_kills_a_container_that_ignores_sigterm(node, tmp_path: Path) -> None:
    pod = Pod(node, tmp_path)
    stubborn = pod.run("stubborn", ["sh", "-c", "trap 'echo got-term' TERM; while true; do sleep 0.1; done"])
    time.sleep(0.5)
    started = time.monotonic()
    pod.rt.StopContainer(cri.StopContainerRequest(container_id=stubborn, timeout=2))
    took = time.monotonic() - started
    final = pod.status(stubborn)
    assert (final.state, final.exit_code) == (cri.CONTAINER_EXITED, 137)
    assert 2 <= took < 15
    assert "got-term" in pod.output("stubborn")
    # PID 1 gets no default signal handlers: a polite container handles TERM itself.
    polite = pod.run("polite", ["sh", "-c", "trap 'echo bye; exit 0' TERM; while true; do sleep 0.1; done"])
    time.sleep(0.5)
    started = time.monotonic()
    pod.rt.StopContainer(cri.StopContainerRequest(container_id=polite, timeout=30))
    assert time.monotonic() - started < 5
    assert (pod.status(polite).exit_code, pod.lines("polite")) == (0, ["bye"])


def test_users(node, tmp_path: Path) -> None:
    pod = Pod(node, tmp_path)
    ids = ["sh", "-c", "echo $(id -u) $(id -g) $(id -G)"]
    image_user = pod.run("image-user", ids)
    by_uid = pod.run("by-uid", ids, linux=security(run_as_user=cri.Int64Value(value=0)))
    by_name = pod.run(
        "by-name",
        ids,
        linux=security(run_as_username="app", supplemental_groups=[4242], run_as_group=cri.Int64Value(value=2000)),
    )
    for container_id in (image_user, by_uid, by_name):
        assert pod.wait_exit(container_id).exit_code == 0
    assert pod.lines("image-user") == ["1000 1000 1000"]
    assert pod.lines("by-uid") == ["0 0 0"]
    assert pod.lines("by-name") == ["1000 2000 2000 4242"]
    with pytest.raises(grpc.RpcError) as unknown:
        pod.create("nobody", ["id"], linux=security(run_as_username="nobody"))
    assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert unknown.value.details() == "run_as_username: user 'nobody' is not in the image's /etc/passwd"


def test_read_only_rootfs(node, tmp_path: Path) -> None:
    pod = Pod(node, tmp_path)
    container_id = pod.run(
        "ro",
        # one stream, so that the log keeps the order (stdout and stderr reach conmon through two pipes)
        ["sh", "-c", "exec 2>&1; touch /new-file || echo refused; touch /tmp/x || echo tmp-refused"],
        linux=security(readonly_rootfs=True),
    )
    assert pod.wait_exit(container_id).exit_code == 0
    assert pod.lines("ro") == [
        "touch: /new-file: Read-only file system",
        "refused",
        "touch: /tmp/x: Read-only file system",
        "tmp-refused",
    ]


def test_seccomp(node, tmp_path: Path) -> None:
    pod = Pod(node, tmp_path)
    profile = tmp_path / "seccomp" / "no-mkdir.json"
    profile.write_text(
        json.dumps(
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}],
            }
        )
    )
    localhost = cri.SecurityProfile(profile_type=cri.SecurityProfile.Localhost, localhost_ref=str(profile))
    blocked = pod.run("blocked", ["mkdir", "/tmp/d"], linux=security(seccomp=localhost))
    assert pod.wait_exit(blocked).exit_code == 1
    assert pod.lines("blocked") == ["mkdir: can't create directory '/tmp/d': Operation not permitted"]
    # RuntimeDefault refuses unshare(2) even to a process with CAP_SYS_ADMIN; Unconfined, and no profile
    # at all (the CRI's meaning of an unset field), do not.
    caps = cri.Capability(add_capabilities=["SYS_ADMIN"])
    root = cri.Int64Value(value=0)
    runtime_default = cri.SecurityProfile(profile_type=cri.SecurityProfile.RuntimeDefault)
    default = pod.run(
        "default",
        ["unshare", "-u", "true"],
        linux=security(capabilities=caps, run_as_user=root, seccomp=runtime_default),
    )
    unset = pod.run(
        "unset",
        ["sh", "-c", "grep Seccomp: /proc/self/status; unshare -u true"],
        linux=security(capabilities=caps, run_as_user=root),
    )
    unconfined = pod.run(
        "unconfined",
        ["unshare", "-u", "true"],
        linux=security(
            capabilities=caps,
            run_as_user=root,
            seccomp=cri.SecurityProfile(profile_type=cri.SecurityProfile.Unconfined),
        ),
    )
    assert pod.wait_exit(default).exit_code != 0
    assert "Operation not permitted" in pod.output("default")
    assert pod.wait_exit(unconfined).exit_code == 0
    assert pod.wait_exit(unset).exit_code == 0
    # The deprecated path form names the same profile.
    legacy = pod.run("legacy", ["mkdir", "/tmp/e"], linux=security(seccomp_profile_path=f"localhost/{profile}"))
    assert pod.wait_exit(legacy).exit_code == 1
    assert pod.lines("unset") == ["Seccomp:\t0"]


def test_seccomp_default_for_containers_that_set_none_when_the_operator_asks(daemon_factory, registry, tmp_path):
    node = daemon_factory("seccomp_use_default_when_empty = true\n" + runc_config(registry)).start()
    node.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image="test/busybox:1")))
    pod = Pod(node, tmp_path)
    unset = pod.run("unset", ["grep", "Seccomp:", "/proc/self/status"])
    unconfined = cri.SecurityProfile(profile_type=cri.SecurityProfile.Unconfined)
    asked = pod.run("asked", ["grep", "Seccomp:", "/proc/self/status"], linux=security(seccomp=unconfined))
    pod.wait_exit(unset)
    pod.wait_exit(asked)
    assert (pod.lines("unset"), pod.lines("asked")) == (["Seccomp:\t2"], ["Seccomp:\t0"])


def test_exec_sync_and_its_timeout(node, tmp_path: Path) -> None:
    pod = Pod(node, tmp_path)
    container_id = pod.run("server", ["sleep", "300"])
    result = exec_sync(pod, container_id, "sh", "-c", "id -u; echo oops >&2; exit 5")
    assert (result.stdout, result.stderr, result.exit_code) == (b"1000\n", b"oops\n", 5)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as slow:
        exec_sync(pod, container_id, "sleep", "60", timeout=1)
    assert slow.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 10
    assert "sleep 60" not in exec_sync(pod, container_id, "ps", "-o", "args").stdout.decode()
    # A shell's child too is gone when DEADLINE_EXCEEDED is answered, as the upstream suite checks with pgrep.
    with pytest.raises(grpc.RpcError) as slow:
        exec_sync(pod, container_id, "sh", "-c", "sleep 61; true", timeout=1)
    assert slow.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    on_node = subprocess.run(["pgrep", "-f", "sleep 61"], capture_output=True, text=True, check=False).stdout
    assert on_node == ""


def test_containers_survive_a_shimhub_restart(node, tmp_path: Path) -> None:
    pod = Pod(node, tmp_path)
    server = pod.run("server", ["sh", "-c", "echo started; sleep 300"])
    short = pod.run("short", ["sh", "-c", "sleep 2; exit 9"])
    node.kill()
    time.sleep(2.5)
    node.start()
    assert pod.status(server).state == cri.CONTAINER_RUNNING
    final = pod.wait_exit(short)
    assert final.exit_code == 9  # conmon recorded it while shimhub was down
    assert exec_sync(pod, server, "echo", "still here").stdout == b"still here\n"


def test_runsc_runs_a_container_on_its_own_kernel(node, tmp_path: Path) -> None:
    pod = Pod(node, tmp_path, handler="runsc")
    container_id = pod.run("gvisor", ["uname", "-r"])
    final = pod.wait_exit(container_id, timeout=60)
    assert final.exit_code == 0
    assert pod.lines("gvisor")[0] != os.uname().release


def test_runsc_pod_on_a_cni_network_serves_a_runc_pod(daemon_factory, registry, tmp_path: Path) -> None:
    network = Network(tmp_path)
    network.conflist()
    try:
        cni = network.daemon_config().split("[network]", 1)[1]
        node = daemon_factory(runc_config(registry).replace('[network]\nbackend = "host"\n', f"[network]{cni}")).start()
        node.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image="test/busybox:1")))
        server = Pod(node, tmp_path / "server", handler="runsc", name="s", uid="s")
        client = Pod(node, tmp_path / "client", name="c", uid="c")
        server_ip = node.runtime.PodSandboxStatus(
            cri.PodSandboxStatusRequest(pod_sandbox_id=server.id)
        ).status.network.ip
        assert server_ip.startswith(f"10.231.{network.octet}.")
        listener = server.run("listener", ["nc", "-ll", "-p", "8080", "-e", "uname", "-r"])
        caller = client.run("caller", ["sleep", "300"])
        assert server_ip in exec_sync(server, listener, "ip", "-4", "addr").stdout.decode()
        reply = wait_for(lambda: exec_sync(client, caller, "nc", "-w", "2", server_ip, "8080").stdout, timeout=30)
        assert reply.decode().strip() != os.uname().release  # answered by gVisor's kernel, over the pod network
    finally:
        network.cleanup()


def test_crun_runs_or_is_disabled_with_the_reason(node, tmp_path: Path) -> None:
    controllers = cgroups.v2_controllers()
    if cgroups.mode() == "hybrid" and controllers:
        handlers = next(
            c for c in node.runtime.Status(cri.StatusRequest()).status.conditions if c.type == "RuntimeHandlersReady"
        )
        reason = (
            f"crun cannot run on hybrid cgroups while the cgroup v2 tree has controllers ({', '.join(controllers)})"
        )
        assert f"crun: {reason}" in handlers.message
        with pytest.raises(grpc.RpcError) as refused:
            Pod(node, tmp_path, handler="crun")
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert Pod(node, tmp_path / "runc").id  # the other handlers still serve
        return
    pod = Pod(node, tmp_path, handler="crun")
    assert pod.wait_exit(pod.run("crun", ["echo", "from crun"])).exit_code == 0
    assert pod.lines("crun") == ["from crun"]


def test_oom_score_is_clamped_to_what_shimhub_may_set(node, tmp_path: Path) -> None:
    pod = Pod(node, tmp_path)
    resources = cri.LinuxContainerResources(oom_score_adj=-999)
    container_id = pod.run(
        "important", ["cat", "/proc/self/oom_score_adj"], linux=cri.LinuxContainerConfig(resources=resources)
    )
    assert pod.wait_exit(container_id).exit_code == 0
    floor = Path("/proc/self/oom_score_adj").read_text().strip()
    assert pod.lines("important") == [floor]
    assert f"oom_score_adj -999 clamped to {floor}" in node.log()


def test_termination_message(node, tmp_path: Path) -> None:
    pod = Pod(node, tmp_path)
    message_file = tmp_path / "termination-log"
    message_file.touch()
    mount = cri.Mount(container_path="/dev/termination-log", host_path=str(message_file))
    container_id = pod.run(
        "dying",
        ["sh", "-c", "echo 'disk full' > /dev/termination-log; exit 2"],
        mounts=[mount],
        linux=security(run_as_user=cri.Int64Value(value=0)),
    )
    final = pod.wait_exit(container_id)
    assert (final.exit_code, final.reason, final.message) == (2, "Error", "disk full\n")


def test_update_resources_and_reopen_log(node, tmp_path: Path) -> None:
    pod = Pod(node, tmp_path)
    container_id = pod.run("ticker", ["sh", "-c", "while true; do echo tick; sleep 0.1; done"])
    new = cri.LinuxContainerResources(memory_limit_in_bytes=64 << 20, cpu_shares=512)
    pod.rt.UpdateContainerResources(cri.UpdateContainerResourcesRequest(container_id=container_id, linux=new))
    limit = exec_sync(pod, container_id, "cat", "/sys/fs/cgroup/memory/memory.limit_in_bytes").stdout
    assert int(limit) == 64 << 20
    assert pod.status(container_id).resources.linux.memory_limit_in_bytes == 64 << 20
    log = pod.logs / "ticker.log"
    wait_for(lambda: log.exists() and log.stat().st_size > 0)
    log.rename(pod.logs / "ticker.log.1")
    pod.rt.ReopenContainerLog(cri.ReopenContainerLogRequest(container_id=container_id))
    assert log.exists(), "ReopenContainerLog answered before the new log file existed"
    wait_for(lambda: "tick" in log.read_text())


def test_pod_files_sysctls_mounts_devices_and_privileged(node, tmp_path: Path) -> None:
    dns = cri.DNSConfig(servers=["10.96.0.10"], searches=["ns.svc.cluster.local"], options=["ndots:5"])
    linux = cri.LinuxPodSandboxConfig(
        sysctls={"kernel.shm_rmid_forced": "1"},
        security_context=cri.LinuxSandboxSecurityContext(namespace_options=cri.NamespaceOption(pid=cri.CONTAINER)),
    )
    pod = Pod(node, tmp_path, dns_config=dns, linux=linux)
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "data.txt").write_text("from the host\n")
    mounts = [cri.Mount(container_path="/data", host_path=str(shared), readonly=True)]
    devices = [cri.Device(container_path="/dev/mynull", host_path="/dev/null", permissions="rw")]
    script = (
        "cat /etc/resolv.conf; grep podhost /etc/hosts >/dev/null && echo hosts-ok; "
        "cat /proc/sys/kernel/shm_rmid_forced; cat /data/data.txt; touch /data/x 2>/dev/null || echo ro-ok; "
        "echo discard > /dev/mynull && echo device-ok; grep CapEff /proc/self/status"
    )
    plain = pod.run(
        "plain",
        ["sh", "-c", script],
        mounts=mounts,
        devices=devices,
        linux=security(run_as_user=cri.Int64Value(value=0)),
    )
    assert pod.wait_exit(plain).exit_code == 0
    assert pod.lines("plain") == [
        "nameserver 10.96.0.10",
        "search ns.svc.cluster.local",
        "options ndots:5",
        "hosts-ok",
        "1",
        "from the host",
        "ro-ok",
        "device-ok",
        "CapEff:\t00000000a80425fb",
    ]
    privileged = pod.run(
        "privileged",
        ["sh", "-c", "grep CapEff /proc/self/status"],
        linux=security(privileged=True, run_as_user=cri.Int64Value(value=0)),
    )
    assert pod.wait_exit(privileged).exit_code == 0
    bounding = next(
        line.split()[1] for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("CapBnd:")
    )
    assert pod.lines("privileged") == [f"CapEff:\t{bounding}"]  # every capability shimhub holds


@pytest.mark.parametrize(
    ("where", "why"),
    [
        ("outside", "is not inside"),
        ("dotdot", "may not contain '..'"),
        ("link-out", "no such file"),
        ("fifo", "not a regular file"),
        ("huge", "at most"),
        ("relative", "absolute path"),
    ],
)
def test_hostile_localhost_seccomp_profiles_are_refused(node, tmp_path: Path, where: str, why: str) -> None:
    """A Localhost profile is read only from under the profile root, never through a link out of it, never a
    FIFO (which would block the call), and never more than a bounded size."""
    root = tmp_path / "seccomp"
    outside = tmp_path / "elsewhere.json"
    outside.write_text('{"defaultAction": "SCMP_ACT_ALLOW"}')
    refs = {
        "outside": str(outside),
        "dotdot": f"{root}/../elsewhere.json",
        "link-out": f"{root}/link.json",
        "fifo": f"{root}/fifo.json",
        "huge": f"{root}/huge.json",
        "relative": "profile.json",
    }
    (root / "link.json").symlink_to(outside)
    os.mkfifo(root / "fifo.json")
    (root / "huge.json").write_text('{"defaultAction": "SCMP_ACT_ALLOW", "x": "' + "a" * (2 << 20) + '"}')
    pod = Pod(node, tmp_path)
    localhost = cri.SecurityProfile(profile_type=cri.SecurityProfile.Localhost, localhost_ref=refs[where])
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as refused:
        pod.create("c", ["true"], linux=security(seccomp=localhost))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert why in refused.value.details()
    assert time.monotonic() - started < 10


@pytest.mark.parametrize(
    ("passwd", "why"),
    [
        (("etc/passwd", "symlink", "/etc/passwd"), "not in the image's /etc/passwd"),  # a loop inside the root
        (("etc/passwd", "symlink", "../../../../../../etc/passwd"), "not in the image's /etc/passwd"),
        (("etc/passwd", "symlink", "/dev/zero"), "not in the image's /etc/passwd"),
        (("etc/passwd", "fifo", None), "not a regular file"),
        (("etc/passwd", "file", "root:x:0:0::/root:/bin/sh\n" + "x" * (5 << 20)), "larger than"),
    ],
    ids=["self-loop", "escape", "dev-zero", "fifo", "huge"],
)
def test_hostile_image_user_databases_are_read_inside_the_image_only(
    daemon_factory, registry, tmp_path: Path, passwd: tuple, why: str
) -> None:
    """An image's /etc/passwd never leads to the node's files or devices, never blocks, and is bounded."""
    from shimhub.testing.layers import tar
    from shimhub.testing.registry import Pusher, busybox_layer

    tag = f"passwd-{secrets.token_hex(4)}"
    Pusher(registry.open).image(
        "test/hostile-passwd", tag, [busybox_layer(), tar(("etc", "dir", None), passwd)], {"Cmd": ["id"]}
    )
    node = daemon_factory(runc_config(registry)).start()
    node.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=f"test/hostile-passwd:{tag}")))
    pod = Pod(node, tmp_path, image=f"test/hostile-passwd:{tag}")
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as refused:
        pod.create("c", linux=security(run_as_username="root"))  # the node's passwd has root
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert why in refused.value.details()
    assert time.monotonic() - started < 10
    assert node.proc.poll() is None


def test_runtime_default_seccomp_keeps_namespaces_clone3_and_io_uring_away(daemon_factory, registry, tmp_path):
    """As the usual runtime default profiles: namespace flags of clone only with CAP_SYS_ADMIN, clone3 answers
    ENOSYS (the C library then falls back to clone), io_uring is refused."""
    import shutil as shell_tools

    from shimhub.testing.layers import tar
    from shimhub.testing.registry import Pusher, busybox_layer

    if shell_tools.which("gcc") is None:
        pytest.skip("gcc is not installed (./install --dev installs it): the probe is a static C program")
    probe = tmp_path / "probe"
    source = Path(__file__).parent / "probes" / "seccomp.c"
    subprocess.run(["gcc", "-static", "-O2", "-o", str(probe), str(source)], check=True)
    layer = tar(("probe", "file", probe.read_bytes(), {"mode": 0o755}))
    Pusher(registry.open).image("test/seccomp-probe", "1", [busybox_layer(), layer], {"Cmd": ["/probe"]})
    node = daemon_factory(runc_config(registry)).start()
    node.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image="test/seccomp-probe:1")))
    pod = Pod(node, tmp_path, image="test/seccomp-probe:1")
    root = cri.Int64Value(value=0)
    default = cri.SecurityProfile(profile_type=cri.SecurityProfile.RuntimeDefault)
    plain = pod.run("plain", linux=security(run_as_user=root, seccomp=default))
    admin = pod.run(
        "admin",
        linux=security(run_as_user=root, seccomp=default, capabilities=cri.Capability(add_capabilities=["SYS_ADMIN"])),
    )
    pod.wait_exit(plain)
    pod.wait_exit(admin)
    assert pod.lines("plain") == [
        "newuser Operation not permitted",
        "newnet Operation not permitted",
        "plain ok",
        "clone3 Function not implemented",
        "io_uring Operation not permitted",
    ]
    assert pod.lines("admin")[1:3] == ["newnet ok", "plain ok"]


def test_exec_sync_output_is_bounded_not_buffered(node, tmp_path: Path) -> None:
    """200 MB of output: the answer keeps the limit of each stream and fits the kubelet's 16 MiB messages;
    the daemon reads the rest and drops it instead of holding it."""
    import psutil

    from shimhub.containers.exec import EXEC_OUTPUT_LIMIT

    pod = Pod(node, tmp_path)
    container_id = pod.run("server", ["sleep", "300"])
    daemon = psutil.Process(node.proc.pid)
    before = daemon.memory_info().rss
    flood = "head -c 200000000 /dev/zero; head -c 200000000 /dev/zero >&2"
    kubelet_limits = [("grpc.max_receive_message_length", 16 << 20)]  # what the kubelet's CRI client accepts
    with grpc.insecure_channel(f"unix:{node.socket}", options=kubelet_limits) as channel:
        request = cri.ExecSyncRequest(container_id=container_id, cmd=["sh", "-c", flood], timeout=60)
        answer = api_pb2_grpc.RuntimeServiceStub(channel).ExecSync(request, timeout=120)
    assert (len(answer.stdout), len(answer.stderr), answer.exit_code) == (EXEC_OUTPUT_LIMIT, EXEC_OUTPUT_LIMIT, 0)
    assert answer.ByteSize() < 16 << 20
    assert daemon.memory_info().rss - before < 100 << 20


def test_conmon_cgroup_needs_the_systemd_driver(daemon_factory, registry) -> None:
    daemon = daemon_factory(runc_config(registry, '[runtimes.runc.options]\nconmon_cgroup = "pod"\n'))
    served = daemon.command("serve", "--config", str(daemon.config_path))
    assert served.returncode == 2
    assert "conmon_cgroup 'pod' needs cgroup_driver = \"systemd\"" in served.stderr


def test_a_localhost_profile_anywhere_is_applied_by_default(daemon_factory, registry, tmp_path: Path) -> None:
    """Without seccomp_profile_root, the kubelet's absolute path is taken wherever its root directory is; a
    FIFO there is still refused rather than opened."""
    daemon = daemon_factory(runc_config(registry)).start()
    daemon.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image="test/busybox:1")))
    moved_root = tmp_path / "data" / "kubelet" / "seccomp"
    moved_root.mkdir(parents=True)
    profile = moved_root / "no-mkdir.json"
    rules = [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    profile.write_text(json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": rules}))
    pod = Pod(daemon, tmp_path / "pod")
    localhost = cri.SecurityProfile(profile_type=cri.SecurityProfile.Localhost, localhost_ref=str(profile))
    blocked = pod.run("blocked", ["mkdir", "/tmp/d"], linux=security(seccomp=localhost))
    assert pod.wait_exit(blocked).exit_code == 1
    assert pod.lines("blocked") == ["mkdir: can't create directory '/tmp/d': Operation not permitted"]
    os.mkfifo(moved_root / "fifo.json")
    fifo = cri.SecurityProfile(profile_type=cri.SecurityProfile.Localhost, localhost_ref=str(moved_root / "fifo.json"))
    with pytest.raises(grpc.RpcError) as refused:
        pod.create("fifo", ["true"], linux=security(seccomp=fifo))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a regular file" in refused.value.details()

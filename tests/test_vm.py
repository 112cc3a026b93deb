"""VM pods: the kata and clearcontainers runtime plugins on QEMU (KVM when it runs a guest, else TCG)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import grpc
import psutil
import pytest

from shimhub.testing.daemon import Pod, wait_for
from shimhub.testing.leaks import leftovers
from shimhub_proto.cri.v1 import api_pb2 as cri
from shimhub_vm import guest
from tests.conftest import NEEDS_ROOT, Network

KERNEL = guest.default_kernel()
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
#: What a test needs to run VM pods (KVM or not: without it they run under software emulation).
VM_MARKS = [
    pytest.mark.vm,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="QEMU is not installed (qemu-system-x86)"),
    pytest.mark.skipif(not KERNEL, reason="no guest kernel in /boot (linux-image-cloud-amd64)"),
    pytest.mark.skipif(not os.path.exists(VIRTIOFSD), reason="virtiofsd is not installed (qemu-system-common)"),
]
pytestmark = [NEEDS_ROOT, *VM_MARKS]
ANNOTATIONS = "io.katacontainers.config.hypervisor."


def vm_config(network: Network, registry, options: str = "") -> str:
    network.conflist()
    handlers = "".join(
        f'[runtimes.{name}]\nplugin = "{name}"\nallowed_annotations = ["{ANNOTATIONS}"]\n'
        f"[runtimes.{name}.options]\nmax_vcpus = 2\nmax_memory_mib = 512\n{options}"
        for name in ("kata", "clearcontainers")
    )
    return f'default_runtime = "kata"\n{handlers}{network.table()}[storage]\ndriver = "overlay"\n{registry.config()}'


@pytest.fixture
def node(daemon_factory, registry, network):
    daemon = daemon_factory(vm_config(network, registry)).start()
    daemon.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image="test/busybox:1")))
    return daemon


def vm_pod(node, tmp_path: Path, handler: str, **annotations: str) -> Pod:
    return Pod(node, tmp_path, handler=handler, annotations=annotations)


def exec_sync(pod: Pod, container: str, cmd: list[str], timeout: int = 60) -> cri.ExecSyncResponse:
    return pod.rt.ExecSync(cri.ExecSyncRequest(container_id=container, cmd=cmd, timeout=timeout), timeout=timeout + 30)


@pytest.mark.parametrize("handler", ["kata", "clearcontainers"])
def test_vm_pod_runs_a_container_in_its_own_kernel(node, network, tmp_path: Path, handler: str) -> None:
    pod = vm_pod(node, tmp_path, handler)
    status = pod.rt.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod.id)).status
    pod_ip = status.network.ip
    assert pod_ip.startswith(f"10.231.{network.octet}.")
    root = cri.LinuxContainerConfig(
        security_context=cri.LinuxContainerSecurityContext(run_as_user=cri.Int64Value(value=0))
    )
    main = pod.run(
        "main", ["sh", "-c", "uname -r; ip -o -4 addr show; hostname; echo to-err >&2; sleep 600"], linux=root
    )
    assert wait_for(lambda: "to-err" in pod.output("main"), 60)
    lines = pod.lines("main")
    assert lines[0] != os.uname().release, "the container runs on the VM's kernel, not the node's"
    assert lines[0] == Path(KERNEL).name.removeprefix("vmlinuz-")
    assert any(f"inet {pod_ip}/" in line for line in lines), "the guest's interface has the pod IP"
    assert "podhost" in lines
    assert ("stderr", "F", "to-err") in [tuple(line.split(" ", 3)[1:]) for line in pod.output("main").splitlines()]

    done = exec_sync(pod, main, ["sh", "-c", "cat /etc/hostname; echo oops >&2; exit 3"])
    assert (done.exit_code, done.stdout, done.stderr) == (3, b"podhost\n", b"oops\n")
    ping = exec_sync(pod, main, ["ping", "-c", "1", "-W", "5", f"10.231.{network.octet}.1"])
    assert ping.exit_code == 0, ping.stdout + ping.stderr

    # The guest booted from an RTC with whole seconds; shimhub sets its clock, so times reported from inside
    # the VM (a container's start and finish) compare with the node's.
    asked = time.time()
    # A file's change time in the guest's tmpfs is the guest's wall clock (%Y: seconds, %y: with the fraction).
    stamp = exec_sync(pod, main, ["sh", "-c", "touch /dev/shm/now && stat -c '%Y %y' /dev/shm/now"])
    seconds, _, time_of_day, _ = stamp.stdout.decode().split()
    guest_time = int(seconds) + float("0." + time_of_day.partition(".")[2])
    assert asked - 0.05 <= guest_time <= time.time(), f"guest clock off by {guest_time - asked:+.3f} s"

    stats = pod.rt.ContainerStats(cri.ContainerStatsRequest(container_id=main)).stats
    assert stats.memory.working_set_bytes.value > 0
    assert stats.cpu.usage_core_nano_seconds.value > 0

    short = pod.run("short", ["sh", "-c", "echo bye; exit 7"])
    final = pod.wait_exit(short, 60)
    assert (final.exit_code, final.reason) == (7, "Error")
    assert pod.lines("short") == ["bye"]

    pod.rt.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod.id), timeout=120)
    pod.rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod.id), timeout=120)
    assert leftovers(node.root, {pod.id}, {main, short}) == {}
    assert network.allocations() == []


def test_pod_annotations_tune_the_vm_within_the_handlers_bounds(node, tmp_path: Path) -> None:
    rt = node.runtime
    for key, value, expected in (
        ("default_vcpus", "3", "default_vcpus: 3 is outside 1..2 (the handler's max_vcpus)"),
        ("default_memory", "64", "default_memory: 64 is outside 128..512 (the handler's max_memory_mib)"),
        ("default_memory", "lots", "default_memory: 'lots' is not an integer"),
        ("kernel_params", "quiet init=/bin/sh", "kernel_params: init=/bin/sh may not be set"),
    ):
        with pytest.raises(grpc.RpcError) as refused:
            vm_pod(node, tmp_path, "kata", **{ANNOTATIONS + key: value})
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert expected in refused.value.details()
    assert not rt.ListPodSandbox(cri.ListPodSandboxRequest()).items
    assert leftovers(node.root, set(), set()) == {}

    pod = vm_pod(node, tmp_path, "kata", **{ANNOTATIONS + "default_vcpus": "2", ANNOTATIONS + "default_memory": "384"})
    main = pod.run("main", ["sleep", "600"])
    assert exec_sync(pod, main, ["nproc"]).stdout == b"2\n"
    meminfo = exec_sync(pod, main, ["head", "-1", "/proc/meminfo"]).stdout.split()
    assert 300_000 < int(meminfo[1]) <= 384 * 1024, meminfo
    kata = json.loads(rt.Status(cri.StatusRequest(verbose=True)).info["status"])["handlers"]["kata"]
    assert kata["ready"] and kata["info"]["accel"] in ("kvm", "tcg")
    if kata["info"]["accel"] == "tcg":  # the operator is told why VMs are slow
        assert kata["info"]["warning"].startswith("software emulation (TCG): ")


def test_vm_pods_survive_a_shimhub_restart(node, tmp_path: Path) -> None:
    pod = vm_pod(node, tmp_path, "kata")
    steady = pod.run("steady", ["sh", "-c", "echo started; sleep 600"])
    late = pod.run("late", ["sh", "-c", "sleep 5; echo while-shimhub-was-down; exit 5"])
    assert wait_for(lambda: "started" in pod.output("steady"), 60)
    qemu_pids = {p.pid for p in psutil.process_iter(["name"]) if "qemu" in (p.info["name"] or "")}
    node.stop()
    time.sleep(8)  # "late" exits and writes while nobody listens
    node.start()
    assert pod.status(steady).state == cri.CONTAINER_RUNNING
    final = pod.wait_exit(late, 60)
    assert final.exit_code == 5
    assert pod.lines("late") == ["while-shimhub-was-down"]
    assert exec_sync(pod, steady, ["echo", "still-here"]).stdout == b"still-here\n"
    node.kill()
    node.start()
    assert exec_sync(pod, steady, ["echo", "after-kill-9"]).stdout == b"after-kill-9\n"
    assert qemu_pids == {p.pid for p in psutil.process_iter(["name"]) if "qemu" in (p.info["name"] or "")}


def test_a_vm_that_dies_takes_its_containers_and_leaves_nothing(node, tmp_path: Path) -> None:
    pod = vm_pod(node, tmp_path, "clearcontainers")
    main = pod.run("main", ["sleep", "600"])
    assert pod.status(main).state == cri.CONTAINER_RUNNING
    info = pod.rt.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod.id, verbose=True)).info
    qemu_pid = json.loads(info["info"])["runtime_data"]["vm"]["pid"]
    os.kill(qemu_pid, signal.SIGKILL)
    final = pod.wait_exit(main, 30)
    assert (final.exit_code, final.message) == (137, "the pod's VM exited unexpectedly; its containers are gone")
    with pytest.raises(grpc.RpcError) as refused:
        exec_sync(pod, main, ["true"])
    assert refused.value.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAVAILABLE)
    pod.rt.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod.id))
    pod.rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod.id))
    assert leftovers(node.root, {pod.id}, {main}) == {}
    assert not list((node.root / "state").rglob("*.ext4.partial"))
    assert not list((node.root / "state").rglob("disks/*.ext4"))


def test_vm_pods_start_from_a_template(daemon_factory, registry, network, tmp_path: Path) -> None:
    node = daemon_factory(vm_config(network, registry, "vm_template = true\n")).start()
    node.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image="test/busybox:1")))
    templates = node.root / "state" / "plugins"
    root = cri.LinuxContainerConfig(
        security_context=cri.LinuxContainerSecurityContext(run_as_user=cri.Int64Value(value=0))
    )
    seen = []
    for number in (1, 2):
        pod = Pod(node, tmp_path / f"p{number}", handler="kata", name=f"t{number}", uid=f"uid-t{number}",
                  hostname=f"templated-{number}")  # fmt: skip
        status = pod.rt.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod.id)).status
        main = pod.run("main", ["sh", "-c", "sleep 600"], linux=root)
        shown = exec_sync(
            pod, main, ["sh", "-c", "hostname; ip -o -4 addr show; date +%s; head -c 8 /dev/urandom | od -x"]
        )
        lines = shown.stdout.decode().splitlines()
        assert lines[0] == f"templated-{number}"
        assert any(f"inet {status.network.ip}/" in line for line in lines), lines
        assert abs(int(lines[-3]) - time.time()) < 30, "the guest clock is the host's, not the template's"
        seen.append(lines[-2])
        # the container's root filesystem reaches the guest over the share plugged in after the restore
        assert exec_sync(pod, main, ["cat", "/bin/busybox"]).exit_code == 0
        info = json.loads(
            pod.rt.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod.id, verbose=True)).info["info"]
        )
        assert "boot_seconds" in json.dumps(info)
    assert seen[0] != seen[1], "two VMs from one template draw the same random numbers"
    assert len(list(templates.rglob("state"))) == 1, "one template, made once, for both pods"

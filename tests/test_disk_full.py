"""A full disk under the state directory: writes fail whole, the RPC says so, and nothing is lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import grpc
import pytest

from shimhub.errors import ResourceExhausted
from shimhub.state import write_atomically
from shimhub.testing.daemon import Pod, pod_config, wait_for
from shimhub_proto.cri.v1 import api_pb2 as cri
from tests.conftest import NEEDS_ROOT, PROC_CONFIG
from tests.test_runc import exec_sync, runc_config

pytestmark = NEEDS_ROOT


@pytest.fixture
def small_fs(tmp_path: Path):
    """A 1 MiB tmpfs, unmounted at the end."""
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mountpoint)], check=True)
    yield mountpoint
    subprocess.run(["umount", "-l", str(mountpoint)], check=True)


def _fill(directory: Path) -> Path:
    """Fill the filesystem of `directory` to the last block; the filler file."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


def test_a_write_that_does_not_fit_changes_nothing(small_fs: Path) -> None:
    record = small_fs / "record.json"
    write_atomically(record, b'{"good": true}')
    filler = _fill(small_fs)
    with pytest.raises(ResourceExhausted):
        write_atomically(record, b"x" * (256 << 10))
    assert record.read_bytes() == b'{"good": true}'
    assert sorted(p.name for p in small_fs.iterdir()) == ["filler", "record.json"]
    filler.unlink()


def test_a_full_state_disk_answers_resource_exhausted_and_loses_nothing(small_fs: Path, daemon_factory) -> None:
    daemon = daemon_factory(PROC_CONFIG)
    os.symlink(small_fs, daemon.root / "state")
    daemon.start()
    rt = daemon.runtime
    first = rt.RunPodSandbox(cri.RunPodSandboxRequest(config=pod_config(name="first", uid="u1"))).pod_sandbox_id
    filler = _fill(small_fs)
    big = pod_config(name="second", uid="u2", annotations={"filler": "y" * (128 << 10)})
    with pytest.raises(grpc.RpcError) as full:
        rt.RunPodSandbox(cri.RunPodSandboxRequest(config=big))
    assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert [p.id for p in rt.ListPodSandbox(cri.ListPodSandboxRequest()).items] == [first]
    filler.unlink()
    daemon.restart()
    assert [p.id for p in daemon.runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items] == [first]
    assert not list(small_fs.rglob(".*.tmp"))


def test_unreadable_records_never_stop_the_daemon_nor_leave_what_they_named(daemon_factory, registry) -> None:
    """A truncated sandbox record: its pod is rebuilt from its containers' records and removed with what it left
    on the node (the running container's process, the pod's directory); a truncated image record is set aside;
    shimhub starts either way."""

    daemon = daemon_factory(runc_config(registry)).start()
    daemon.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image="test/busybox:1")))
    rt = daemon.runtime
    sandbox_id = rt.RunPodSandbox(cri.RunPodSandboxRequest(config=pod_config())).pod_sandbox_id
    container = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="c"), image=cri.ImageSpec(image="test/busybox:1"), command=["sleep", "300"]
    )
    container_id = rt.CreateContainer(
        cri.CreateContainerRequest(pod_sandbox_id=sandbox_id, config=container)
    ).container_id
    rt.StartContainer(cri.StartContainerRequest(container_id=container_id))
    status = rt.ContainerStatus(cri.ContainerStatusRequest(container_id=container_id, verbose=True))
    pid = json.loads(status.info["info"])["runtime_data"]["pid"]
    daemon.kill()
    state = daemon.root / "state"
    sandbox_file = state / "sandboxes" / f"{sandbox_id}.json"
    sandbox_file.write_bytes(sandbox_file.read_bytes()[:200])  # the handler's name is past the cut
    image_file = next((state / "images" / "images").glob("*.json"))
    image_file.write_bytes(image_file.read_bytes()[:10])
    daemon.start()
    assert list(daemon.runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items) == []
    assert list(daemon.runtime.ListContainers(cri.ListContainersRequest()).containers) == []
    assert not Path(f"/proc/{pid}").exists() or b"sleep" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert not (daemon.root / "run" / "pods" / sandbox_id).exists(), "the pod's directory is left"
    assert sandbox_id not in Path("/proc/self/mountinfo").read_text()
    assert "rebuilt (handler 'runc') to remove the pod" in daemon.log() and "moved to" in daemon.log()


def test_resources_not_recorded_are_not_applied(tmp_path: Path, daemon_factory, registry) -> None:
    """UpdateContainerResources on a full state disk: the cgroup keeps its old limit, as the status does."""
    state = tmp_path / "state-fs"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(state)], check=True)
    try:
        daemon = daemon_factory(runc_config(registry))
        os.symlink(state, daemon.root / "state")
        daemon.start()
        daemon.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image="test/busybox:1")))
        pod = Pod(daemon, tmp_path / "pod")
        first = cri.LinuxContainerResources(memory_limit_in_bytes=64 << 20)
        container = pod.run("app", ["sleep", "600"], linux=cri.LinuxContainerConfig(resources=first))
        info = pod.rt.ContainerStatus(cri.ContainerStatusRequest(container_id=container, verbose=True)).info
        cgroup = Path("/sys/fs/cgroup/memory", json.loads(info["info"])["runtime_data"]["cgroup"].lstrip("/"))
        filler = _fill(state)
        try:
            # the rewritten record needs new blocks: 64 KiB more of it cannot fit
            bigger = cri.LinuxContainerResources(memory_limit_in_bytes=128 << 20, unified={"x": "y" * (64 << 10)})
            with pytest.raises(grpc.RpcError) as full:
                pod.rt.UpdateContainerResources(
                    cri.UpdateContainerResourcesRequest(container_id=container, linux=bigger)
                )
            assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert int((cgroup / "memory.limit_in_bytes").read_text()) == 64 << 20
            assert pod.status(container).resources.linux.memory_limit_in_bytes == 64 << 20
        finally:
            filler.unlink()
        assert exec_sync(pod, container, "cat", "/sys/fs/cgroup/memory/memory.limit_in_bytes").stdout == b"%d\n" % (
            64 << 20
        )
        daemon.restart()
        assert pod.status(container).resources.linux.memory_limit_in_bytes == 64 << 20
        pod.rt.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod.id))
        pod.rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod.id))
    finally:
        subprocess.run(["umount", "-l", str(state)], check=True)


def test_an_orphan_whose_handler_is_gone_is_listed_until_it_can_be_removed(daemon_factory, registry) -> None:
    """The lost pod's handler left the configuration: the rebuilt pod stays listed, and `shimhub orphans
    --remove` removes it once the handler is back."""
    config = runc_config(registry).replace("[runtimes.runsc]", '[runtimes.retired]\nplugin = "runc"\n[runtimes.runsc]')
    daemon = daemon_factory(config).start()
    daemon.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image="test/busybox:1")))
    pod = Pod(daemon, daemon.root, handler="retired")
    container_id = pod.run("c", ["sleep", "300"])
    status = daemon.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=container_id, verbose=True))
    pid = json.loads(status.info["info"])["runtime_data"]["pid"]
    daemon.kill()
    sandbox_file = daemon.root / "state" / "sandboxes" / f"{pod.id}.json"
    sandbox_file.write_bytes(b'{"handler": "retired", "id": "' + pod.id.encode() + b'", "conf')
    daemon.write_config(runc_config(registry))
    daemon.start()
    listed = daemon.command("orphans", "--config", str(daemon.config_path))
    assert listed.stdout.split() == [pod.id, f"orphaned-{pod.id[:12]}", "left", "to", "remove"], listed.stderr
    assert "is no longer configured" in daemon.log(), "the failed removal is not logged"

    daemon.write_config(config)
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: "configuration reloaded" in daemon.log())
    assert Path(f"/proc/{pid}").exists(), "the container's process went with nothing to remove it"
    removed = daemon.command("orphans", "--remove", "--config", str(daemon.config_path))
    assert removed.stdout.split()[-1] == "removed", removed.stderr
    assert list(daemon.runtime.ListContainers(cri.ListContainersRequest()).containers) == []
    assert daemon.command("orphans", "--config", str(daemon.config_path)).stdout == ""
    assert not Path(f"/proc/{pid}").exists() or b"sleep" not in Path(f"/proc/{pid}/cmdline").read_bytes()

"""A full disk under the state directory: writes fail whole, the RPC says so, and nothing is lost."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import grpc
import pytest

from shimhub.errors import ResourceExhausted
from shimhub.state import write_atomically
from shimhub.testing.daemon import Pod, pod_config
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


def test_unreadable_records_never_stop_the_daemon_nor_lose_containers(daemon_factory, registry) -> None:
    """A truncated sandbox record sets its containers' records aside for an operator instead of deleting them;
    a truncated image record is set aside; shimhub starts either way."""
    from tests.conftest import image_config

    daemon = daemon_factory(image_config(registry)).start()
    daemon.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image="test/busybox:1")))
    rt = daemon.runtime
    sandbox_id = rt.RunPodSandbox(cri.RunPodSandboxRequest(config=pod_config())).pod_sandbox_id
    container = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="c"), image=cri.ImageSpec(image="test/busybox:1"), command=["sleep", "300"]
    )
    container_id = rt.CreateContainer(
        cri.CreateContainerRequest(pod_sandbox_id=sandbox_id, config=container)
    ).container_id
    daemon.stop()
    state = daemon.root / "state"
    sandbox_file = state / "sandboxes" / f"{sandbox_id}.json"
    good_sandbox = sandbox_file.read_bytes()
    sandbox_file.write_bytes(good_sandbox[: len(good_sandbox) // 2])
    image_file = next((state / "images" / "images").glob("*.json"))
    good_image = image_file.read_bytes()
    image_file.write_bytes(good_image[:10])
    daemon.start()
    assert list(daemon.runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items) == []
    assert (state / "containers" / f"{container_id}.orphan").exists()
    assert "kept as" in daemon.log() and "moved to" in daemon.log()
    # an operator puts the records back: everything is found again and removed as usual
    daemon.stop()
    sandbox_file.with_suffix(".corrupt").unlink()
    sandbox_file.write_bytes(good_sandbox)
    image_file.with_suffix(".corrupt").unlink()
    image_file.write_bytes(good_image)
    (state / "containers" / f"{container_id}.orphan").rename(state / "containers" / f"{container_id}.json")
    daemon.start()
    assert [c.id for c in daemon.runtime.ListContainers(cri.ListContainersRequest()).containers] == [container_id]


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

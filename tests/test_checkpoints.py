"""CheckpointContainer (KEP 2008) and containers created from its archives, on runc with CRIU.

CRIU 3.17 (Debian 12) cannot run on a kernel whose vDSO it does not know; there
CheckpointContainer says so, and the checkpoints themselves are tested in the node
that `python3 -m tests.booted_node` boots (Debian's kernel).
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from shimhub.testing.daemon import Pod, wait_for
from shimhub_proto.cri.v1 import api_pb2 as cri
from shimhub_runc import criu
from tests.conftest import NEEDS_ROOT
from tests.test_runc import exec_sync, runc_config

pytestmark = NEEDS_ROOT
IMAGE = "test/busybox:1"
COUNTER = ["sh", "-c", "echo written-before > /tmp/before; i=0; while :; do i=$((i+1)); echo $i; sleep 0.2; done"]
#: Checkpoints for real: in the booted node where CRIU cannot run here (inside it they fail rather than skip).
NEEDS_CRIU = (
    pytest.mark.node,
    pytest.mark.slow,
    pytest.mark.skipif(
        bool(criu.node_problem()) and not os.environ.get("SHIMHUB_NODE"),
        reason=f"{criu.node_problem()}: python3 -m tests.booted_node runs these in a node CRIU knows",
    ),
)


def needs_criu(test: Callable[..., None]) -> Callable[..., None]:
    """The marks of a test that checkpoints for real."""
    for mark in NEEDS_CRIU:
        test = mark(test)
    return test


def _daemon(daemon_factory, registry, extra: str = ""):
    config = runc_config(registry, f'[runtimes.proc]\nplugin = "proc"\n{extra}')
    daemon = daemon_factory(config).start()
    daemon.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=IMAGE)))
    return daemon


@pytest.fixture
def node(daemon_factory, shimhub_registry):
    return _daemon(daemon_factory, shimhub_registry)


def _checkpoint(pod: Pod, container_id: str, location: Path) -> None:
    request = cri.CheckpointContainerRequest(container_id=container_id, location=str(location), timeout=120)
    pod.rt.CheckpointContainer(request, timeout=180)


def _create_from(pod: Pod, name: str, archive: Path) -> str:
    """CreateContainer with a checkpoint archive for its image, as CRI-O takes it."""
    config = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name=name), image=cri.ImageSpec(image=str(archive)), log_path=f"{name}.log"
    )
    request = cri.CreateContainerRequest(pod_sandbox_id=pod.id, config=config, sandbox_config=pod.config)
    return pod.rt.CreateContainer(request, timeout=180).container_id


def _counted(pod: Pod, name: str) -> list[int]:
    return [int(line) for line in pod.lines(name) if line.isdigit()]


def _refused(call, code: grpc.StatusCode, words: str) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        call()
    assert refused.value.code() == code, refused.value.details()
    assert words in refused.value.details()


@pytest.mark.skipif(not criu.node_problem(), reason="CRIU runs on this node: the tests below checkpoint for real")
def test_a_node_criu_cannot_run_on_is_named(node, tmp_path: Path) -> None:
    pod = Pod(node, tmp_path)
    container = pod.run("counter", COUNTER)
    _refused(
        lambda: _checkpoint(pod, container, tmp_path / "c.tar"),
        grpc.StatusCode.FAILED_PRECONDITION,
        f"containers cannot be checkpointed on this node: {criu.node_problem()}",
    )
    assert not (tmp_path / "c.tar").exists()
    assert pod.status(container).state == cri.CONTAINER_RUNNING
    assert "cannot be checkpointed on this node" in node.log()


def test_what_cannot_be_checkpointed_or_restored(node, tmp_path: Path) -> None:
    pod = Pod(node, tmp_path / "runc")
    created = pod.create("created", ["sleep", "300"])
    _refused(lambda: _checkpoint(pod, created, Path("relative.tar")), grpc.StatusCode.INVALID_ARGUMENT, "absolute")
    (tmp_path / "taken.tar").write_text("")
    _refused(lambda: _checkpoint(pod, created, tmp_path / "taken.tar"), grpc.StatusCode.ALREADY_EXISTS, "exists")
    _refused(
        lambda: _checkpoint(pod, created, tmp_path / "c.tar"), grpc.StatusCode.FAILED_PRECONDITION, "is not running"
    )
    process_pod = Pod(node, tmp_path / "proc", handler="proc", name="p", uid="uid-p")
    plain = process_pod.run("plain", ["sleep", "300"])
    _refused(
        lambda: _checkpoint(process_pod, plain, tmp_path / "c.tar"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "runtime handler 'proc' cannot checkpoint containers",
    )
    # an archive to restore from is hostile input: not a tar, a link in it, no process images
    (tmp_path / "not.tar").write_text("plain text")
    with tarfile.open(tmp_path / "link.tar", "w") as archive:
        config = tmp_path / "config.dump"
        config.write_text('{"config": {"image": {"image": "test/busybox:1"}}, "image_id": "x"}')
        archive.add(config, arcname="config.dump")
        link = tarfile.TarInfo("checkpoint/escape")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc"
        archive.addfile(link)
    for archive_path, words in (
        (tmp_path / "not.tar", "is not a checkpoint archive"),
        (tmp_path / "link.tar", "is a link"),
        (tmp_path / "absent.tar", "No such file"),
    ):
        _refused(lambda path=archive_path: _create_from(pod, "r", path), grpc.StatusCode.INVALID_ARGUMENT, words)
    _refused(
        lambda: _create_from(process_pod, "restored", tmp_path / "link.tar"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "cannot restore",
    )
    assert len(node.runtime.ListContainers(cri.ListContainersRequest()).containers) == 2  # nothing left of the rest


@pytest.mark.parametrize("leave_running", [False, True])
@needs_criu
def test_a_counter_resumes_in_another_pod_with_its_files(daemon_factory, shimhub_registry, tmp_path, leave_running):
    extra = "" if leave_running else "[checkpoints]\nleave_running = false\n"
    node = _daemon(daemon_factory, shimhub_registry, extra)
    first = Pod(node, tmp_path / "first", name="first", uid="uid-first")
    counter = first.run("counter", COUNTER)
    wait_for(lambda: len(_counted(first, "counter")) >= 3, 30)
    before = _counted(first, "counter")[-1]
    archive = tmp_path / "counter.tar"
    _checkpoint(first, counter, archive)
    after = _counted(first, "counter")[-1]
    with tarfile.open(archive) as opened:
        names = opened.getnames()
        diff = opened.extractfile("rootfs-diff.tar")
        assert diff is not None
        with tarfile.open(fileobj=diff) as changes:
            assert "tmp/before" in changes.getnames()
    assert {"config.dump", "spec.dump", "rootfs-diff.tar", "checkpoint"} <= set(names)
    assert any(name.startswith("checkpoint/pages-") for name in names)
    if leave_running:  # the original goes on counting
        wait_for(lambda: _counted(first, "counter")[-1] > after + 2, 30)
        assert first.status(counter).state == cri.CONTAINER_RUNNING
    else:  # stopped by the checkpoint: what it counted last is what the checkpoint holds
        wait_for(lambda: first.status(counter).state == cri.CONTAINER_EXITED, 30)
        before = after = _counted(first, "counter")[-1]
    second = Pod(node, tmp_path / "second", name="second", uid="uid-second")
    restored = _create_from(second, "restored", archive)
    assert second.status(restored).image.image.endswith(IMAGE)
    second.rt.StartContainer(cri.StartContainerRequest(container_id=restored), timeout=180)
    wait_for(lambda: len(_counted(second, "restored")) >= 2, 60)
    resumed = _counted(second, "restored")
    assert before + 1 <= resumed[0] <= after + 1, (before, after, resumed)  # where it was, not from 1
    assert resumed[1] == resumed[0] + 1
    assert exec_sync(second, restored, "cat", "/tmp/before").stdout == b"written-before\n"
    answer = second.rt.ContainerStatus(cri.ContainerStatusRequest(container_id=restored, verbose=True))
    pid = json.loads(answer.info["info"])["runtime_data"]["pid"]
    assert restored in Path(f"/proc/{pid}/cgroup").read_text(), "the restored process is not in its own cgroup"
    second.rt.StopContainer(cri.StopContainerRequest(container_id=restored, timeout=0), timeout=60)
    second.rt.RemoveContainer(cri.RemoveContainerRequest(container_id=restored), timeout=60)
    unpacked = node.root / "state" / "checkpoints"
    wait_for(lambda: not list(unpacked.glob("*")), 30)  # removed after RemoveContainer answered, with the container

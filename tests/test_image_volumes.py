"""Image volumes (CRI Mount.image, KEP 4639): an image's content mounted read-only into a container."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from shimhub.testing.daemon import Pod, wait_for
from shimhub_proto.cri.v1 import api_pb2 as cri
from tests.conftest import NEEDS_ROOT
from tests.test_runc import exec_sync, runc_config

pytestmark = NEEDS_ROOT


@pytest.fixture
def node(daemon_factory, registry):
    daemon = daemon_factory(runc_config(registry)).start()
    for image in ("test/busybox:1", "test/plain:1"):
        daemon.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=image)))
    return daemon


def _volume(image: str, path: str = "/vol", sub_path: str = "") -> cri.Mount:
    return cri.Mount(container_path=path, image=cri.ImageSpec(image=image), image_sub_path=sub_path, readonly=True)


def _layers(node) -> list[str]:
    return sorted(p.name for p in (node.root / "storage" / "overlay" / "layers").iterdir())


def test_an_image_is_mounted_read_only_stays_in_use_and_survives_a_restart(node, tmp_path: Path) -> None:
    pod = Pod(node, tmp_path)
    root = cri.LinuxContainerConfig(security_context=cri.LinuxContainerSecurityContext(run_as_user=cri.Int64Value()))
    container = pod.run("c", ["sleep", "300"], mounts=[_volume("test/plain:1")], linux=root)
    assert exec_sync(pod, container, "cat", "/vol/only.txt").stdout == b"plain layer\n"
    refused = pod.rt.ExecSync(cri.ExecSyncRequest(container_id=container, cmd=["touch", "/vol/new"], timeout=5))
    assert refused.exit_code != 0 and b"Read-only file system" in refused.stderr
    layers = _layers(node)
    node.images.RemoveImage(cri.RemoveImageRequest(image=cri.ImageSpec(image="test/plain:1")))
    listed = node.images.ListImages(cri.ListImagesRequest()).images
    assert all("test/plain" not in tag for image in listed for tag in image.repo_tags)
    assert _layers(node) == layers, "RemoveImage took the layers of a mounted image volume"
    node.restart()
    assert exec_sync(pod, container, "cat", "/vol/only.txt").stdout == b"plain layer\n"
    pod.rt.RemoveContainer(cri.RemoveContainerRequest(container_id=container))
    # collected after the call, off the RemoveContainer path
    wait_for(lambda: len(_layers(node)) < len(layers), 10)  # the removed image's layers go after their last user


def test_a_sub_path_of_an_image(node, tmp_path: Path) -> None:
    pod = Pod(node, tmp_path)
    container = pod.run("c", ["sleep", "300"], mounts=[_volume("test/busybox:1", sub_path="srv")])
    assert exec_sync(pod, container, "cat", "/vol/hello.txt").stdout == b"hello from the image\n"
    for bad, why in (("../etc", "without '..'"), ("nope", "does not exist"), ("/srv", "relative path")):
        with pytest.raises(grpc.RpcError) as refused:
            pod.create(f"bad{len(why)}", ["true"], mounts=[_volume("test/busybox:1", sub_path=bad)])
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert why in refused.value.details()


def test_an_image_not_on_the_node_is_named(node, tmp_path: Path) -> None:
    pod = Pod(node, tmp_path)
    with pytest.raises(grpc.RpcError) as missing:
        pod.create("c", ["true"], mounts=[_volume("test/never-pulled:7")])
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert "'test/never-pulled:7'" in missing.value.details()


def test_the_status_names_the_image_mounted_and_a_writable_image_volume_is_refused(node, tmp_path: Path) -> None:
    pod = Pod(node, tmp_path)
    pulled = node.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image="test/plain:1"))).image_ref
    container = pod.create("c", ["sleep", "300"], mounts=[_volume("test/plain:1")])
    (mount,) = [m for m in pod.status(container).mounts if m.container_path == "/vol"]
    assert (mount.image.image, mount.image.image_ref) == ("test/plain:1", pulled)
    writable = _volume("test/plain:1")
    writable.readonly = False
    with pytest.raises(grpc.RpcError) as refused:
        pod.create("w", ["true"], mounts=[writable])
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "has readonly = false: image volumes are read-only" in refused.value.details()

"""Pulling from a real registry, the image store, and container root filesystems from images."""

from __future__ import annotations

import base64
import json
import threading
from pathlib import Path

import grpc
import pytest

from shimhub import mountinfo
from shimhub.testing.daemon import host_network, pod_config, wait_for
from shimhub_proto.cri.v1 import api_pb2 as cri
from tests.conftest import NEEDS_ROOT, image_config

pytestmark = NEEDS_ROOT


def pull(daemon, image: str, auth: cri.AuthConfig | None = None) -> str:
    request = cri.PullImageRequest(image=cri.ImageSpec(image=image), auth=auth)
    return daemon.images.PullImage(request).image_ref


def pull_error(daemon, image: str, auth: cri.AuthConfig | None = None):
    with pytest.raises(grpc.RpcError) as caught:
        pull(daemon, image, auth)
    return caught.value.code(), caught.value.details()


def status(daemon, image: str) -> cri.ImageStatusResponse:
    return daemon.images.ImageStatus(cri.ImageStatusRequest(image=cri.ImageSpec(image=image), verbose=True))


@pytest.fixture
def daemon(daemon_factory, registry):
    return daemon_factory(image_config(registry)).start()


def test_pull_short_name_and_status(daemon, registry) -> None:
    image_ref = pull(daemon, "test/busybox:1")
    assert image_ref == registry.busybox["config"]
    found = status(daemon, "test/busybox:1")
    assert found.image.id == image_ref
    assert list(found.image.repo_tags) == [f"{registry.open.host}/test/busybox:1"]
    assert list(found.image.repo_digests) == [f"{registry.open.host}/test/busybox@{registry.busybox['manifest']}"]
    assert found.image.uid.value == 1000
    assert found.image.size > 500_000  # busybox
    assert json.loads(found.info["info"])["config"]["config"]["Cmd"] == ["cat", "/srv/hello.txt"]
    # the same image by id, id prefix and digest reference
    for name in (image_ref, image_ref[7:19], f"{registry.open.host}/test/busybox@{registry.busybox['manifest']}"):
        assert status(daemon, name).image.id == image_ref
    assert not status(daemon, "test/busybox:2").HasField("image")
    listed = daemon.images.ListImages(cri.ListImagesRequest()).images
    assert [image.id for image in listed] == [image_ref]


def test_pull_by_digest_and_tag_with_digest(daemon, registry) -> None:
    pinned = f"{registry.open.host}/test/busybox@{registry.busybox['manifest']}"
    assert pull(daemon, pinned) == registry.busybox["config"]
    both = f"{registry.open.host}/test/busybox:1@{registry.busybox['manifest']}"
    assert pull(daemon, both) == registry.busybox["config"]
    wrong = f"{registry.open.host}/test/busybox@sha256:{'0' * 64}"
    code, details = pull_error(daemon, wrong)
    assert code == grpc.StatusCode.NOT_FOUND
    assert f"not found in registry {registry.open.host}" in details


def test_docker_schema2_uncompressed_zstd_and_username(daemon, registry) -> None:
    assert pull(daemon, "test/docker:1") == registry.docker["config"]
    assert status(daemon, "test/docker:1").image.username == "app"
    assert pull(daemon, "test/plain:1") == registry.plain["config"]
    assert pull(daemon, "test/zstd:1") == registry.zstd["config"]
    layers = list((daemon.root / "storage" / "vfs" / "layers").iterdir())
    assert any((layer / "z.txt").read_text() == "zstd layer\n" for layer in layers)


def test_platform_is_picked_from_an_index(daemon, registry) -> None:
    assert pull(daemon, "test/multi:1") == registry.multi_amd64["config"]
    code, details = pull_error(daemon, "test/armonly:1")
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert details.endswith("no image for platform linux/amd64; available: linux/arm64, linux/s390x")


def test_bad_references(daemon) -> None:
    code, details = pull_error(daemon, "Not A Reference")
    assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, "invalid image reference 'Not A Reference'")


def test_ambiguous_short_name_is_refused(daemon_factory, registry) -> None:
    config = image_config(registry).replace(
        f'search_registries = ["{registry.open.host}"]',
        f'search_registries = ["{registry.open.host}", "{registry.basic.host}"]',
    )
    daemon = daemon_factory(config).start()
    code, details = pull_error(daemon, "test/busybox:1")
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == (
        f"short image name 'test/busybox:1' is ambiguous: it could be any of {registry.open.host}/test/busybox:1, "
        f"{registry.basic.host}/test/busybox:1; qualify it"
    )


def test_basic_auth(daemon, registry) -> None:
    image = f"{registry.basic.host}/test/busybox:1"
    code, details = pull_error(daemon, image)
    assert (code, details) == (
        grpc.StatusCode.UNAUTHENTICATED,
        f"registry {registry.basic.host} needs credentials for repository:test/busybox:pull",
    )
    code, details = pull_error(daemon, image, cri.AuthConfig(username=registry.USER, password="wrong"))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert details == f"registry {registry.basic.host} refused the credentials for repository:test/busybox:pull"
    auth = base64.b64encode(f"{registry.USER}:{registry.PASSWORD}".encode()).decode()
    assert pull(daemon, image, cri.AuthConfig(auth=auth)) == registry.busybox["config"]
    assert registry.PASSWORD not in daemon.log()
    assert auth not in daemon.log()


def test_credentials_file(daemon_factory, registry, tmp_path: Path) -> None:
    credentials = tmp_path / "auth.json"
    secret = base64.b64encode(f"{registry.USER}:{registry.PASSWORD}".encode()).decode()
    credentials.write_text(json.dumps({"auths": {registry.basic.host: {"auth": secret}}}))
    daemon = daemon_factory(image_config(registry, extra=f'credentials_file = "{credentials}"')).start()
    assert pull(daemon, f"{registry.basic.host}/test/busybox:1") == registry.busybox["config"]


def test_bearer_token_flow(daemon, registry) -> None:
    image = f"{registry.token.host}/test/docker:1"
    code, _ = pull_error(daemon, image)
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert (
        pull(daemon, image, cri.AuthConfig(username=registry.USER, password=registry.PASSWORD))
        == (registry.docker["config"])
    )
    assert {
        "scope": "repository:test/docker:pull",
        "service": "shimhub-test-registry",
    } in registry.token_service.requests


def test_corrupt_blob_fails_naming_it_and_keeps_nothing(daemon, registry) -> None:
    code, details = pull_error(daemon, "test/corrupt:1")
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith(f"layer {registry.corrupt_layer}: content does not match its digest")
    content = daemon.root / "state" / "images" / "content"
    assert not (content / "blobs" / "sha256" / registry.corrupt_layer[7:]).exists()
    assert list((content / "ingest").iterdir()) == []
    assert not status(daemon, "test/corrupt:1").HasField("image")


def test_layer_escaping_its_directory_is_refused(daemon, tmp_path: Path) -> None:
    code, details = pull_error(daemon, "test/escape:1")
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == "layer entry '../../escaped-from-layer' points outside the layer"
    assert not list(daemon.root.rglob("escaped-from-layer"))
    assert not list(daemon.root.parent.glob("escaped-from-layer"))


def test_mirrors_are_tried_in_order(daemon_factory, registry) -> None:
    dead = "127.0.0.1:9"  # discard port: nothing listens
    extra = f'[images.registries."{dead}"]\ninsecure = true\nmirrors = ["127.0.0.1:1", "{registry.open.host}"]\n'
    config = image_config(registry).replace("[images.registries", extra + "[images.registries", 1)
    daemon = daemon_factory(config + '[images.registries."127.0.0.1:1"]\ninsecure = true\n').start()
    assert pull(daemon, f"{dead}/test/busybox:1") == registry.busybox["config"]


def test_concurrent_pulls_share_downloads(daemon, registry) -> None:
    layer = registry._layer_digests("test/docker", registry.docker["manifest"])[0]
    log = Path(registry.open.log.name)
    before = log.read_text().count(f"GET /v2/test/docker/blobs/{layer}")
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(pull(daemon, "test/docker:1"))) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == [registry.docker["config"]] * 6
    assert log.read_text().count(f"GET /v2/test/docker/blobs/{layer}") == before + 1


def test_remove_image_and_garbage(daemon, registry) -> None:
    image_ref = pull(daemon, "test/busybox:1")
    layers = daemon.root / "storage" / "vfs" / "layers"
    assert len(list(layers.iterdir())) == 2
    daemon.images.RemoveImage(cri.RemoveImageRequest(image=cri.ImageSpec(image="test/busybox:1")))
    daemon.images.RemoveImage(cri.RemoveImageRequest(image=cri.ImageSpec(image=image_ref)))  # idempotent
    assert not status(daemon, image_ref).HasField("image")
    assert list(layers.iterdir()) == []
    assert list((daemon.root / "state/images/content/blobs/sha256").iterdir()) == []


def run_container(daemon, tmp_path: Path, image: str):
    rt = daemon.runtime
    pod = pod_config(log_directory=str(tmp_path / "logs"), linux=host_network())
    pod_id = rt.RunPodSandbox(cri.RunPodSandboxRequest(config=pod)).pod_sandbox_id
    config = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="app"), image=cri.ImageSpec(image=image), log_path="app.log"
    )
    container_id = rt.CreateContainer(cri.CreateContainerRequest(pod_sandbox_id=pod_id, config=config)).container_id
    return pod_id, container_id


@pytest.mark.parametrize("driver", ["vfs", "overlay", "btrfs"])
def test_container_runs_from_its_image_on_each_driver(
    daemon_factory, registry, tmp_path: Path, driver: str, request: pytest.FixtureRequest
) -> None:
    daemon = daemon_factory(image_config(registry, driver))
    if driver == "btrfs":
        root = request.getfixturevalue("btrfs_root") / tmp_path.name
        dropin = daemon.root / "shimhub.d" / "99-test-paths.toml"
        dropin.write_text(dropin.read_text().replace(str(daemon.root / "storage"), str(root)))
    daemon.start()
    rt = daemon.runtime
    image_ref = pull(daemon, "test/busybox:1")
    pod_id, container_id = run_container(daemon, tmp_path, "test/busybox:1")
    info = json.loads(
        rt.ContainerStatus(cri.ContainerStatusRequest(container_id=container_id, verbose=True)).info["info"]
    )
    rootfs = Path(info["rootfs"])
    assert (rootfs / "bin" / "busybox").is_file()
    assert not (rootfs / "etc" / "group").exists()  # whited out by the second layer
    assert rt.ContainerStatus(cri.ContainerStatusRequest(container_id=container_id)).status.image_id == image_ref
    rt.StartContainer(cri.StartContainerRequest(container_id=container_id))
    wait_for(
        lambda: (
            rt.ContainerStatus(cri.ContainerStatusRequest(container_id=container_id)).status.state
            == cri.CONTAINER_EXITED
        )
    )
    assert (tmp_path / "logs" / "app.log").read_text().endswith(" stdout F hello from the image\n")

    # Removing the image while the container uses it keeps the container's layers.
    daemon.images.RemoveImage(cri.RemoveImageRequest(image=cri.ImageSpec(image=image_ref)))
    assert not status(daemon, image_ref).HasField("image")
    assert (rootfs / "bin" / "busybox").is_file()
    fs = daemon.images.ImageFsInfo(cri.ImageFsInfoRequest())
    assert fs.image_filesystems[0].used_bytes.value > 500_000
    rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    assert not rootfs.exists()
    storage_root = Path(info["rootfs"]).parents[2] if driver != "btrfs" else rootfs.parents[1]
    # collected after the call, off the RemoveContainer path
    wait_for(lambda: list((storage_root / "layers").iterdir()) == [], 10)
    assert mountinfo.under(str(rootfs)) == []


def test_missing_image_and_interrupted_pull(daemon_factory, registry, tmp_path: Path) -> None:
    daemon = daemon_factory(image_config(registry)).start()
    pod_id = daemon.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=pod_config(linux=host_network())))
    config = cri.ContainerConfig(metadata=cri.ContainerMetadata(name="c"), image=cri.ImageSpec(image="test/nope:1"))
    with pytest.raises(grpc.RpcError) as missing:
        daemon.runtime.CreateContainer(cri.CreateContainerRequest(pod_sandbox_id=pod_id.pod_sandbox_id, config=config))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert missing.value.details() == "image 'test/nope:1' is not present on the node; pull it first"
    image_ref = pull(daemon, "test/docker:1")
    daemon.stop()
    partial = daemon.root / "state" / "images" / "content" / "ingest" / "deadbeef.123"
    partial.write_bytes(b"half a blob")
    daemon.start()
    assert not partial.exists()
    assert status(daemon, "test/docker:1").image.id == image_ref

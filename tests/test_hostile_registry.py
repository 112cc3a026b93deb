"""Pulls from a hostile registry: every read bounded in bytes and time, the daemon serving throughout."""

from __future__ import annotations

import time

import grpc
import psutil
import pytest

from shimhub_proto.cri.v1 import api_pb2 as cri
from tests import hostile_registry as hostile
from tests.conftest import NEEDS_ROOT, image_config

pytestmark = NEEDS_ROOT


@pytest.fixture
def evil():
    server = hostile.HostileRegistry(
        {
            "evil/endless": hostile.endless_manifest,
            "evil/declared": hostile.declared_huge,
            "evil/drip": hostile.drip,
            "evil/config": hostile.oversized_config,
            "evil/redos": hostile.redos_challenge,
            "evil/layers": hostile.many_layers,
        }
    )
    yield server
    server.stop()


@pytest.fixture
def node(daemon_factory, registry, evil):
    extra = f'timeout = 3.0\n[images.registries."{evil.host}"]\ninsecure = true\n'
    return daemon_factory(image_config(registry, extra=extra)).start()


def _pull(node, image: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as failed:
        node.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=image)), timeout=60)
    return failed.value


@pytest.mark.parametrize(
    ("repository", "code", "says"),
    [
        ("evil/endless", grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than 4194304 bytes"),
        ("evil/declared", grpc.StatusCode.RESOURCE_EXHAUSTED, "is 1073741824 bytes"),
        ("evil/drip", grpc.StatusCode.DEADLINE_EXCEEDED, "did not arrive in time"),
        ("evil/config", grpc.StatusCode.RESOURCE_EXHAUSTED, "the image config is 209715200 bytes"),
        ("evil/redos", grpc.StatusCode.UNAUTHENTICATED, "asks for unsupported authentication 'Bearer'"),
        ("evil/layers", grpc.StatusCode.INVALID_ARGUMENT, "the image has 600 layers; at most 128"),
    ],
)
def test_a_hostile_registry_costs_bounded_time_and_memory(node, evil, repository, code, says) -> None:
    daemon = psutil.Process(node.proc.pid)
    before = daemon.memory_info().rss
    started = time.monotonic()
    failed = _pull(node, f"{evil.host}/{repository}:1")
    took = time.monotonic() - started
    assert (failed.code(), says in failed.details()) == (code, True), failed.details()
    assert took < 20, f"the pull took {took:.1f} s"
    assert daemon.memory_info().rss - before < 100 << 20
    assert node.runtime.Version(cri.VersionRequest(), timeout=5).runtime_name == "shimhub"
    if repository in ("evil/config", "evil/layers"):
        assert not any("/blobs/" in path for path in evil.requests), "a blob of a refused image was fetched"


def test_the_redos_challenge_does_not_freeze_other_calls(node, evil) -> None:
    """Python's re holds the GIL: a backtracking parse would stall every thread of the daemon."""
    pull = node.images.PullImage.future(cri.PullImageRequest(image=cri.ImageSpec(image=f"{evil.host}/evil/redos:1")))
    answered = [node.runtime.Version(cri.VersionRequest(), timeout=5) for _ in range(5)]
    assert len(answered) == 5
    with pytest.raises(grpc.RpcError):
        pull.result(timeout=30)


def test_a_token_obtained_with_credentials_serves_no_one_else(node, registry) -> None:
    image = f"{registry.token.host}/test/docker:1"
    auth = cri.AuthConfig(username=registry.USER, password=registry.PASSWORD)
    node.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=image), auth=auth))
    node.images.RemoveImage(cri.RemoveImageRequest(image=cri.ImageSpec(image=image)))
    anonymous = _pull(node, image)
    assert anonymous.code() == grpc.StatusCode.UNAUTHENTICATED
    wrong = cri.AuthConfig(username=registry.USER, password="wrong")
    with pytest.raises(grpc.RpcError) as refused:
        node.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=image), auth=wrong))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_every_mirror_and_its_answer_are_named_when_all_fail(daemon_factory, registry, evil) -> None:
    dead = "127.0.0.1:9"  # discard port: nothing listens
    extra = (
        f'[images.registries."{registry.open.host}"]\ninsecure = true\nmirrors = ["{evil.host}", "{dead}"]\n'
        f'[images.registries."{evil.host}"]\ninsecure = true\n[images.registries."{dead}"]\ninsecure = true\n'
    )
    node = daemon_factory(
        image_config(registry).replace(f'[images.registries."{registry.open.host}"]\ninsecure = true\n', "") + extra
    ).start()
    failed = _pull(node, "test/nothing-here:1")
    assert failed.code() == grpc.StatusCode.NOT_FOUND
    assert f"{evil.host}: 404 manifest unknown" in failed.details()
    assert f"{dead}: cannot reach" in failed.details()
    assert f"{registry.open.host}: 404" in failed.details()


def test_not_found_on_every_mirror_with_the_origin_unreachable_is_not_found(daemon_factory, registry, evil) -> None:
    dead = "127.0.0.1:9"  # the origin: nothing listens
    extra = (
        f'[images.registries."{dead}"]\ninsecure = true\nmirrors = ["{evil.host}"]\n'
        f'[images.registries."{evil.host}"]\ninsecure = true\n'
    )
    node = daemon_factory(image_config(registry, extra="timeout = 3.0\n") + extra).start()
    failed = _pull(node, f"{dead}/test/nothing-here:1")
    assert failed.code() == grpc.StatusCode.NOT_FOUND, failed.details()
    assert f"{evil.host}: 404 manifest unknown" in failed.details()
    assert dead in failed.details().split("tried:")[1]


def test_a_mirror_only_registry_is_never_contacted_itself(daemon_factory, registry, evil) -> None:
    """An air-gapped node: the origin (here a registry with the image) is never asked, only its mirror."""
    extra = (
        f'[images.registries."{registry.open.host}"]\ninsecure = true\nmirrors = ["{evil.host}"]\nmirror_only = true\n'
        f'[images.registries."{evil.host}"]\ninsecure = true\n'
    )
    config = image_config(registry).replace(f'[images.registries."{registry.open.host}"]\ninsecure = true\n', "")
    node = daemon_factory(config + extra).start()
    failed = _pull(node, "test/busybox:1")
    assert failed.code() == grpc.StatusCode.NOT_FOUND
    assert failed.details().endswith(f"tried: {evil.host}: 404 manifest unknown"), failed.details()


def test_a_layer_path_too_long_for_the_kernel_is_refused(node, registry) -> None:
    from shimhub.testing.layers import tar
    from shimhub.testing.registry import Pusher

    deep = "/".join(["d" * 200] * 25) + "/file"  # 5,000 characters: past PATH_MAX
    Pusher(registry.open).image("test/deep", "1", [tar((deep, "file", "x"))])
    failed = _pull(node, "test/deep:1")
    assert failed.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "longer than 4096 bytes" in failed.details()  # refused by the tar reader, before the kernel


def test_a_huge_request_field_is_not_echoed_whole(node) -> None:
    """A 1 MiB image name comes back as a short prefix, not in a status message clients cannot read."""
    failed = _pull(node, "a" * (1 << 20))
    assert failed.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(failed.details()) < 5000
    assert node.runtime.Version(cri.VersionRequest(), timeout=5).runtime_name == "shimhub"

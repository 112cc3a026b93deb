"""Hostile input: every unary RPC fuzzed with malformed and extreme values, oversized messages,
hostile images, and what a user other than root can reach.

The fuzzing builds requests from the CRI schema itself (every field of every request message,
nested messages included), drawing each value from pools of hostile values chosen by the field's
type and name. Image references only ever point at the test registry on 127.0.0.1 or at nothing.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import subprocess
import tarfile
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shimhub.server import MAX_MESSAGE_BYTES
from shimhub.testing.daemon import Daemon, pod_config
from shimhub.testing.layers import tar
from shimhub.testing.registry import Pusher
from shimhub_proto.cri.v1 import api_pb2 as cri
from tests.conftest import NEEDS_ROOT, assert_image_store_empty, image_config

pytestmark = NEEDS_ROOT

STANDING_POD, STANDING_CONTAINER, STANDING_IMAGE = "standing", "standing", "test/busybox:1"
HUGE = "a" * 70_000
STRINGS = ["", "x", "standing", "../", "../../etc/passwd", "/etc/shadow", "a" * 300, HUGE, "\x00", "é", "-", " "]
PATHS = ["", "relative/log", "../../../../etc/cron.d/x", "/etc/shadow", "/", "a/../../..", "/proc/1/root", "\x00", HUGE]
INTS = {
    FieldDescriptor.TYPE_INT32: [0, 1, -1, 2**31 - 1, -(2**31)],
    FieldDescriptor.TYPE_INT64: [0, 1, -1, 2**63 - 1, -(2**63), 10**12],
    FieldDescriptor.TYPE_UINT32: [0, 1, 2**32 - 1],
    FieldDescriptor.TYPE_UINT64: [0, 1, 2**64 - 1],
}
FLOATS = [0.0, -1.0, math.nan, math.inf, 1e308]
#: Ways into shimhub's state that a request may try, for fields that name a file.
PATH_FIELDS = {"log_directory", "log_path", "host_path", "container_path", "path", "mount_path"}
ERRORS_DESERVED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.UNAVAILABLE,  # a registry that is not there (127.0.0.1:1)
}


class FuzzNode:
    """A daemon with a standing pod, container and image that every case may aim at."""

    def __init__(self, daemon: Daemon, registry_host: str) -> None:
        self.daemon = daemon
        self.registry_host = registry_host
        self.cases: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()
        self.pod_id = self.container_id = self.image_id = ""
        self.ensure_standing()

    def ensure_standing(self) -> None:
        """(Re)create the standing objects a case removed or stopped: that was its right."""
        rt, images = self.daemon.runtime, self.daemon.images
        self.image_id = images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=STANDING_IMAGE))).image_ref
        pods = {p.metadata.name: p for p in rt.ListPodSandbox(cri.ListPodSandboxRequest()).items}
        pod = pods.get(STANDING_POD)
        if pod is None or pod.state != cri.SANDBOX_READY:
            if pod is not None:
                rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod.id))
            request = cri.RunPodSandboxRequest(config=pod_config(name=STANDING_POD))
            self.pod_id = rt.RunPodSandbox(request).pod_sandbox_id
        else:
            self.pod_id = pod.id
        containers = rt.ListContainers(cri.ListContainersRequest()).containers
        mine = [c for c in containers if c.pod_sandbox_id == self.pod_id and c.state == cri.CONTAINER_RUNNING]
        if mine:
            self.container_id = mine[0].id
            return
        for container in containers:
            if container.pod_sandbox_id == self.pod_id:
                rt.RemoveContainer(cri.RemoveContainerRequest(container_id=container.id))
        config = cri.ContainerConfig(metadata=cri.ContainerMetadata(name=STANDING_CONTAINER), command=["sleep", "3600"])
        request = cri.CreateContainerRequest(pod_sandbox_id=self.pod_id, config=config)
        self.container_id = rt.CreateContainer(request).container_id
        rt.StartContainer(cri.StartContainerRequest(container_id=self.container_id))

    def snapshot(self) -> tuple[Any, ...]:
        """Everything a request could change: pods, containers, images, with their states."""
        rt, images = self.daemon.runtime, self.daemon.images
        return (
            sorted((p.id, p.state) for p in rt.ListPodSandbox(cri.ListPodSandboxRequest()).items),
            sorted((c.id, c.state) for c in rt.ListContainers(cri.ListContainersRequest()).containers),
            sorted(i.id for i in images.ListImages(cri.ListImagesRequest()).images),
        )

    def remove_new(self, before: tuple[Any, ...]) -> None:
        """Remove what an accepted case created (pods, containers, images)."""
        pods, containers, images = (dict(part) if i < 2 else part for i, part in enumerate(before))
        now_pods, now_containers, now_images = self.snapshot()
        rt = self.daemon.runtime
        for container_id, _ in now_containers:
            if container_id not in containers:
                rt.RemoveContainer(cri.RemoveContainerRequest(container_id=container_id))
        for pod_id, _ in now_pods:
            if pod_id not in pods:
                rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
        for image_id in now_images:
            if image_id not in images:
                self.daemon.images.RemoveImage(cri.RemoveImageRequest(image=cri.ImageSpec(image=image_id)))

    def ids(self) -> list[str]:
        """Ids that reach something, that almost do, and that cannot."""
        ids = [self.pod_id, self.container_id, self.image_id]
        return [*ids, *(i[:1] for i in ids), *(i[:6] for i in ids), "0" * 64, "", "../x", HUGE, "\x00"]

    def references(self) -> list[str]:
        """Image references: present, absent, malformed, and a registry port nobody listens on (loopback)."""
        host = self.registry_host
        return [
            STANDING_IMAGE,
            f"{host}/{STANDING_IMAGE}",
            f"{host}/test/absent:1",
            f"{host}/test/busybox@sha256:{'0' * 64}",
            "127.0.0.1:1/test/busybox:1",
            self.image_id,
            "UPPER/case:1",
            "x@sha256:short",
            "test/busybox:" + "t" * 200,
            *STRINGS,
        ]


def values(node: FuzzNode, field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    """Hostile values for one (non-repeated) field."""
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return requests(node, field.message_type, depth + 1)
    if field.type == FieldDescriptor.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values] + [99, -1])
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.sampled_from(FLOATS)
    if field.type == FieldDescriptor.TYPE_BYTES:
        return st.sampled_from([b"", b"x" * 100, b"\x00\xff"])
    if field.type in INTS:
        return st.sampled_from(INTS[field.type])
    if field.name == "image":
        return st.sampled_from(node.references())
    if field.name.endswith("id"):
        return st.sampled_from(node.ids())
    if field.name in PATH_FIELDS:
        return st.sampled_from(PATHS)
    return st.sampled_from(STRINGS)


def requests(node: FuzzNode, descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Any]:
    """Messages of `descriptor`'s type with some fields set to hostile values (nested up to 3 deep)."""
    message_class = message_factory.GetMessageClass(descriptor)
    if depth > 3:
        return st.just(message_class())

    @st.composite
    def build(draw: st.DrawFn) -> Any:
        message = message_class()
        for field in descriptor.fields:
            if not draw(st.booleans()):
                continue
            is_map = field.message_type is not None and field.message_type.GetOptions().map_entry
            if is_map:
                key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
                if value.type == FieldDescriptor.TYPE_MESSAGE:
                    continue
                entries = draw(st.dictionaries(values(node, key, depth), values(node, value, depth), max_size=3))
                getattr(message, field.name).update(entries)
            elif field.is_repeated:
                getattr(message, field.name).extend(draw(st.lists(values(node, field, depth), max_size=3)))
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                getattr(message, field.name).CopyFrom(draw(values(node, field, depth)))
            else:
                setattr(message, field.name, draw(values(node, field, depth)))
        return message

    return build()


def unary_methods() -> list[tuple[str, str]]:
    """(service, method) for every unary RPC of the CRI."""
    found = []
    for service in cri.DESCRIPTOR.services_by_name.values():
        for method in service.methods:
            if not (method.client_streaming or method.server_streaming):
                found.append((service.name, method.name))
    return found


@pytest.fixture(scope="module")
def fuzz_node(registry, plugin_python: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzNode]:
    root = tmp_path_factory.mktemp("fuzz")
    daemon = Daemon(root, image_config(registry), python=plugin_python).start()
    node = FuzzNode(daemon, registry.open.host)
    yield node
    total = sum(node.cases.values())
    print(f"\nfuzzed {total} requests over {len(node.cases)} RPCs: {dict(node.cases)}")
    print(f"answers: {dict(node.outcomes.most_common())}")
    try:
        assert daemon.remove_everything() == {}
    finally:
        daemon.stop()
        daemon.kill()


@pytest.mark.parametrize(("service", "method"), unary_methods(), ids=lambda value: value)
def test_every_rpc_answers_hostile_requests_with_the_right_status(fuzz_node: FuzzNode, service: str, method: str):
    descriptor = cri.DESCRIPTOR.services_by_name[service].methods_by_name[method]
    stub = fuzz_node.daemon.runtime if service == "RuntimeService" else fuzz_node.daemon.images
    call = getattr(stub, method)

    @settings(
        max_examples=40,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(requests(fuzz_node, descriptor.input_type))
    def case(request: Any) -> None:
        fuzz_node.cases[method] += 1
        before = fuzz_node.snapshot()
        try:
            call(request, timeout=60)
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
            fuzz_node.outcomes[code.name] += 1
            assert code in ERRORS_DESERVED, f"{method}({request!r:.300}) -> {code.name}: {details}"
            assert details.strip() and "Traceback" not in details, f"{method}: unclear message {details!r}"
            assert fuzz_node.daemon.proc.poll() is None, "the daemon died"
            after = fuzz_node.snapshot()
            assert after == before, f"{method} was refused ({code.name}: {details}) yet changed the node"
        else:
            fuzz_node.outcomes["OK"] += 1
            fuzz_node.remove_new(before)
        fuzz_node.ensure_standing()

    case()


def test_oversized_message_is_refused_as_too_large(fuzz_node: FuzzNode) -> None:
    config = pod_config(name="big", annotations={"blob": "x" * (MAX_MESSAGE_BYTES + 1)})
    before = fuzz_node.snapshot()
    with pytest.raises(grpc.RpcError) as refused:
        fuzz_node.daemon.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert fuzz_node.snapshot() == before


# -- hostile images -------------------------------------------------------------------------------

MAX_LAYER_BYTES = 8 << 20


def manifest_of(registry_host: str, repository: str, tag: str) -> dict[str, Any]:
    request = urllib.request.Request(
        f"http://{registry_host}/v2/{repository}/manifests/{tag}",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def bomb() -> bytes:
    """A layer tar holding one file of zeros well past the node's limit: a few hundred KiB gzipped."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as archive:
        info = tarfile.TarInfo("zeros")
        info.size = 4 * MAX_LAYER_BYTES
        archive.addfile(info, io.BytesIO(bytes(info.size)))
    return data.getvalue()


class HostileImages:
    """Hostile images pushed to the test registry, and a directory they aim to write into."""

    def __init__(self, registry, outside: Path) -> None:
        self.outside = outside
        push = Pusher(registry.open)
        #: name -> (reference, expected code, words the message must hold)
        self.refused: dict[str, tuple[str, grpc.StatusCode, str]] = {}
        layers = {
            "path escape": ([tar(("../../../escaped", "file", "x"))], grpc.StatusCode.INVALID_ARGUMENT, "escaped"),
            "hardlink escape": ([tar(("pw", "hardlink", "/etc/shadow"))], grpc.StatusCode.INVALID_ARGUMENT, "shadow"),
            "block device": ([tar(("disk", "blockdev", (8, 0)))], grpc.StatusCode.INVALID_ARGUMENT, "device"),
            "character device": ([tar(("mem", "chardev", (1, 1)))], grpc.StatusCode.INVALID_ARGUMENT, "device"),
            "decompression bomb": ([bomb()], grpc.StatusCode.RESOURCE_EXHAUSTED, "max_layer_bytes"),
        }
        for number, (name, (image_layers, code, words)) in enumerate(layers.items()):
            push.image("test/hostile", str(number), image_layers)
            self.refused[name] = (f"test/hostile:{number}", code, words)
        # A registry that lies: the manifest announces sizes the blob does not have.
        push.image("test/sizes", "honest", [tar(("data", "file", "twelve bytes"))])
        document = manifest_of(registry.open.host, "test/sizes", "honest")
        for tag, delta, words in (("shorter", -7, "more than"), ("longer", +7, "manifest says")):
            lying = json.loads(json.dumps(document))
            lying["layers"][0]["size"] += delta
            push.manifest("test/sizes", tag, lying)
            self.refused[f"size lie ({tag})"] = (f"test/sizes:{tag}", grpc.StatusCode.INVALID_ARGUMENT, words)
        self.refused["digest lie"] = ("test/corrupt:1", grpc.StatusCode.INVALID_ARGUMENT, "")
        # Symlinks out of the image, absolute and relative, then writes through them.
        links = tar(("etc", "dir", None), ("etc/out", "symlink", str(outside)), ("etc/up", "symlink", "../../../.."))
        writes = tar(("etc/out/planted", "file", "x"), ("etc/up/planted-too", "file", "x"))
        push.image("test/hostile", "symlinks", [links, writes])
        self.symlinks = "test/hostile:symlinks"


@pytest.fixture(scope="module")
def hostile_images(registry, tmp_path_factory: pytest.TempPathFactory) -> HostileImages:
    return HostileImages(registry, tmp_path_factory.mktemp("outside"))


def hostile_node(daemon_factory, registry, driver: str) -> Daemon:
    """A daemon that refuses layers unpacking to more than MAX_LAYER_BYTES."""
    config = image_config(registry, driver).replace("[images]\n", f"[images]\nmax_layer_bytes = {MAX_LAYER_BYTES}\n", 1)
    return daemon_factory(config).start()


@pytest.mark.parametrize("driver", ["vfs", "overlay"])
@pytest.mark.parametrize(
    "name",
    [
        "path escape",
        "hardlink escape",
        "block device",
        "character device",
        "decompression bomb",
        "size lie (shorter)",
        "size lie (longer)",
        "digest lie",
    ],
)
def test_hostile_image_is_refused_and_leaves_nothing(daemon_factory, registry, hostile_images, name, driver) -> None:
    daemon = hostile_node(daemon_factory, registry, driver)
    reference, code, words = hostile_images.refused[name]
    with pytest.raises(grpc.RpcError) as refused:
        daemon.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=reference)), timeout=120)
    assert refused.value.code() == code, refused.value.details()
    assert words in refused.value.details()
    assert daemon.images.ListImages(cri.ListImagesRequest()).images == []
    assert_image_store_empty(daemon, driver)
    assert not Path("/escaped").exists()


@pytest.mark.parametrize("driver", ["vfs", "overlay"])
def test_symlinks_in_an_image_lead_only_inside_it(daemon_factory, registry, hostile_images, driver) -> None:
    daemon = hostile_node(daemon_factory, registry, driver)
    request = cri.PullImageRequest(image=cri.ImageSpec(image=hostile_images.symlinks))
    image_id = daemon.images.PullImage(request, timeout=120).image_ref
    assert os.listdir(hostile_images.outside) == [], "nothing written outside the store"
    layers = daemon.root / "storage" / driver / "layers"
    planted = {p.name: p for p in layers.rglob("planted*")}
    assert set(planted) == {"planted", "planted-too"}, "the writes landed inside the image"
    assert all(layers in p.parents for p in planted.values())
    daemon.images.RemoveImage(cri.RemoveImageRequest(image=cri.ImageSpec(image=image_id)))
    assert_image_store_empty(daemon, driver)


# -- access ---------------------------------------------------------------------------------------


def as_nobody(*command: str) -> subprocess.CompletedProcess[str]:
    """Run `command` as user and group nobody, without supplementary groups."""
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
    return subprocess.run([*nobody, *command], capture_output=True, text=True, timeout=30, check=False)


def test_other_users_cannot_reach_the_socket_or_the_state(daemon, registry) -> None:
    root = daemon.root
    modes = {name: oct((root / name).stat().st_mode & 0o777) for name in ("state", "run", "storage")}
    assert modes == {"state": "0o700", "run": "0o750", "storage": "0o711"}  # run: the socket group may enter
    connect = f"import socket; socket.socket(socket.AF_UNIX).connect({str(daemon.socket)!r})"
    refused = as_nobody("python3", "-c", connect)
    assert refused.returncode != 0 and "PermissionError" in refused.stderr
    for private in (root / "state" / "sandboxes", root / "state" / "images", root / "storage"):
        listing = as_nobody("ls", str(private))
        assert listing.returncode != 0 and "Permission denied" in listing.stderr, private


def test_registry_credentials_are_never_written(daemon_factory, registry) -> None:
    daemon = daemon_factory(image_config(registry)).start()
    auth = base64.b64encode(f"{registry.USER}:{registry.PASSWORD}".encode()).decode()
    image = f"{registry.basic.host}/test/busybox:1"
    request = cri.PullImageRequest(image=cri.ImageSpec(image=image), auth=cri.AuthConfig(auth=auth))
    assert daemon.images.PullImage(request, timeout=120).image_ref == registry.busybox["config"]
    request = cri.PullImageRequest(
        image=cri.ImageSpec(image=image), auth=cri.AuthConfig(username=registry.USER, password=registry.PASSWORD)
    )
    daemon.images.PullImage(request, timeout=120)
    secrets = [registry.PASSWORD.encode(), auth.encode()]
    holders = []
    for path in daemon.root.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_size < 50 << 20:
            content = path.read_bytes()
            holders += [f"{path}: {secret!r}" for secret in secrets if secret in content]
    assert holders == [], "registry credentials written to disk"

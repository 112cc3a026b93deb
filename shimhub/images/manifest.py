"""OCI and Docker manifests, indexes, and picking the node's platform from an index."""

from __future__ import annotations

import json
import platform as host_platform
from typing import Any

from attrs import define, field

from shimhub.errors import FailedPrecondition, InvalidArgument
from shimhub.images.reference import is_digest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)
MANIFESTS = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEXES = (OCI_INDEX, DOCKER_LIST)
#: The Accept header of manifest requests, best first.
ACCEPT = ", ".join([OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST])

LAYER_GZIP = ("application/vnd.oci.image.layer.v1.tar+gzip", "application/vnd.docker.image.rootfs.diff.tar.gzip")
LAYER_ZSTD = ("application/vnd.oci.image.layer.v1.tar+zstd",)
LAYER_PLAIN = ("application/vnd.oci.image.layer.v1.tar", "application/vnd.docker.image.rootfs.diff.tar")
NONDISTRIBUTABLE = "nondistributable"

_MACHINES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x"}


@define(frozen=True)
class Descriptor:
    """A content-addressed blob: what it is, its digest and size."""

    media_type: str
    digest: str
    size: int
    platform: str = ""


@define(frozen=True)
class Manifest:
    """An image manifest: its config blob and its layer blobs, bottom first."""

    config: Descriptor
    layers: list[Descriptor] = field(factory=list)


def node_platform(configured: str = "") -> str:
    """This node's platform as os/architecture[/variant]."""
    if configured:
        return configured
    machine = host_platform.machine()
    return f"linux/{_MACHINES.get(machine, machine)}"


def _descriptor(data: Any, where: str) -> Descriptor:
    if not isinstance(data, dict):
        raise InvalidArgument(f"{where}: expected a descriptor object")
    digest, size = data.get("digest"), data.get("size")
    if not isinstance(digest, str) or not is_digest(digest):
        raise InvalidArgument(f"{where}: unsupported or missing digest {digest!r} (only sha256 is supported)")
    if not isinstance(size, int) or size < 0:
        raise InvalidArgument(f"{where}: invalid size {size!r}")
    platform = data.get("platform") or {}
    name = "/".join(p for p in (platform.get("os"), platform.get("architecture"), platform.get("variant")) if p)
    return Descriptor(media_type=str(data.get("mediaType", "")), digest=digest, size=size, platform=name)


def parse(body: bytes, content_type: str, where: str) -> Manifest | list[Descriptor]:
    """A Manifest, or an index's entries; `where` names the image in errors."""
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise InvalidArgument(f"{where}: manifest is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidArgument(f"{where}: manifest is not a JSON object")
    media_type = document.get("mediaType") or content_type.split(";", maxsplit=1)[0].strip()
    if media_type in DOCKER_SCHEMA1 or document.get("schemaVersion") == 1:
        raise InvalidArgument(f"{where}: Docker schema 1 manifests are not supported; push the image with a newer tool")
    if media_type in INDEXES or (not media_type and "manifests" in document):
        entries = document.get("manifests")
        if not isinstance(entries, list):
            raise InvalidArgument(f"{where}: index has no manifests list")
        return [_descriptor(entry, f"{where}: index entry {i}") for i, entry in enumerate(entries)]
    if media_type in MANIFESTS or (not media_type and "config" in document):
        layers = document.get("layers")
        if not isinstance(layers, list):
            raise InvalidArgument(f"{where}: manifest has no layers list")
        return Manifest(
            config=_descriptor(document.get("config"), f"{where}: config"),
            layers=[_descriptor(layer, f"{where}: layer {i}") for i, layer in enumerate(layers)],
        )
    raise InvalidArgument(f"{where}: unsupported manifest media type {media_type!r}")


def pick_platform(entries: list[Descriptor], wanted: str, where: str) -> Descriptor:
    """The index entry for `wanted` (os/arch[/variant]); a missing variant matches any."""
    os_arch = "/".join(wanted.split("/")[:2])
    exact = [e for e in entries if e.platform == wanted]
    loose = [e for e in entries if "/".join(e.platform.split("/")[:2]) == os_arch]
    chosen = exact or loose
    if not chosen:
        available = ", ".join(sorted({e.platform or "unspecified" for e in entries})) or "none"
        raise FailedPrecondition(f"{where}: no image for platform {wanted}; available: {available}")
    return chosen[0]

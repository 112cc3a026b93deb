"""Image references and manifest documents, without a registry."""

from __future__ import annotations

import json

import pytest

from shimhub.errors import FailedPrecondition, InvalidArgument
from shimhub.images import manifest
from shimhub.images.manager import chain_ids
from shimhub.images.reference import parse

pytestmark = pytest.mark.unit

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("busybox", "docker.io/library/busybox:latest"),
        ("busybox:1.36", "docker.io/library/busybox:1.36"),
        ("team/app", "docker.io/team/app:latest"),
        ("quay.io/team/app:v1", "quay.io/team/app:v1"),
        ("localhost/app", "localhost/app:latest"),
        ("127.0.0.1:5000/a/b/c:tag", "127.0.0.1:5000/a/b/c:tag"),
        (f"quay.io/app@{DIGEST}", f"quay.io/app@{DIGEST}"),
        (f"quay.io/app:v1@{DIGEST}", f"quay.io/app:v1@{DIGEST}"),
    ],
)
def test_references(text: str, expected: str) -> None:
    assert str(parse(text, ["docker.io"])) == expected


@pytest.mark.parametrize(
    ("text", "search", "message"),
    [
        ("app", [], "short image name 'app': no search registries are configured; use a fully qualified name"),
        ("app", ["a.io", "b.io"], "short image name 'app' is ambiguous: it could be any of a.io/app, b.io/app"),
        ("quay.io/App", ["a.io"], "invalid image reference 'quay.io/App': bad repository 'App'"),
        ("quay.io/app@md5:00", ["a.io"], "'md5:00' is not a sha256 digest"),
        ("quay.io/app:bad/tag", ["a.io"], "invalid image reference"),
        ("", ["a.io"], "invalid image reference ''"),
    ],
)
def test_bad_references(text: str, search: list[str], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse(text, search)


def test_schema1_is_refused_clearly() -> None:
    body = json.dumps({"schemaVersion": 1, "name": "x", "fsLayers": []}).encode()
    with pytest.raises(InvalidArgument, match="Docker schema 1 manifests are not supported"):
        manifest.parse(body, "application/vnd.docker.distribution.manifest.v1+prettyjws", "r/x:1")


def test_unknown_and_malformed_documents() -> None:
    with pytest.raises(InvalidArgument, match="unsupported manifest media type 'application/x-nope'"):
        manifest.parse(b'{"mediaType": "application/x-nope"}', "", "r/x:1")
    with pytest.raises(InvalidArgument, match="manifest is not JSON"):
        manifest.parse(b"<html>", "text/html", "r/x:1")
    bad_digest = {"mediaType": manifest.OCI_MANIFEST, "config": {"digest": "sha512:00", "size": 1}, "layers": []}
    with pytest.raises(InvalidArgument, match="only sha256 is supported"):
        manifest.parse(json.dumps(bad_digest).encode(), "", "r/x:1")


def test_platform_variants() -> None:
    entries = [
        manifest.Descriptor(manifest.OCI_MANIFEST, DIGEST, 1, "linux/arm/v6"),
        manifest.Descriptor(manifest.OCI_MANIFEST, DIGEST.replace("ab", "cd"), 1, "linux/arm/v7"),
    ]
    assert manifest.pick_platform(entries, "linux/arm/v7", "x").platform == "linux/arm/v7"
    assert manifest.pick_platform(entries, "linux/arm", "x").platform == "linux/arm/v6"
    with pytest.raises(FailedPrecondition, match="available: linux/arm/v6, linux/arm/v7"):
        manifest.pick_platform(entries, "linux/amd64", "x")


def test_chain_ids_follow_the_oci_definition() -> None:
    a, b = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    import hashlib

    assert chain_ids([a, b]) == [a, "sha256:" + hashlib.sha256(f"{a} {b}".encode()).hexdigest()]

"""The image trust policy (containers-policy.json(5)): scopes, requirements, errors, reloads."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from shimhub.errors import ConfigError, FailedPrecondition
from shimhub.images import reference
from shimhub.images.policy import Policy, PolicyFile

pytestmark = pytest.mark.unit

ACCEPT = [{"type": "insecureAcceptAnything"}]
REJECT = [{"type": "reject"}]
GPG = [{"type": "signedBy", "keyType": "GPGKeys", "keyPath": "/etc/pki/key.gpg"}]


def _ref(text: str) -> reference.Reference:
    return reference.parse(text, ["docker.io"])


def _policy(scopes: dict[str, Any], default: Any = REJECT) -> Policy:
    return Policy({"default": default, "transports": {"docker": scopes}}, "policy.json")


@pytest.mark.parametrize(
    ("image", "scope"),
    [
        ("reg.example.com/team/app:v1", "reg.example.com/team/app:v1"),
        ("reg.example.com/team/app:v2", "reg.example.com/team/app"),
        ("reg.example.com/team/other:v1", "reg.example.com/team"),
        ("reg.example.com/elsewhere:v1", "reg.example.com"),
        ("a.b.example.com/x:1", "*.b.example.com"),
        ("c.example.com/x:1", "*.example.com"),
        ("busybox", "docker.io/library/busybox"),
        ("quay.io/x/y:1", ""),
    ],
)
def test_the_most_specific_scope_decides(image: str, scope: str) -> None:
    scopes = {
        name: ACCEPT
        for name in (
            "reg.example.com/team/app:v1",
            "reg.example.com/team/app",
            "reg.example.com/team",
            "reg.example.com",
            "*.b.example.com",
            "*.example.com",
            "docker.io/library/busybox",
            "",
        )
    }
    assert _policy(scopes).decide(_ref(image)).scope == f'transports.docker."{scope}"'


def test_a_wildcard_covers_subdomains_not_the_domain_itself() -> None:
    policy = _policy({"*.example.com": ACCEPT})
    assert policy.decide(_ref("example.com/x:1")).scope == "default"
    with pytest.raises(FailedPrecondition, match="scope default requires reject"):
        policy.check(_ref("example.com/x:1"))
    policy.check(_ref("a.example.com/x:1"))


def test_reject_by_default_and_accept_for_one_repository() -> None:
    policy = _policy({"docker.io/library/busybox": ACCEPT})
    policy.check(_ref("busybox:1.36"))
    with pytest.raises(FailedPrecondition) as refused:
        policy.check(_ref("docker.io/library/nginx:1"))
    assert "policy.json" in refused.value.message and "scope default requires reject" in refused.value.message


def test_every_requirement_of_a_scope_must_hold() -> None:
    with pytest.raises(FailedPrecondition, match="requires reject"):
        _policy({"": [*ACCEPT, *REJECT]}, default=ACCEPT).check(_ref("busybox"))


def test_a_sigstore_requirement_refuses_rather_than_pulls_unverified() -> None:
    sigstore = [{"type": "sigstoreSigned", "keyPath": "/k.pub"}]
    with pytest.raises(FailedPrecondition, match="requires sigstoreSigned: this node does not verify sigstore"):
        _policy({"docker.io": sigstore}).check(_ref("busybox"))


def test_signed_by_with_no_signature_is_refused() -> None:
    policy = _policy({"docker.io": GPG})
    decision = policy.check(_ref("busybox"))
    with pytest.raises(FailedPrecondition, match="requires signedBy: the image has no signature"):
        policy.verify(decision, _ref("busybox"), "sha256:" + "0" * 64, lambda: iter(()))


@pytest.mark.parametrize(
    ("document", "names"),
    [
        ([], "not a JSON object"),
        ({}, "default: missing"),
        ({"default": []}, "default: must be a non-empty list"),
        ({"default": [{"type": "acceptEverything"}]}, "default[0]: unknown requirement type 'acceptEverything'"),
        ({"default": [{"type": "reject", "keyPath": "/k"}]}, "reject takes no other keys (found keyPath)"),
        ({"default": ACCEPT, "transports": {"docker": {"*.a/b": ACCEPT}}}, "a wildcard scope is *.domain"),
        ({"default": ACCEPT, "transports": {"docker": {"reg/*": ACCEPT}}}, "* is allowed only as the first"),
        ({"default": [{"type": "signedBy", "keyType": "X509", "keyPath": "/k"}]}, "keyType must be GPGKeys"),
        ({"default": [{"type": "signedBy", "keyType": "GPGKeys"}]}, "exactly one of keyData, keyPath, keyPaths"),
        (
            {"default": [{**GPG[0], "signedIdentity": {"type": "exactReference"}}]},
            "signedIdentity exactReference takes ['dockerReference']",
        ),
        ({"default": [{"type": "sigstoreSigned", "keyData": "x", "colour": 1}]}, "unknown keys colour"),
    ],
)
def test_an_invalid_policy_names_the_file_and_the_key(document: Any, names: str) -> None:
    with pytest.raises(ConfigError) as invalid:
        Policy(document, "policy.json")
    assert str(invalid.value).startswith("policy.json"), invalid.value
    assert names in str(invalid.value)


def test_every_form_the_format_allows_is_accepted() -> None:
    _policy(
        {
            "reg.example.com": [
                {**GPG[0], "signedIdentity": {"type": "matchRepoDigestOrExact"}},
                {"type": "signedBy", "keyType": "GPGKeys", "keyPaths": ["/a", "/b"]},
                {"type": "signedBy", "keyType": "GPGKeys", "keyData": "AAAA",
                 "signedIdentity": {"type": "remapIdentity", "prefix": "a.io", "signedPrefix": "b.io"}},
                {"type": "sigstoreSigned", "keyPath": "/k.pub", "signedIdentity": {"type": "matchRepository"}},
            ],
            "reg.example.com/a@sha256:" + "0" * 64: ACCEPT,
        }
    )  # fmt: skip


def _write(path: Path, document: Any) -> None:
    path.write_text(json.dumps(document))
    stamp = path.stat().st_mtime_ns + 1_000_000_000  # a change within one clock tick must still be seen
    os.utime(path, ns=(stamp, stamp))


def test_a_changed_file_applies_at_the_next_pull_and_an_invalid_one_fails_closed(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    _write(path, {"default": ACCEPT})
    watched = PolicyFile(str(path))
    watched.current().check(_ref("busybox"))
    _write(path, {"default": REJECT})
    with pytest.raises(FailedPrecondition, match="requires reject"):
        watched.current().check(_ref("busybox"))
    _write(path, {"default": "everything"})
    with pytest.raises(ConfigError, match="default: must be a non-empty list"):
        watched.current()
    _write(path, {"default": ACCEPT})
    watched.current().check(_ref("busybox"))


def test_an_invalid_policy_stops_startup(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        PolicyFile(str(path))
    with pytest.raises(ConfigError, match="cannot read the image trust policy"):
        PolicyFile(str(tmp_path / "missing.json"))


@pytest.mark.root
def test_a_daemon_pulls_only_what_its_policy_allows(daemon_factory, registry, tmp_path: Path) -> None:
    """Reject by default, accept one repository: that one pulls, another is refused before any blob is
    fetched and leaves nothing; verbose Status shows the policy; a changed file applies to the next pull."""
    import re
    import urllib.request

    import grpc

    from shimhub_proto.cri.v1 import api_pb2 as cri
    from tests.conftest import assert_image_store_empty, image_config

    host = registry.open.host
    policy = tmp_path / "policy.json"
    _write(policy, {"default": REJECT, "transports": {"docker": {f"{host}/test/plain": ACCEPT}}})
    config = image_config(registry, extra=f'signature_policy = "{policy}"')
    daemon = daemon_factory('metrics_address = "127.0.0.1:0"\n' + config).start()

    def pull(image: str) -> str:
        return daemon.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=image))).image_ref

    with pytest.raises(grpc.RpcError) as refused:
        pull(f"{host}/test/busybox:1")
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"refused by the image trust policy {policy}: scope default requires reject" in refused.value.details()
    assert_image_store_empty(daemon, "vfs")
    assert pull(f"{host}/test/plain:1") == registry.plain["config"]
    info = json.loads(daemon.runtime.Status(cri.StatusRequest(verbose=True)).info["status"])
    shown = info["image_trust_policy"]
    assert (shown["path"], shown["default"]) == (str(policy), ["reject"])
    assert shown["scopes"] == {f"{host}/test/plain": ["insecureAcceptAnything"]}
    _write(policy, {"default": ACCEPT})
    assert pull(f"{host}/test/busybox:1") == registry.busybox["config"]
    address = re.search(r"serving metrics on (http://[\d.]+:\d+/metrics)", daemon.log()).group(1)
    with urllib.request.urlopen(address, timeout=5) as answer:
        metrics = answer.read().decode()
    assert 'shimhub_image_policy_decisions_total{result="refused"} 1.0' in metrics
    assert 'shimhub_image_policy_decisions_total{result="allowed"} 2.0' in metrics

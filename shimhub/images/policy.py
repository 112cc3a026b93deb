"""The node's image trust policy, in the containers-policy.json(5) format CRI-O's nodes keep.

A policy has a `default` list of requirements and, under `transports.docker`,
lists for scopes. The scope of a pull is the most specific one that matches its
reference, in this order: the reference itself with its tag or digest, the
repository, each enclosing namespace (longest first), the registry host, the
wildcard domains `*.example.com` that cover the host (most specific first), the
transport's own default `""`, then `default`. Every requirement of the chosen
list must be met.

Requirements: `insecureAcceptAnything`, `reject`, `signedBy` (GPG simple
signing, verified by `signatures`) and `sigstoreSigned`. A sigstoreSigned
requirement is parsed and checked for form, but this node does not verify
sigstore signatures yet: it refuses such a pull, saying so, rather than pulling
it unverified.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from attrs import define, field

from shimhub.config import read_node_file
from shimhub.errors import ConfigError, FailedPrecondition
from shimhub.images import signatures
from shimhub.images.reference import Reference

#: Where CRI-O and the containers tools keep the node's policy.
DEFAULT_PATH = "/etc/containers/policy.json"
#: Largest policy file read.
MAX_POLICY_BYTES = 1 << 20
ACCEPT, REJECT, SIGNED_BY, SIGSTORE_SIGNED = "insecureAcceptAnything", "reject", "signedBy", "sigstoreSigned"
_IDENTITY_TYPES = {
    "matchExact": set(),
    "matchRepoDigestOrExact": set(),
    "matchRepository": set(),
    "exactReference": {"dockerReference"},
    "exactRepository": {"dockerRepository"},
    "remapIdentity": {"prefix", "signedPrefix"},
}
_KEY_SOURCES = {"keyPath", "keyPaths", "keyData"}
_SIGSTORE_KEY_SOURCES = {"keyPath", "keyPaths", "keyData", "fulcio"}


@define(frozen=True)
class Requirement:
    """One requirement of a scope, as the policy file states it."""

    type: str
    #: The whole object, for the signature requirements' keys and identity.
    fields: Mapping[str, Any] = field(factory=dict, eq=False)


@define(frozen=True)
class Decision:
    """What the policy says of one pull: the scope that matched and its requirements."""

    scope: str
    requirements: tuple[Requirement, ...]


class Policy:
    """A parsed policy file; `check` decides a pull."""

    def __init__(self, document: Any, source: str) -> None:
        self.source = source
        #: The file's sha256 ("" for a policy not read from a file).
        self.digest = ""
        if not isinstance(document, dict):
            raise ConfigError(f"{source}: the policy is not a JSON object")
        if "default" not in document:
            raise ConfigError(f"{source}: default: missing (every policy needs a default requirement list)")
        self.default = _requirements(document["default"], f"{source}: default")
        transports = document.get("transports", {})
        if not isinstance(transports, dict):
            raise ConfigError(f"{source}: transports: not an object")
        docker = transports.get("docker", {})
        if not isinstance(docker, dict):
            raise ConfigError(f"{source}: transports.docker: not an object")
        where = f"{source}: transports.docker"
        self.scopes = {
            _scope(scope, where): _requirements(listed, f"{where}.{scope!r}") for scope, listed in docker.items()
        }

    @classmethod
    def load(cls, path: str) -> Policy:
        """The policy in the file at `path`; ConfigError naming the file and the key that is wrong."""
        raw = read_node_file(path, MAX_POLICY_BYTES, "the image trust policy")
        try:
            document = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON: {exc}") from None
        policy = cls(document, path)
        policy.digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        return policy

    def decide(self, ref: Reference) -> Decision:
        """The scope that governs a pull of `ref`, and its requirements."""
        for scope in _candidates(ref):
            if scope in self.scopes:
                return Decision(f'transports.docker."{scope}"', self.scopes[scope])
        return Decision("default", self.default)

    def _refuse(self, ref: Reference, decision: Decision, requirement: str, why: str = "") -> FailedPrecondition:
        because = f": {why}" if why else ""
        return FailedPrecondition(
            f"image {ref} is refused by the image trust policy {self.source}: "
            f"scope {decision.scope} requires {requirement}{because}"
        )

    def check(self, ref: Reference) -> Decision:
        """Before anything is fetched: the decision for `ref`, or FailedPrecondition when it is refused
        whatever it holds (reject, or a requirement this node cannot check)."""
        decision = self.decide(ref)
        for requirement in decision.requirements:
            if requirement.type == REJECT:
                raise self._refuse(ref, decision, REJECT)
            if requirement.type == SIGSTORE_SIGNED:
                raise self._refuse(ref, decision, SIGSTORE_SIGNED, "this node does not verify sigstore signatures")
        return decision

    def verify(
        self, decision: Decision, ref: Reference, manifest_digest: str, fetch: Callable[[], Iterator[bytes]]
    ) -> list[str]:
        """Once the manifest is known: check each signedBy requirement against the signatures `fetch` gives
        (fetched once, when one is needed); the fingerprints of the keys that signed, or FailedPrecondition
        saying why no signature meets a requirement."""
        fetched: list[bytes] | None = None
        signers = []
        for requirement in decision.requirements:
            if requirement.type != SIGNED_BY:
                continue
            if fetched is None:
                fetched = list(fetch())
            if not fetched:
                raise self._refuse(ref, decision, SIGNED_BY, "the image has no signature")
            keys = signatures.keyring(requirement.fields)
            rule = requirement.fields.get("signedIdentity")

            def wrong(verified: signatures.Verified, rule: Any = rule) -> str:
                if verified.manifest_digest != manifest_digest:
                    return f"signed for manifest {verified.manifest_digest}, not {manifest_digest}"
                if not signatures.identity_matches(rule, ref, verified.identity):
                    return f"signed for {verified.identity!r}, which does not match {str(ref)!r}"
                return ""

            found, problems = signatures.first_valid(fetched, keys, wrong)
            if found is None:
                raise self._refuse(ref, decision, SIGNED_BY, "; ".join(problems))
            signers.append(found.fingerprint)
        return signers

    def summary(self) -> dict[str, Any]:
        """The policy in force, for verbose Status."""
        return {
            "path": self.source,
            "digest": self.digest,
            "default": [r.type for r in self.default],
            "scopes": {scope: [r.type for r in listed] for scope, listed in sorted(self.scopes.items())},
        }


class PolicyFile:
    """The policy at a path, read again when the file changes (checked at each pull by its size, time and
    inode). An invalid new version refuses every pull until it is mended: a trust policy fails closed."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, int, int, int] | None = None
        self._policy: Policy | None = None
        self._error: ConfigError | None = None
        self.current()  # an invalid policy stops startup

    def _stamp_now(self) -> tuple[int, int, int, int]:
        try:
            info = os.stat(self.path)
        except OSError as exc:
            raise ConfigError(f"{self.path}: cannot read the image trust policy: {exc.strerror}") from None
        return (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)

    def current(self) -> Policy:
        """The policy as the file says now; ConfigError when the file is invalid."""
        stamp = self._stamp_now()
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self._policy, self._error = Policy.load(self.path), None
            except ConfigError as exc:
                self._policy, self._error = None, exc
        if self._error is not None:
            raise self._error
        assert self._policy is not None
        return self._policy


def default_path(configured: str | None) -> str:
    """The policy file to use: the configured one ("" for none), else CRI-O's when it is present."""
    if configured is not None:
        return configured
    return DEFAULT_PATH if Path(DEFAULT_PATH).exists() else ""


def _candidates(ref: Reference) -> list[str]:
    """The scopes that can match `ref`, the most specific first."""
    repository = f"{ref.registry}/{ref.repository}"
    found = []
    if ref.digest:
        found.append(f"{repository}@{ref.digest}")
    if ref.tag:
        found.append(f"{repository}:{ref.tag}")
    parts = repository.split("/")
    found += ["/".join(parts[:end]) for end in range(len(parts), 0, -1)]
    labels = ref.registry.split(":")[0].split(".")
    found += ["*." + ".".join(labels[start:]) for start in range(1, len(labels))]
    found.append("")
    return found


def _scope(scope: Any, where: str) -> str:
    """A docker transport scope as written, checked for form."""
    if not isinstance(scope, str):
        raise ConfigError(f"{where}: a scope is not a string")
    if scope.startswith("*."):
        if "/" in scope or ":" in scope or "*" in scope[2:] or len(scope) < 3:
            raise ConfigError(f"{where}: scope {scope!r}: a wildcard scope is *.domain and nothing more")
    elif "*" in scope:
        raise ConfigError(f"{where}: scope {scope!r}: * is allowed only as the first label (*.domain)")
    if scope.endswith("/"):
        raise ConfigError(f"{where}: scope {scope!r}: ends with /")
    return scope


def _requirements(listed: Any, where: str) -> tuple[Requirement, ...]:
    if not isinstance(listed, list) or not listed:
        raise ConfigError(f"{where}: must be a non-empty list of requirements")
    return tuple(_requirement(item, f"{where}[{index}]") for index, item in enumerate(listed))


def _requirement(item: Any, where: str) -> Requirement:
    if not isinstance(item, dict) or not isinstance(item.get("type"), str):
        raise ConfigError(f"{where}: a requirement is an object with a string type")
    kind = item["type"]
    extra = set(item) - {"type"}
    if kind in (ACCEPT, REJECT):
        if extra:
            raise ConfigError(f"{where}: {kind} takes no other keys (found {', '.join(sorted(extra))})")
    elif kind == SIGNED_BY:
        if item.get("keyType") not in ("GPGKeys", "signedByGPGKeys"):
            raise ConfigError(f"{where}: signedBy: keyType must be GPGKeys")
        _one_key_source(item, _KEY_SOURCES, where)
        _identity(item.get("signedIdentity"), where)
        _no_unknown(item, {"type", "keyType", "signedIdentity", *_KEY_SOURCES}, where)
    elif kind == SIGSTORE_SIGNED:
        _one_key_source(item, _SIGSTORE_KEY_SOURCES, where)
        _identity(item.get("signedIdentity"), where)
        _no_unknown(item, {"type", "signedIdentity", "rekorPublicKeyPath", "rekorPublicKeyData",
                           *_SIGSTORE_KEY_SOURCES}, where)  # fmt: skip
    else:
        raise ConfigError(f"{where}: unknown requirement type {kind!r}")
    return Requirement(kind, dict(item))


def _one_key_source(item: dict[str, Any], sources: set[str], where: str) -> None:
    given = sorted(set(item) & sources)
    if len(given) != 1:
        raise ConfigError(f"{where}: {item['type']}: exactly one of {', '.join(sorted(sources))} (found {given})")
    if given[0] == "keyPaths" and not (isinstance(item["keyPaths"], list) and item["keyPaths"]):
        raise ConfigError(f"{where}: {item['type']}: keyPaths must be a non-empty list")


def _identity(identity: Any, where: str) -> None:
    if identity is None:
        return
    if not isinstance(identity, dict) or identity.get("type") not in _IDENTITY_TYPES:
        raise ConfigError(f"{where}: signedIdentity: type must be one of {', '.join(sorted(_IDENTITY_TYPES))}")
    wanted = _IDENTITY_TYPES[identity["type"]]
    if set(identity) - {"type"} != wanted:
        raise ConfigError(f"{where}: signedIdentity {identity['type']} takes {sorted(wanted) or 'no other keys'}")


def _no_unknown(item: dict[str, Any], known: set[str], where: str) -> None:
    unknown = set(item) - known
    if unknown:
        raise ConfigError(f"{where}: {item['type']}: unknown keys {', '.join(sorted(unknown))}")

"""Image references: `[registry/]repository[:tag][@sha256:digest]`.

A reference whose first path component is not a registry host (no ".", ":"
or "localhost") is a short name. It is resolved through the configured search
registries, and only when exactly one is configured: with several, which one
was meant is ambiguous, and shimhub refuses rather than guesses.
"""

from __future__ import annotations

import re

from attrs import define

from shimhub.errors import InvalidArgument

DOCKER_HUB = "docker.io"
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_HOST = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?$")


@define(frozen=True)
class Reference:
    """A fully qualified image reference."""

    registry: str
    repository: str
    tag: str = ""
    digest: str = ""

    @property
    def name(self) -> str:
        """registry/repository."""
        return f"{self.registry}/{self.repository}"

    @property
    def selector(self) -> str:
        """What to ask the registry for: the digest when pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def tagged(self) -> str:
        """registry/repository:tag ("" when the reference has only a digest)."""
        return f"{self.name}:{self.tag}" if self.tag else ""

    def with_digest(self, digest: str) -> str:
        """registry/repository@digest."""
        return f"{self.name}@{digest}"

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def is_digest(text: str) -> bool:
    """Whether `text` is a sha256 digest."""
    return bool(_DIGEST.match(text))


def parse(text: str, search_registries: list[str]) -> Reference:
    """Parse `text`, resolving a short name through `search_registries`."""
    if not text or len(text) > 4096 or any(c.isspace() for c in text):
        raise InvalidArgument(f"invalid image reference {text[:256]!r}")
    remainder, _, digest = text.partition("@")
    if digest and not is_digest(digest):
        raise InvalidArgument(f"invalid image reference {text[:256]!r}: {digest!r} is not a sha256 digest")
    tag = ""
    last_slash = remainder.rfind("/")
    colon = remainder.rfind(":")
    if colon > last_slash:
        remainder, tag = remainder[:colon], remainder[colon + 1 :]
        if not _TAG.match(tag):
            raise InvalidArgument(f"invalid image reference {text[:256]!r}: bad tag {tag!r}")
    first, _, rest = remainder.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        registry, repository = first, rest
        if not _HOST.match(registry):
            raise InvalidArgument(f"invalid image reference {text[:256]!r}: bad registry {registry!r}")
    else:
        registry, repository = _search_registry(text, search_registries), remainder
    if registry == DOCKER_HUB and "/" not in repository:
        repository = f"library/{repository}"
    if not all(_COMPONENT.match(part) for part in repository.split("/")):
        raise InvalidArgument(f"invalid image reference {text[:256]!r}: bad repository {repository!r}")
    if not tag and not digest:
        tag = "latest"
    return Reference(registry=registry, repository=repository, tag=tag, digest=digest)


def _search_registry(text: str, search_registries: list[str]) -> str:
    if len(search_registries) == 1:
        return search_registries[0]
    if not search_registries:
        raise InvalidArgument(
            f"short image name {text[:256]!r}: no search registries are configured; use a fully qualified name"
        )
    candidates = ", ".join(f"{registry}/{text}" for registry in search_registries)
    raise InvalidArgument(f"short image name {text[:256]!r} is ambiguous: it could be any of {candidates}; qualify it")

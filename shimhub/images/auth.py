"""Registry credentials and auth challenges: who a pull is made as, and what a registry asks for.

Credentials come from the pull request's AuthConfig, or from a Docker-style credentials
file; they are never logged (their repr hides them). A `WWW-Authenticate` challenge is
parsed in one pass over a bounded header, never with a backtracking regular expression.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from attrs import define

from shimhub.errors import ConfigError, InvalidArgument
from shimhub_proto.cri.v1 import api_pb2 as cri

#: Longest WWW-Authenticate header looked at.
MAX_CHALLENGE = 8192

_TOKEN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-.^_`|~")


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """The scheme and parameters of a WWW-Authenticate challenge, in one pass (at most MAX_CHALLENGE characters).

    Parameters are `name=value` or `name="quoted value"` (with backslash escapes), separated by commas.
    """
    text = header[:MAX_CHALLENGE].strip()
    scheme, _, rest = text.partition(" ")
    params: dict[str, str] = {}
    position, end = 0, len(rest)
    while position < end:
        while position < end and rest[position] in " \t,":
            position += 1
        start = position
        while position < end and rest[position] in _TOKEN_CHARS:
            position += 1
        name = rest[start:position].lower()
        if position >= end or rest[position] != "=" or not name:
            while position < end and rest[position] != ",":  # not a parameter: skip to the next
                position += 1
            continue
        position += 1
        value: list[str] = []
        if position < end and rest[position] == '"':
            position += 1
            while position < end and rest[position] != '"':
                if rest[position] == "\\" and position + 1 < end:
                    position += 1
                value.append(rest[position])
                position += 1
            position += 1
        else:
            start = position
            while position < end and rest[position] not in " \t,":
                position += 1
            value.append(rest[start:position])
        params[name] = "".join(value)
    return scheme, params


@define(frozen=True, repr=False)
class Credentials:
    """Registry credentials; repr never shows them."""

    username: str = ""
    password: str = ""
    identity_token: str = ""
    registry_token: str = ""

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, secrets=<hidden>)"


def credentials_from_request(auth: cri.AuthConfig) -> Credentials | None:
    """The credentials in a PullImage request's AuthConfig, if any."""
    username, password = auth.username, auth.password
    if auth.auth and not username:
        try:
            username, _, password = base64.b64decode(auth.auth).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            raise InvalidArgument("auth.auth is not base64 of user:password") from None
    if not (username or auth.identity_token or auth.registry_token):
        return None
    return Credentials(username, password, auth.identity_token, auth.registry_token)


def load_credentials_file(path: str, missing_ok: bool = False) -> dict[str, Credentials]:
    """Credentials per registry host from a Docker-style config file ("" = none; absent = none if `missing_ok`)."""
    if not path or (missing_ok and not Path(path).exists()):
        return {}
    try:
        document = json.loads(Path(path).read_text())
        found: dict[str, Credentials] = {}
        for host, entry in document.get("auths", {}).items():
            user, _, password = base64.b64decode(entry.get("auth", "")).decode().partition(":")
            found[host.removeprefix("https://").removeprefix("http://").rstrip("/")] = Credentials(
                user or entry.get("username", ""), password or entry.get("password", ""), entry.get("identitytoken", "")
            )
        return found
    except (OSError, ValueError, AttributeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"images: cannot read the credentials file {path}: {type(exc).__name__}") from None

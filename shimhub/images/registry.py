"""A client of the OCI distribution protocol: manifests and blobs, auth, mirrors.

Auth follows the registry's challenge: anonymous first, then Basic with the
credentials for that host, or the Bearer token flow (a token fetched from the
challenge's realm for the repository's pull scope, with the credentials as
Basic auth or an identity token as OAuth2 refresh token). Tokens are cached per
host and scope. Credentials come from the pull request's AuthConfig, or from
the configured credentials file; they are never logged.

Mirrors of a registry are tried in order; a mirror that fails or lacks the
content is skipped, and the registry itself is tried last.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
from attrs import define

from shimhub.config import ImagesConfig
from shimhub.errors import ConfigError, InvalidArgument, NotFound, ShimhubError, Unauthenticated, Unavailable
from shimhub.images.manifest import ACCEPT
from shimhub.images.reference import DOCKER_HUB, Reference
from shimhub_proto.cri.v1 import api_pb2 as cri

log = logging.getLogger(__name__)
logging.getLogger("httpx").setLevel(logging.WARNING)  # its request lines are noise at info level

#: Where Docker Hub's API lives.
DOCKER_HUB_API = "registry-1.docker.io"
CHUNK = 1 << 20
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


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


def load_credentials_file(path: str) -> dict[str, Credentials]:
    """Credentials per registry host from a Docker-style config file ("" = none)."""
    if not path:
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
        raise ConfigError(f"images.credentials_file: cannot read {path}: {type(exc).__name__}") from None


class RegistryClient:
    """Fetches manifests and blobs from registries, per the node's registry configuration."""

    def __init__(self, config: ImagesConfig) -> None:
        self.config = config
        self.file_credentials = load_credentials_file(config.credentials_file)
        limits = httpx.Limits(max_connections=32, max_keepalive_connections=16)
        self.http = httpx.Client(timeout=httpx.Timeout(config.timeout), limits=limits, follow_redirects=True)
        self._tokens: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close pooled connections."""
        self.http.close()

    def _hosts(self, registry: str) -> list[str]:
        entry = self.config.registries.get(registry)
        return [*(entry.mirrors if entry else []), registry]

    def _base_url(self, host: str) -> str:
        entry = self.config.registries.get(host)
        scheme = "http" if entry and entry.insecure else "https"
        api_host = DOCKER_HUB_API if host == DOCKER_HUB else host
        return f"{scheme}://{api_host}/v2"

    def _credentials(self, host: str, registry: str, request: Credentials | None) -> Credentials | None:
        if request is not None and host == registry:
            return request
        return self.file_credentials.get(host)

    def _send(
        self,
        method: str,
        url: str,
        *,
        host: str,
        scope: str,
        creds: Credentials | None,
        headers: dict[str, str],
        stream: bool = False,
    ) -> httpx.Response:
        """Send a request, answering one auth challenge if the registry makes it."""
        headers = dict(headers)
        with self._lock:
            token = self._tokens.get((host, scope))
        if token:
            headers["Authorization"] = f"Bearer {token}"
        response = self._request(method, url, headers, stream)
        if response.status_code != 401:
            return response
        response.close()
        challenge = response.headers.get("WWW-Authenticate", "")
        headers["Authorization"] = self._authorization(challenge, host, scope, creds)
        response = self._request(method, url, headers, stream)
        if response.status_code == 401:
            response.close()
            raise Unauthenticated(
                f"registry {host} refused the credentials for {scope}"
                if creds
                else f"registry {host} needs credentials for {scope}"
            )
        return response

    def _request(self, method: str, url: str, headers: dict[str, str], stream: bool) -> httpx.Response:
        try:
            request = self.http.build_request(method, url, headers=headers)
            return self.http.send(request, stream=stream)
        except httpx.HTTPError as exc:
            raise Unavailable(f"cannot reach {httpx.URL(url).host}: {type(exc).__name__}: {exc}") from exc

    def _authorization(self, challenge: str, host: str, scope: str, creds: Credentials | None) -> str:
        scheme, _, params_text = challenge.partition(" ")
        params = dict(_CHALLENGE_PARAM.findall(params_text))
        if scheme.lower() == "basic":
            if creds is None or not creds.username:
                raise Unauthenticated(f"registry {host} needs credentials for {scope}")
            return "Basic " + base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()
        if scheme.lower() != "bearer" or "realm" not in params:
            raise Unauthenticated(f"registry {host} asks for unsupported authentication {scheme or '(none)'!r}")
        if creds is not None and creds.registry_token:
            token = creds.registry_token
        else:
            token = self._fetch_token(params, host, scope, creds)
        with self._lock:
            self._tokens[(host, scope)] = token
        return f"Bearer {token}"

    def _fetch_token(self, params: dict[str, str], host: str, scope: str, creds: Credentials | None) -> str:
        query = {"scope": scope, **({"service": params["service"]} if "service" in params else {})}
        try:
            if creds is not None and creds.identity_token:
                form = {
                    "grant_type": "refresh_token",
                    "refresh_token": creds.identity_token,
                    "client_id": "shimhub",
                    **query,
                }
                response = self.http.post(params["realm"], data=form)
            else:
                auth = (creds.username, creds.password) if creds is not None and creds.username else None
                response = self.http.get(params["realm"], params=query, auth=auth)
        except httpx.HTTPError as exc:
            raise Unavailable(f"cannot reach the token service of {host}: {type(exc).__name__}") from exc
        if response.status_code in (401, 403):
            raise Unauthenticated(f"the token service of {host} refused the credentials for {scope}")
        if response.status_code != 200:
            raise Unavailable(f"the token service of {host} answered HTTP {response.status_code}")
        try:
            document = response.json()
            return str(document.get("token") or document["access_token"])
        except (ValueError, KeyError):
            raise Unavailable(f"the token service of {host} sent no token") from None

    def _each_host(
        self, ref: Reference, path: str, creds: Credentials | None, headers: dict[str, str], stream: bool = False
    ) -> Iterator[tuple[str, httpx.Response | None, str]]:
        """GET `path` of `ref`'s repository from each mirror, then the registry: (host, response, failure).

        A mirror that cannot be reached yields no response and the failure; the registry's own errors raise.
        """
        scope = f"repository:{ref.repository}:pull"
        for host in self._hosts(ref.registry):
            url = f"{self._base_url(host)}/{ref.repository}/{path}"
            credentials = self._credentials(host, ref.registry, creds)
            try:
                response = self._send(
                    "GET", url, host=host, scope=scope, creds=credentials, headers=headers, stream=stream
                )
            except ShimhubError as exc:
                if host == ref.registry:
                    raise
                yield host, None, exc.message
                continue
            yield host, response, ""

    def manifest(self, ref: Reference, selector: str, creds: Credentials | None) -> tuple[bytes, str, str]:
        """(body, content type, digest header) of the manifest `selector` (a tag or digest) of `ref`."""
        failures: list[str] = []
        for host, response, failure in self._each_host(ref, f"manifests/{selector}", creds, {"Accept": ACCEPT}):
            if response is None or (response.status_code != 200 and host != ref.registry):
                failures.append(f"{host}: {failure or f'HTTP {response.status_code}'}")  # type: ignore[union-attr]
                continue
            if response.status_code == 200:
                headers = response.headers
                return response.content, headers.get("Content-Type", ""), headers.get("Docker-Content-Digest", "")
            if response.status_code == 404:
                tried = f" (mirrors: {'; '.join(failures)})" if failures else ""
                raise NotFound(f"image {ref.name}:{selector} not found in registry {ref.registry}{tried}")
            raise Unavailable(f"registry {host} answered HTTP {response.status_code} for {ref.name}:{selector}")
        raise AssertionError("the registry itself is always the last host")

    def blob(self, ref: Reference, digest: str, creds: Credentials | None) -> Iterator[bytes]:
        """The chunks of blob `digest` of `ref`'s repository, from the first host that has it."""
        for host, response, _failure in self._each_host(ref, f"blobs/{digest}", creds, {}, stream=True):
            if response is None:
                continue
            try:
                if response.status_code == 200:
                    try:
                        yield from response.iter_raw(CHUNK)
                    except httpx.HTTPError as exc:
                        raise Unavailable(f"download of {digest} from {host} broke off: {type(exc).__name__}") from exc
                    return
                if host == ref.registry:
                    if response.status_code == 404:
                        raise NotFound(f"blob {digest} of {ref.name} not found in registry {host}")
                    raise Unavailable(f"registry {host} answered HTTP {response.status_code} for blob {digest}")
            finally:
                response.close()

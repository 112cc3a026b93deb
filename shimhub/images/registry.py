"""A client of the OCI distribution protocol: manifests and blobs, auth, mirrors.

Auth follows the registry's challenge: anonymous first, then Basic with the
credentials for that host, or the Bearer token flow (a token fetched from the
challenge's realm for the repository's pull scope, with the credentials as
Basic auth or an identity token as OAuth2 refresh token). Tokens are cached per
host and scope. Credentials come from the pull request's AuthConfig, or from
the configured credentials file; they are never logged.

Mirrors of a registry are tried in order; a mirror that fails or lacks the
content is skipped, and the registry itself is tried last.

httpx is imported by the functions that use it, at the first pull: it is
6 MB of the daemon's memory that a node whose images are all present never needs.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from shimhub.config import ImagesConfig
from shimhub.errors import (
    DeadlineExceeded,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ShimhubError,
    Unauthenticated,
    Unavailable,
)
from shimhub.images.auth import Credentials, load_credentials_file, parse_challenge
from shimhub.images.manifest import ACCEPT
from shimhub.images.reference import DOCKER_HUB, Reference

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)
logging.getLogger("httpx").setLevel(logging.WARNING)  # its request lines are noise at info level

#: Where Docker Hub's API lives.
DOCKER_HUB_API = "registry-1.docker.io"
#: Largest manifest or index read (as containers/image); a larger one is refused before it is read.
MAX_MANIFEST_BYTES = 4 << 20
#: Largest answer of a token service read.
MAX_TOKEN_ANSWER = 1 << 20
#: Slowest download a blob may have on average: its deadline is the registry timeout plus its size at this rate.
MIN_BLOB_RATE = 32 << 10
#: Connections per registry host (each host has a pool of its own: one slow registry cannot take the others').
HOST_CONNECTIONS = 16


def _answer(response: httpx.Response) -> str:
    """A registry's error answer in short: the status and the first error of its body, if it sent one."""
    import httpx

    try:
        body = _bounded(response, 64 << 10, time.monotonic() + 5, "an error answer")
        first = (json.loads(body).get("errors") or [])[0]
        detail = " " + str(first.get("message") or str(first.get("code", "")).lower().replace("_", " "))
    except (ShimhubError, ValueError, AttributeError, IndexError, TypeError, httpx.HTTPError):
        detail = ""
    return f"{response.status_code}{detail[:200]}"


def _bounded(response: httpx.Response, limit: int, deadline: float, what: str) -> bytes:
    """A streamed response's body: refused past `limit` bytes (declared or received) or past `deadline`."""
    import httpx

    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ResourceExhausted(f"{what} is {declared} bytes; at most {limit} are accepted")
    received, size = [], 0
    try:
        for chunk in response.iter_bytes():  # as it arrives: a drip must meet the deadline
            size += len(chunk)
            if size > limit:
                raise ResourceExhausted(f"{what} is larger than {limit} bytes")
            if time.monotonic() > deadline:
                raise DeadlineExceeded(f"{what} did not arrive in time")
            received.append(chunk)
    except httpx.HTTPError as exc:
        raise Unavailable(f"{what} broke off: {type(exc).__name__}") from exc
    return b"".join(received)


class RegistryClient:
    """Fetches manifests and blobs from registries, per the node's registry configuration."""

    def __init__(self, config: ImagesConfig) -> None:
        self.config = config
        #: credentials_file's hosts first, then the node's containers-auth.json(5) for the others.
        self.file_credentials = {
            **load_credentials_file(config.auth_file, missing_ok=True),
            **load_credentials_file(config.credentials_file),
        }
        self._clients: dict[str, httpx.Client] = {}
        #: Bearer tokens by (host, scope, the credentials they were obtained with; None: anonymously).
        self._tokens: dict[tuple[str, str, Credentials | None], str] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close pooled connections."""
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()

    def _http(self, host: str) -> httpx.Client:
        """The connection pool of one host (registry, mirror or token service)."""
        import httpx

        with self._lock:
            client = self._clients.get(host)
            if client is None:
                limits = httpx.Limits(max_connections=HOST_CONNECTIONS, max_keepalive_connections=HOST_CONNECTIONS)
                client = httpx.Client(
                    timeout=httpx.Timeout(self.config.timeout),
                    limits=limits,
                    follow_redirects=True,
                    verify=self._tls(host),
                )
                self._clients[host] = client
            return client

    def _tls(self, host: str) -> bool | ssl.SSLContext:
        """How `host`'s certificate is checked: the system's CAs, its own CA file, or not at all."""
        entry = self.config.registries.get(host)
        if entry is None or not (entry.skip_verify or entry.ca_file):
            return True
        if entry.skip_verify:
            return False
        try:
            return ssl.create_default_context(cafile=entry.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise Unavailable(f"registry {host}: cannot use the CA file {entry.ca_file}: {exc}") from None

    def _hosts(self, registry: str) -> list[str]:
        entry = self.config.registries.get(registry)
        if entry is not None and entry.mirror_only:
            return list(entry.mirrors)
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
            token = self._tokens.get((host, scope, creds))
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
        import httpx

        try:
            http = self._http(httpx.URL(url).netloc.decode())
            return http.send(http.build_request(method, url, headers=headers), stream=stream)
        except httpx.HTTPError as exc:
            where = httpx.URL(url).netloc.decode()
            hint = ""
            if "WRONG_VERSION_NUMBER" in str(exc):
                hint = f' (it may serve plain HTTP: set insecure = true in [images.registries."{where}"])'
            raise Unavailable(f"cannot reach {where}: {type(exc).__name__}: {exc}{hint}") from exc

    def fetch(self, url: str, limit: int) -> bytes | None:
        """A document at an http, https or file URL (a signature store), at most `limit` bytes; None when
        there is none (404, or no such file)."""
        if url.startswith("file://"):
            try:
                with open(url.removeprefix("file://"), "rb") as handle:
                    body = handle.read(limit + 1)
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise Unavailable(f"cannot read {url}: {exc.strerror}") from None
            if len(body) > limit:
                raise ResourceExhausted(f"{url} is larger than {limit} bytes")
            return body
        response = self._request("GET", url, {}, stream=True)
        try:
            if response.status_code == 404:
                return None
            if response.status_code != 200:
                raise Unavailable(f"{url} answered {_answer(response)}")
            return _bounded(response, limit, time.monotonic() + self.config.timeout, url)
        finally:
            response.close()

    def _authorization(self, challenge: str, host: str, scope: str, creds: Credentials | None) -> str:
        scheme, params = parse_challenge(challenge)
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
            self._tokens[(host, scope, creds)] = token
        return f"Bearer {token}"

    def _fetch_token(self, params: dict[str, str], host: str, scope: str, creds: Credentials | None) -> str:
        import httpx

        query = {"scope": scope, **({"service": params["service"]} if "service" in params else {})}
        try:
            http = self._http(httpx.URL(params["realm"]).host)
            if creds is not None and creds.identity_token:
                form = {
                    "grant_type": "refresh_token",
                    "refresh_token": creds.identity_token,
                    "client_id": "shimhub",
                    **query,
                }
                request = http.build_request("POST", params["realm"], data=form)
            else:
                request = http.build_request("GET", params["realm"], params=query)
                if creds is not None and creds.username:
                    basic = base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()
                    request.headers["Authorization"] = f"Basic {basic}"
            response = http.send(request, stream=True)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise Unavailable(f"cannot reach the token service of {host}: {type(exc).__name__}") from exc
        try:
            if response.status_code in (401, 403):
                raise Unauthenticated(f"the token service of {host} refused the credentials for {scope}")
            if response.status_code != 200:
                raise Unavailable(f"the token service of {host} answered HTTP {response.status_code}")
            body = _bounded(response, MAX_TOKEN_ANSWER, time.monotonic() + self.config.timeout, "a token answer")
        finally:
            response.close()
        try:
            document = json.loads(body)
            return str(document.get("token") or document["access_token"])
        except (ValueError, KeyError, AttributeError):
            raise Unavailable(f"the token service of {host} sent no token") from None

    def _each_host(
        self,
        ref: Reference,
        path: str,
        creds: Credentials | None,
        headers: dict[str, str],
        *,
        failures: list[str],
        stream: bool = False,
    ) -> Iterator[tuple[str, httpx.Response, bool]]:
        """GET `path` of `ref`'s repository from each mirror, then the registry (unless it is reached only
        through its mirrors): (host, response, whether it is the last host).

        A host that cannot be reached (or refuses the credentials) is noted in `failures` and skipped; when
        it is the last, its error is raised, naming what the hosts before it answered.
        """
        scope = f"repository:{ref.repository}:pull"
        entry = self.config.registries.get(ref.registry)
        if entry is not None and entry.blocked:
            raise PermissionDenied(f"pulls from registry {ref.registry} are blocked by the node's registry settings")
        hosts = self._hosts(ref.registry)
        for number, host in enumerate(hosts, start=1):
            url = f"{self._base_url(host)}/{ref.repository}/{path}"
            credentials = self._credentials(host, ref.registry, creds)
            try:
                response = self._send(
                    "GET", url, host=host, scope=scope, creds=credentials, headers=headers, stream=stream
                )
            except ShimhubError as exc:
                if number == len(hosts):
                    if failures:
                        exc.message = f"{exc.message} (before it: {'; '.join(failures)})"
                    raise
                failures.append(f"{host}: {exc.message}")
                continue
            yield host, response, number == len(hosts)

    def manifest(self, ref: Reference, selector: str, creds: Credentials | None) -> tuple[bytes, str, str]:
        """(body, content type, digest header) of the manifest `selector` (a tag or digest) of `ref`.

        When every host fails, the error names each with its answer. It is NOT_FOUND when every host that
        answered said so (an unreachable one does not make "not found" a network error, as in containerd),
        else the last host's.
        """
        failures: list[str] = []
        what = f"{ref.name}:{selector}"
        hosts = self._each_host(ref, f"manifests/{selector}", creds, {"Accept": ACCEPT}, failures=failures, stream=True)
        answers: set[int] = set()
        try:
            for host, response, last in hosts:
                try:
                    if response.status_code == 200:
                        deadline = time.monotonic() + self.config.timeout
                        body = _bounded(response, MAX_MANIFEST_BYTES, deadline, f"the manifest of {what}")
                        headers = response.headers
                        return body, headers.get("Content-Type", ""), headers.get("Docker-Content-Digest", "")
                    failures.append(f"{host}: {_answer(response)}")
                    answers.add(response.status_code)
                finally:
                    response.close()
                if last and answers != {404}:
                    raise Unavailable(f"image {what} could not be fetched ({'; '.join(failures)})")
        except (Unavailable, DeadlineExceeded) as exc:
            if answers != {404}:
                raise
            failures.append(exc.message.split(" (before it:")[0])
        raise NotFound(f"image {what} not found in registry {ref.registry}; tried: {'; '.join(failures)}")

    def blob(
        self, ref: Reference, digest: str, creds: Credentials | None, size: int, alive: Callable[[], bool]
    ) -> Iterator[bytes]:
        """The chunks of blob `digest` (`size` bytes) of `ref`'s repository, from the first host that has it.

        The download stops when `alive` turns false (the pull's client left) or when it is slower on
        average than MIN_BLOB_RATE past the registry timeout.
        """
        failures: list[str] = []
        hosts = self._each_host(ref, f"blobs/{digest}", creds, {}, failures=failures, stream=True)
        with contextlib.closing(hosts):  # closed in this thread when the consumer closes this generator
            yield from self._blob_from(hosts, ref, digest, size, alive, failures)

    def _blob_from(  # noqa: PLR0917 - one download's pieces
        self,
        hosts: Iterator[tuple[str, Any, bool]],
        ref: Reference,
        digest: str,
        size: int,
        alive: Callable[[], bool],
        failures: list[str],
    ) -> Iterator[bytes]:
        import httpx

        for host, response, last in hosts:
            try:
                if response.status_code == 200:
                    deadline = time.monotonic() + self.config.timeout + size / MIN_BLOB_RATE
                    try:
                        for chunk in response.iter_raw():  # as it arrives: a drip must meet the deadline
                            if not alive():
                                raise Unavailable(f"the download of {digest} stopped: the pull's client left")
                            if time.monotonic() > deadline:
                                raise DeadlineExceeded(
                                    f"the download of {digest} from {host} is slower than {MIN_BLOB_RATE} bytes/s"
                                )
                            yield chunk
                    except httpx.HTTPError as exc:
                        raise Unavailable(f"download of {digest} from {host} broke off: {type(exc).__name__}") from exc
                    return
                failures.append(f"{host}: HTTP {response.status_code}")
                if last:
                    tried = "; ".join(failures)
                    if response.status_code == 404:
                        raise NotFound(f"blob {digest} of {ref.name} not found in registry {ref.registry} ({tried})")
                    raise Unavailable(f"blob {digest} of {ref.name} could not be fetched ({tried})")
            finally:
                response.close()

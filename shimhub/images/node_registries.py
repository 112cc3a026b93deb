"""Registry settings from the files nodes already have, for nodes moving from CRI-O or containerd.

Two formats are read: containers-registries.conf(5) version 2 (the main file, then
`registries.conf.d/*.conf` in name order) and containerd's hosts directory
(`<dir>/<registry host>/hosts.toml`). Precedence, per registry host: shimhub's own
`[images.registries."host"]` table wins whole; a host it does not name comes from
registries.conf, then from the hosts directory. `unqualified-search-registries`
applies when shimhub's own files set no `search_registries`. Each entry keeps the file
it came from (verbose Status), and what shimhub cannot honour is logged with why.
"""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from attrs import asdict, define, evolve, field

from shimhub.config import read_node_file
from shimhub.config_schema import ImagesConfig, RegistryConfig
from shimhub.errors import ConfigError

log = logging.getLogger(__name__)

#: Most bytes read of one such file (they are a few KiB).
MAX_FILE_BYTES = 1 << 20


@define
class NodeRegistries:
    """What the node's files say: registry hosts with their source file, search registries, what is left out."""

    registries: dict[str, RegistryConfig] = field(factory=dict)
    sources: dict[str, str] = field(factory=dict)
    search_registries: list[str] | None = None
    search_source: str = ""
    left_out: list[str] = field(factory=list)

    def summary(self) -> dict[str, Any]:
        """For verbose Status: each registry host's settings with the file they came from."""
        return {
            "registries": {
                host: {"source": self.sources[host], **asdict(entry)} for host, entry in sorted(self.registries.items())
            },
            "search_registries": {"value": self.search_registries, "source": self.search_source},
            "left_out": self.left_out,
        }

    def add(self, host: str, entry: RegistryConfig, source: str) -> None:
        """`host` from `source`, unless an earlier source already has it."""
        if host not in self.registries:
            self.registries[host] = entry
            self.sources[host] = source


def _read(path: Path) -> dict[str, Any]:
    data = read_node_file(path, MAX_FILE_BYTES, "its registry settings")
    try:
        return tomllib.loads(data.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def _host_only(value: str) -> str | None:
    """`value` when it is a bare host[:port] (no scheme, no path, no wildcard)."""
    return value if value and "/" not in value and "*" not in value else None


def read_registries_conf(main: Path, found: NodeRegistries) -> None:
    """containers-registries.conf(5) v2: `main`, then its `.d` directory's `*.conf` in name order."""
    files = [main] if main.is_file() else []
    dropins = main.parent / f"{main.name}.d"
    if dropins.is_dir():
        files += sorted(path for path in dropins.iterdir() if path.suffix == ".conf" and path.is_file())
    tables: dict[str, tuple[dict[str, Any], str]] = {}
    for path in files:
        document = _read(path)
        if "registries" in document:
            found.left_out.append(f"{path}: the version 1 format ([registries.search] and so on) is not read")
        if "unqualified-search-registries" in document:
            found.search_registries = [str(host) for host in document["unqualified-search-registries"]]
            found.search_source = str(path)
        if document.get("short-name-mode", "enforcing") != "enforcing":
            found.left_out.append(
                f"{path}: short-name-mode {document['short-name-mode']!r}: shimhub refuses an ambiguous short name "
                "(as enforcing does without a terminal)"
            )
        if document.get("aliases"):
            found.left_out.append(f"{path}: [aliases] (short-name aliases) are not read")
        for table in document.get("registry", []):
            key = str(table.get("prefix") or table.get("location") or "")
            tables[key] = (table, str(path))  # a later file's entry for the same prefix replaces it
    for key, (table, source) in tables.items():
        _registry_table(key, table, source, found)


def _registry_table(key: str, table: dict[str, Any], source: str, found: NodeRegistries) -> None:
    host = _host_only(key)
    if host is None:
        found.left_out.append(f"{source}: [[registry]] {key!r}: only a whole registry host is configured per entry")
        return
    location = str(table.get("location") or host)
    if _host_only(location) is None:
        found.left_out.append(f"{source}: [[registry]] {key!r}: location {location!r} is not a registry host")
        return
    mirrors: list[str] = []
    for mirror in table.get("mirror", []):
        where = _host_only(str(mirror.get("location", "")))
        digest_only = table.get("mirror-by-digest-only") or mirror.get("pull-from-mirror", "all") != "all"
        if where is None or digest_only:
            why = "pulls of digests or tags only" if digest_only else "not a registry host"
            found.left_out.append(f"{source}: mirror {mirror.get('location')!r} of {key!r}: {why}")
            continue
        mirrors.append(where)
        found.add(where, RegistryConfig(insecure=bool(mirror.get("insecure", False))), source)
    insecure = bool(table.get("insecure", False))
    if location != host:  # the prefix is reached at another registry, never itself
        mirrors.append(location)
        found.add(location, RegistryConfig(insecure=insecure), source)
    entry = RegistryConfig(
        insecure=insecure, mirrors=mirrors, mirror_only=location != host, blocked=bool(table.get("blocked", False))
    )
    found.add(host, entry, source)


def read_hosts_dir(directory: Path, found: NodeRegistries) -> None:
    """containerd's hosts directory: `<directory>/<registry host>/hosts.toml`, mirrors that resolve and pull."""
    if not directory.is_dir():
        return
    for config in sorted(directory.glob("*/hosts.toml")):
        name, source = config.parent.name, str(config)
        if name == "_default":
            found.left_out.append(f"{source}: _default (settings for every host) is not read")
            continue
        document = _read(config)
        mirrors: list[str] = []
        for url, host_table in document.get("host", {}).items():
            mirror = _host_url(url, source, found)
            if mirror is None:
                continue
            capabilities = host_table.get("capabilities", ["pull", "resolve", "push"])
            if not {"pull", "resolve"} <= set(capabilities):
                found.left_out.append(f"{source}: host {url!r}: a mirror that does not resolve tags")
                continue
            mirrors.append(mirror.netloc)
            found.add(mirror.netloc, _tls(mirror.scheme, host_table, source, found), source)
        server = _host_url(str(document.get("server", f"https://{name}")), source, found)
        upstream = _tls(server.scheme if server else "https", document, source, found)
        if server is None or server.netloc == name:
            found.add(name, evolve(upstream, mirrors=mirrors), source)
            continue
        found.add(server.netloc, upstream, source)  # the registry is reached at another host, never itself
        found.add(name, RegistryConfig(mirrors=[*mirrors, server.netloc], mirror_only=True), source)


def _host_url(url: str, source: str, found: NodeRegistries) -> Any:
    parts = urlsplit(url if "://" in url else f"https://{url}")
    if parts.scheme not in ("http", "https") or parts.path.strip("/") not in ("", "v2"):
        found.left_out.append(f"{source}: {url!r}: only http(s)://host[:port] URLs are read")
        return None
    return parts


def _tls(scheme: str, table: dict[str, Any], source: str, found: NodeRegistries) -> RegistryConfig:
    ca = table.get("ca", "")
    if isinstance(ca, list):
        if len(ca) > 1:
            found.left_out.append(f"{source}: more than one ca file: the first is used")
        ca = ca[0] if ca else ""
    if table.get("client"):
        found.left_out.append(f"{source}: client certificates are not read")
    return RegistryConfig(insecure=scheme == "http", ca_file=str(ca), skip_verify=bool(table.get("skip_verify")))


def merged(images: ImagesConfig, search_is_shimhubs: bool) -> tuple[ImagesConfig, NodeRegistries]:
    """`images` with what the node's registries.conf and hosts directory add, and where each came from."""
    found = NodeRegistries()
    for host, entry in images.registries.items():
        found.add(host, entry, "shimhub")
    if images.registries_conf:
        read_registries_conf(Path(images.registries_conf), found)
    if images.hosts_dir:
        read_hosts_dir(Path(images.hosts_dir), found)
    for reason in found.left_out:
        log.warning("registry settings left out: %s", reason)
    if found.search_registries is None or search_is_shimhubs:
        found.search_registries, found.search_source = images.search_registries, "shimhub"
    return evolve(images, registries=found.registries, search_registries=found.search_registries), found

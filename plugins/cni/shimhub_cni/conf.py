"""CNI network configurations: the first valid file of the config directory, reloaded when files change."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from attrs import define, field

#: CNI specification versions this backend speaks.
SUPPORTED_VERSIONS = ("0.4.0", "1.0.0")
EXTENSIONS = (".conflist", ".conf", ".json")


@define(frozen=True)
class NetworkList:
    """One network: its name, version and plugin chain, as the CNI spec's configuration list."""

    name: str
    cni_version: str
    plugins: list[dict[str, Any]]
    source: str
    #: The whole document, cached with each pod's result so that DEL after a restart uses the same config.
    document: dict[str, Any] = field(factory=dict)


def parse(path: Path) -> NetworkList:
    """A file's network list; ValueError with the reason when it is not a valid one."""
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path.name}: not readable JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ValueError(f"{path.name}: not a JSON object")
    if "plugins" not in document:  # a single-plugin .conf file
        if "type" not in document:
            raise ValueError(f"{path.name}: neither a plugin list nor a plugin (no 'plugins', no 'type')")
        plugin = {k: v for k, v in document.items() if k not in ("name", "cniVersion")}
        document = {"cniVersion": document.get("cniVersion", ""), "name": document.get("name", ""), "plugins": [plugin]}
    name, version, plugins = document.get("name"), document.get("cniVersion"), document.get("plugins")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{path.name}: no network name")
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(
            f"{path.name}: cniVersion {version!r} is not supported (supported: {', '.join(SUPPORTED_VERSIONS)})"
        )
    if not isinstance(plugins, list) or not plugins:
        raise ValueError(f"{path.name}: 'plugins' must be a non-empty list")
    for index, plugin in enumerate(plugins):
        if not isinstance(plugin, dict) or not isinstance(plugin.get("type"), str) or not plugin["type"]:
            raise ValueError(f"{path.name}: plugin {index} has no 'type'")
        if "/" in plugin["type"]:
            raise ValueError(f"{path.name}: plugin type {plugin['type']!r} must be a bare name")
    return NetworkList(name=name, cni_version=version, plugins=plugins, source=str(path), document=document)


class ConfigDirectory:
    """The default network of a config directory, re-read whenever its files change."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._signature: tuple[tuple[str, int], ...] | None = None
        self._network: NetworkList | None = None
        self._problem = ""

    def _current_signature(self) -> tuple[tuple[str, int], ...]:
        try:
            entries = sorted(os.scandir(self.directory), key=lambda e: e.name)
        except OSError:
            return ()
        return tuple((e.name, e.stat().st_mtime_ns) for e in entries if e.name.endswith(EXTENSIONS) and e.is_file())

    def network(self) -> tuple[NetworkList | None, str]:
        """(the default network, "") or (None, why there is none)."""
        signature = self._current_signature()
        with self._lock:
            if signature != self._signature:
                self._signature = signature
                self._network, self._problem = self._load([name for name, _mtime in signature])
            return self._network, self._problem

    def _load(self, names: list[str]) -> tuple[NetworkList | None, str]:
        if not names:
            return None, f"no network config in {self.directory}"
        problems = []
        for name in names:
            try:
                return parse(self.directory / name), ""
            except ValueError as exc:
                problems.append(str(exc))
        return None, f"no valid network config in {self.directory}: " + "; ".join(problems)

"""Extensions: loaded by name, each called on its own so that one's failure is its own.

An extension observes lifecycle events and may adjust a container's OCI spec
before the runtime creates it. Whatever an extension raises is logged at
error level with the extension's name; the request goes on without its change.
NRI plugins adjust the spec in the same place, after the extensions.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import pluggy

from shimhub.errors import PluginLoadError
from shimhub.hookspecs import KINDS, PROJECT
from shimhub.plugins import PluginMissing, load_class, register
from shimhub.records import ContainerRecord, SandboxRecord


class SpecAdjuster(Protocol):
    """What adjusts a container's spec after the extensions, and may refuse it (NRI)."""

    def create_container(self, sandbox: SandboxRecord, container: ContainerRecord, spec: dict[str, Any]) -> None: ...


log = logging.getLogger(__name__)


class Extensions:
    """The extensions named in the config, called one by one in the order pluggy gives."""

    def __init__(self, names: list[str]) -> None:
        #: NRI, when enabled: its plugins adjust specs after the extensions, and their refusals are errors.
        self.nri: SpecAdjuster | None = None
        self.manager = pluggy.PluginManager(PROJECT)
        self.manager.add_hookspecs(KINDS["extension"][1])
        for name in names:
            try:
                plugin_class, label = load_class("extension", name)
            except PluginMissing as exc:
                raise PluginLoadError(f"extensions: {exc}") from None
            register(self.manager, plugin_class, name, label)

    def _call_each(self, hook: str, **kwargs: Any) -> None:
        for impl in getattr(self.manager.hook, hook).get_hookimpls():
            try:
                impl.function(**{name: kwargs[name] for name in impl.argnames})
            except Exception:
                log.exception("extension %r failed in %s; its change is left out", impl.plugin_name, hook)

    def adjust_oci_spec(self, sandbox: SandboxRecord, container: ContainerRecord, spec: dict[str, Any]) -> None:
        """Let every extension, then every NRI plugin, adjust `spec` in place."""
        self._call_each("shimhub_adjust_oci_spec", sandbox=sandbox, container=container, spec=spec)
        if self.nri is not None:
            self.nri.create_container(sandbox, container, spec)

    def lifecycle_event(self, event: str, sandbox: SandboxRecord, container: ContainerRecord | None) -> None:
        """Tell every extension about a lifecycle change."""
        self._call_each("shimhub_lifecycle_event", event=event, sandbox=sandbox, container=container)

    def shimhub_adjust_oci_spec(self, sandbox: SandboxRecord, container: ContainerRecord, spec: dict[str, Any]) -> None:
        """The hook-relay spelling runtimes of API 1.0-1.3 call; the same as `adjust_oci_spec`."""
        self.adjust_oci_spec(sandbox, container, spec)

"""Extensions: loaded by name, called through pluggy's own call loop.

An extension observes lifecycle events and may adjust a container's OCI spec
before the runtime creates it. pluggy calls the implementations in its order
(``tryfirst``/``trylast``, last registered first) and runs wrappers
(``wrapper=True``, or the old ``hookwrapper=True``) around them.

Spec adjustments apply whole or not at all: the extensions work on a copy of
the spec, which replaces it only when every one of them returned. An
extension that raises `shimhub.errors.Refused` refuses the container:
CreateContainer fails with FAILED_PRECONDITION naming it and its reason. Any
other exception is a fault of that extension: it is logged at error level
under its name, the copy with everyone's edits is discarded, and the
adjustment runs again without it, so one broken extension neither blocks
containers nor leaves half its edits in a spec. NRI plugins adjust the spec
after the extensions.

A lifecycle event is delivered to each extension through a hook caller of
its own, so that one failing observer never keeps the event from the others.
"""

from __future__ import annotations

import copy
import logging
from types import TracebackType
from typing import Any, Protocol

import pluggy

from shimhub.errors import FailedPrecondition, PluginLoadError, Refused
from shimhub.hookspecs import KINDS, PROJECT
from shimhub.plugins import PluginMissing, load_class, register
from shimhub.records import ContainerRecord, SandboxRecord


class SpecAdjuster(Protocol):
    """What adjusts a container's spec after the extensions, and may refuse it or its pod (NRI)."""

    def create_container(self, sandbox: SandboxRecord, container: ContainerRecord, spec: dict[str, Any]) -> None: ...

    def run_pod_sandbox(self, sandbox: SandboxRecord) -> None: ...


log = logging.getLogger(__name__)
ADJUST = "shimhub_adjust_oci_spec"
EVENT = "shimhub_lifecycle_event"


def _culprit(impls: list[pluggy.HookImpl], traceback: TracebackType | None) -> str:
    """The extension whose implementation raised: the innermost frame that is one of `impls`."""
    codes = {impl.function.__code__: impl.plugin_name for impl in impls}
    found = ""
    while traceback is not None:
        found = codes.get(traceback.tb_frame.f_code, found)
        traceback = traceback.tb_next
    return found


class Extensions:
    """The extensions named in the config, registered with one pluggy plugin manager."""

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

    def _plugins(self, hook: str) -> list[str]:
        """The extensions implementing `hook`, in the order pluggy calls them."""
        names: list[str] = []
        for impl in reversed(getattr(self.manager.hook, hook).get_hookimpls()):
            if impl.plugin_name not in names:
                names.append(impl.plugin_name)
        return names

    def _others(self, kept: set[str]) -> list[object]:
        return [plugin for name, plugin in self.manager.list_name_plugin() if name not in kept]

    def pod_sandbox_starting(self, sandbox: SandboxRecord) -> None:
        """Tell the NRI plugins of a pod set up and about to be ready; one that answers an error refuses it."""
        if self.nri is not None:
            self.nri.run_pod_sandbox(sandbox)

    def adjust_oci_spec(self, sandbox: SandboxRecord, container: ContainerRecord, spec: dict[str, Any]) -> None:
        """Let the extensions, then the NRI plugins, adjust `spec`: each change whole or not at all."""
        if getattr(self.manager.hook, ADJUST).get_hookimpls():  # else there is no copy to make
            self._adjust(sandbox, container, spec)
        if self.nri is not None:
            self.nri.create_container(sandbox, container, spec)

    def _adjust(self, sandbox: SandboxRecord, container: ContainerRecord, spec: dict[str, Any]) -> None:
        excluded: list[str] = []
        while True:
            caller = self.manager.subset_hook_caller(
                ADJUST, remove_plugins=[self.manager.get_plugin(n) for n in excluded]
            )
            edited = copy.deepcopy(spec)
            try:
                caller(sandbox=sandbox, container=container, spec=edited)
            except Refused as refusal:
                name = _culprit(caller.get_hookimpls(), refusal.__traceback__) or "an extension"
                raise FailedPrecondition(
                    f"extension {name!r} refused container {container.name!r}: {refusal}"
                ) from None
            except Exception as exc:
                name = _culprit(caller.get_hookimpls(), exc.__traceback__)
                if not name:
                    raise
                log.error(
                    "extension %r failed in %s for container %s; its changes and the others' are discarded "
                    "and the spec adjusted again without it: %s: %s",
                    name,
                    ADJUST,
                    container.id[:12],
                    type(exc).__name__,
                    exc,
                    exc_info=exc,
                )
                excluded.append(name)
                continue
            spec.clear()
            spec.update(edited)
            return

    def lifecycle_event(self, event: str, sandbox: SandboxRecord, container: ContainerRecord | None) -> None:
        """Tell every extension about a lifecycle change, each through a hook caller of its own."""
        for name in self._plugins(EVENT):
            caller = self.manager.subset_hook_caller(EVENT, remove_plugins=self._others({name}))
            try:
                caller(event=event, sandbox=sandbox, container=container)
            except Exception:
                log.exception("extension %r failed in %s (%s)", name, EVENT, event)

    def shimhub_adjust_oci_spec(self, sandbox: SandboxRecord, container: ContainerRecord, spec: dict[str, Any]) -> None:
        """The hook-relay spelling runtimes of API 1.0-1.3 call; the same as `adjust_oci_spec`."""
        self.adjust_oci_spec(sandbox, container, spec)

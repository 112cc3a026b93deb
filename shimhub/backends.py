"""A configured plugin instance that may be missing or not ready.

Runtime handlers, the network backend and storage drivers are all set up the
same way: load the plugin, call its ``<kind>_setup`` hook, and remember how
ready it is. A plugin that is not installed, or that reports the node cannot
run it, is kept as a disabled backend with the reason, so the daemon still
starts and Status tells the operator what is wrong.
"""

from __future__ import annotations

import logging
from typing import Any

from shimhub import plugins
from shimhub.errors import ConfigError, FailedPrecondition, ShimhubError
from shimhub.hooktypes import PluginContext, Readiness
from shimhub.plugins import LoadedPlugin, PluginMissing

log = logging.getLogger(__name__)


class Backend:
    """One plugin instance of `kind`, set up for one use (a handler, the network, a driver)."""

    def __init__(self, kind: str, role: str, plugin: LoadedPlugin | None, readiness: Readiness) -> None:
        self.kind = kind
        #: What the backend is for, in messages: "runtime handler 'kata'", "network backend 'cni'".
        self.role = role
        self.plugin = plugin
        self.setup_readiness = readiness

    @classmethod
    def setup(
        cls, kind: str, role: str, plugin_name: str, config_key: str, context: PluginContext, **kwargs: Any
    ) -> Backend:
        """Load plugin `plugin_name` and run its setup hook with `kwargs` and `context`.

        PluginLoadError and ConfigError (naming `config_key`) propagate: they stop
        the daemon. A missing plugin or one that reports not ready gives a disabled backend.
        """
        try:
            plugin = plugins.load(kind, plugin_name)
        except PluginMissing as exc:
            log.warning("%s is disabled: %s", role, exc)
            return cls(kind, role, None, Readiness(ready=False, reason=str(exc)))
        try:
            readiness = plugin.call(f"{kind}_setup", context=context, **kwargs)
        except ConfigError as exc:
            raise ConfigError(f"{config_key}: {exc}") from None
        except ShimhubError as exc:
            readiness = Readiness(ready=False, reason=exc.message)
        if not isinstance(readiness, Readiness):
            raise plugins.PluginLoadError(f"{plugin.label}: {kind}_setup returned {readiness!r}, not a Readiness")
        if not readiness.ready:
            log.warning("%s is disabled: %s", role, readiness.reason)
        return cls(kind, role, plugin, readiness)

    def readiness(self) -> Readiness:
        """How ready the backend is now: the plugin's answer when it has a readiness hook, else as at setup."""
        hook = f"{self.kind}_readiness"  # not every kind has one
        if self.plugin is None or not self.plugin.has_hook(hook) or not self.plugin.implements(hook):
            return self.setup_readiness
        try:
            current = self.plugin.call(hook)
        except ShimhubError as exc:
            return Readiness(ready=False, reason=exc.message, features=self.setup_readiness.features)
        return current if isinstance(current, Readiness) else self.setup_readiness

    def require(self) -> LoadedPlugin:
        """The plugin, if it is ready now; FailedPrecondition with the reason otherwise."""
        readiness = self.readiness()
        if self.plugin is None or not readiness.ready:
            raise FailedPrecondition(f"{self.role} is not ready: {readiness.reason}")
        return self.plugin

    def installed(self) -> LoadedPlugin:
        """The plugin even when it is not ready (to stop and remove what it made); FailedPrecondition if absent."""
        if self.plugin is None:
            raise FailedPrecondition(f"{self.role} is not available: {self.setup_readiness.reason}")
        return self.plugin

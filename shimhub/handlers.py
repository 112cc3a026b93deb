"""Runtime handlers: which runtime plugin runs a pod, and what it may see.

The kubelet names a handler with RunPodSandbox's ``runtime_handler`` (the
RuntimeClass's ``handler``); "" means ``default_runtime``. When the kubelet
sends "", a pod may instead pick a handler marked ``selectable`` with the
configured handler annotation, and the legacy Clear Containers annotation
``io.kubernetes.cri-o.TrustedSandbox: "false"`` selects ``untrusted_runtime``.
A handler's plugin only ever sees the pod's annotations that match the
handler's ``allowed_annotations`` prefixes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from shimhub.backends import Backend
from shimhub.config import Config, HandlerConfig
from shimhub.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from shimhub.hooktypes import PluginContext, SpecOptions
from shimhub.plugins import LoadedPlugin

log = logging.getLogger(__name__)

TRUSTED_SANDBOX_ANNOTATION = "io.kubernetes.cri-o.TrustedSandbox"


class Handler:
    """A runtime handler: its config and its runtime plugin instance."""

    def __init__(self, name: str, config: HandlerConfig, backend: Backend) -> None:
        self.name = name
        self.config = config
        self.backend = backend

    def require(self) -> LoadedPlugin:
        """The handler's plugin, if the handler can run pods now."""
        return self.backend.require()

    def installed(self) -> LoadedPlugin:
        """The handler's plugin even when not ready, to stop and remove existing pods."""
        return self.backend.installed()

    @property
    def spec_options(self) -> SpecOptions:
        """How the core builds the handler's pods and specs, as its plugin said at setup."""
        return self.backend.setup_readiness.spec_options

    def allowed_annotations(self, annotations: Mapping[str, str]) -> dict[str, str]:
        """The subset of `annotations` this handler's plugin may see."""
        prefixes = tuple(self.config.allowed_annotations)
        return {key: value for key, value in annotations.items() if prefixes and key.startswith(prefixes)}


ContextFactory = Callable[[str, str], PluginContext]


class HandlerRegistry:
    """All configured handlers, and the rules that pick one for a pod."""

    def __init__(self, config: Config, handlers: dict[str, Handler], retired: dict[str, Handler]) -> None:
        self.config = config
        self.handlers = handlers
        #: Handlers removed from the config that existing pods still use.
        self.retired = retired

    @classmethod
    def build(
        cls,
        config: Config,
        make_context: ContextFactory,
        previous: HandlerRegistry | None = None,
        in_use: frozenset[str] = frozenset(),
    ) -> HandlerRegistry:
        """Set up every handler of `config`, reusing unchanged ones from `previous`."""
        handlers: dict[str, Handler] = {}
        for name, handler_config in config.runtimes.items():
            old = previous.handlers.get(name) if previous else None
            if old is not None and old.config == handler_config:
                handlers[name] = old
                continue
            backend = Backend.setup(
                "runtime",
                f"runtime handler {name!r}",
                handler_config.plugin,
                f"[runtimes.{name}.options]",
                make_context("runtime", name),
                options=dict(handler_config.options),
            )
            handlers[name] = Handler(name, handler_config, backend)
        retired: dict[str, Handler] = {}
        if previous:
            for name in in_use - handlers.keys():
                old = previous.handlers.get(name) or previous.retired.get(name)
                if old is not None:
                    log.warning("runtime handler %r was removed from the config; it stays for its existing pods", name)
                    retired[name] = old
        return cls(config, handlers, retired)

    def get(self, name: str) -> Handler:
        """The handler an existing pod runs on."""
        handler = self.handlers.get(name) or self.retired.get(name)
        if handler is None:
            raise FailedPrecondition(f"runtime handler {name!r} is no longer configured")
        return handler

    def select(self, runtime_handler: str, annotations: Mapping[str, str]) -> Handler:
        """The handler for a new pod, by the rules in this module's docstring."""
        if runtime_handler:
            handler = self.handlers.get(runtime_handler)
            if handler is None:
                known = ", ".join(sorted(self.handlers))
                raise InvalidArgument(f"unknown runtime handler {runtime_handler!r} (configured: {known})")
            return handler
        key = self.config.handler_annotation
        if key and annotations.get(key):
            return self._by_annotation(annotations[key])
        if annotations.get(TRUSTED_SANDBOX_ANNOTATION, "").lower() == "false" and self.config.untrusted_runtime:
            return self.handlers[self.config.untrusted_runtime]
        return self.handlers[self.config.default_runtime]

    def _by_annotation(self, name: str) -> Handler:
        key = self.config.handler_annotation
        handler = self.handlers.get(name)
        if handler is None:
            raise InvalidArgument(f"annotation {key} names unknown runtime handler {name!r}")
        if not handler.config.selectable:
            raise PermissionDenied(
                f"runtime handler {name!r} may not be selected by annotation {key}: "
                f"set selectable = true in [runtimes.{name}] to allow it"
            )
        return handler

"""Finding, loading and calling plugins.

Plugins are Python entry points (see ``shimhub.hookspecs``), found and loaded
by name with stevedore. Each loaded instance gets a pluggy plugin manager of
its own kind, which checks its hook implementations against the hook
specifications. Anything wrong with a plugin that is installed (it does not
import, declares an incompatible API version, implements a hook wrongly,
misses a required hook, or two distributions claim the same name) is a
PluginLoadError naming the distribution and entry point; a plugin that is not
installed at all is PluginMissing, which callers treat as "not available".
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

import pluggy
import stevedore
from attrs import define

from shimhub import telemetry
from shimhub.errors import ConfigError, PluginFailed, PluginLoadError, ShimhubError, Unimplemented
from shimhub.hookspecs import API_VERSION, KINDS, PROJECT
from shimhub.hookspecs_v1 import RUNTIME_V1

log = logging.getLogger(__name__)


class PluginMissing(Exception):
    """No installed distribution provides the plugin."""


@define
class PluginInfo:
    """What `shimhub plugins` shows of one entry point."""

    kind: str
    name: str
    target: str
    distribution: str
    version: str
    status: str


def _describe(entry_point: EntryPoint) -> tuple[str, str]:
    dist = getattr(entry_point, "dist", None)
    if dist is None:
        return "unknown distribution", ""
    return dist.name, dist.version


def _label(kind: str, entry_point: EntryPoint) -> str:
    distribution, version = _describe(entry_point)
    group = KINDS[kind][0]
    return f"{kind} plugin {entry_point.name!r} ({group} = {entry_point.value}, distribution {distribution} {version})"


def _entry_points(kind: str) -> list[EntryPoint]:
    """The entry points of `kind`, without importing anything, each distribution once."""
    unique: dict[tuple[str, str, str], EntryPoint] = {}
    for entry_point in entry_points(group=KINDS[kind][0]):
        unique.setdefault((entry_point.name, entry_point.value, _describe(entry_point)[0]), entry_point)
    return sorted(unique.values(), key=lambda ep: ep.name)


def installed(kind: str, name: str) -> bool:
    """Whether a distribution provides plugin `name` of `kind` (nothing is imported)."""
    return any(entry_point.name == name for entry_point in _entry_points(kind))


def load_class(kind: str, name: str) -> tuple[type, str]:
    """Import the class behind plugin `name` of `kind`; return it with a label for messages."""
    found = [ep for ep in _entry_points(kind) if ep.name == name]
    if not found:
        raise PluginMissing(f"no {kind} plugin named {name!r} is installed (entry point group {KINDS[kind][0]})")
    if len(found) > 1:
        claimants = "; ".join(_label(kind, ep) for ep in found)
        raise PluginLoadError(f"{len(found)} distributions provide {kind} plugin {name!r}: {claimants}")
    entry_point = found[0]
    label = _label(kind, entry_point)
    plugin_class = _import(kind, entry_point, label)
    api_version(plugin_class, label)
    return plugin_class, label


class _ImportFailed(Exception):
    """stevedore could not import the entry point it found."""

    def __init__(self, entry_point: EntryPoint, exc: BaseException) -> None:
        super().__init__(f"{type(exc).__name__}: {exc}")
        self.entry_point = entry_point


def _import(kind: str, entry_point: EntryPoint, label: str) -> type:
    """The class behind `entry_point`, through stevedore; its entry-point cache rebuilt once when stale."""
    for attempt in (1, 2):
        try:
            driver = stevedore.DriverManager(
                namespace=KINDS[kind][0],
                name=entry_point.name,
                invoke_on_load=False,
                on_load_failure_callback=_raise_load_failure,
            )
        except stevedore.exception.NoMatches:
            cached = "no such entry point"
        except _ImportFailed as exc:
            if exc.entry_point.value == entry_point.value:
                raise PluginLoadError(f"{label}: cannot be imported: {exc}") from exc
            cached = exc.entry_point.value
        else:
            cached = driver.extensions[0].entry_point.value
            if cached == entry_point.value:
                return driver.driver
        if attempt == 1:
            log.warning(
                "stale entry-point cache (stevedore has %s for %s, the installed distribution %s): rebuilding it",
                cached, label, entry_point.value,
            )  # fmt: skip
            _forget_entry_point_cache()
    raise PluginLoadError(f"{label}: stevedore's entry-point cache still has {cached} after it was rebuilt")


def _forget_entry_point_cache() -> None:
    """Drop stevedore's caches of this interpreter's entry points, file and memory (it has no public call)."""
    from stevedore import _cache

    digest, _paths = _cache._hash_settings_for_path(tuple(sys.path))
    Path(_cache._c._dir, digest).unlink(missing_ok=True)
    _cache._c._internal.clear()
    stevedore.ExtensionManager.ENTRY_POINT_CACHE.clear()


def _raise_load_failure(_manager: object, entry_point: EntryPoint, exc: BaseException) -> None:
    raise _ImportFailed(entry_point, exc) from exc


#: The older plugin API still loaded, up to its last minor (runtimes through `hookspecs_v1.RuntimeSpecV1`).
OLDER_API = (1, 6)


def api_version(plugin_class: type, label: str) -> tuple[int, int]:
    """The plugin API version `plugin_class` declares, if this shimhub can load it."""
    declared = getattr(plugin_class, "shimhub_api", None)
    if not isinstance(declared, str):
        raise PluginLoadError(f'{label}: declares no shimhub_api = "MAJOR.MINOR" (this shimhub provides {API_VERSION})')
    try:
        major, minor = (int(part) for part in declared.split("."))
    except ValueError:
        raise PluginLoadError(f"{label}: shimhub_api {declared!r} is not of the form MAJOR.MINOR") from None
    core_major, core_minor = (int(part) for part in API_VERSION.split("."))
    known = (major == core_major and minor <= core_minor) or (major == OLDER_API[0] and minor <= OLDER_API[1])
    if not known:
        raise PluginLoadError(f"{label}: written for plugin API {declared}, this shimhub provides {API_VERSION}")
    return major, minor


class LoadedPlugin:
    """One plugin instance with its own hook relay; `call` runs one of its hooks."""

    def __init__(self, kind: str, name: str, plugin_class: type, label: str) -> None:
        self.kind = kind
        self.name = name
        self.label = label
        #: The plugin API major the plugin was written for.
        self.api_major = api_version(plugin_class, label)[0]
        legacy_runtime = kind == "runtime" and self.api_major == 1
        specs, required = (RUNTIME_V1[0], RUNTIME_V1[1]) if legacy_runtime else KINDS[kind][1:]
        self.manager = pluggy.PluginManager(PROJECT)
        self.manager.add_hookspecs(specs)
        with warnings.catch_warnings(record=True) as deprecated:
            warnings.simplefilter("always", DeprecationWarning)
            self.instance = register(self.manager, plugin_class, name, label)
        for warning in {str(w.message) for w in deprecated}:
            log.warning("%s: %s", label, warning)
        missing = [hook for hook in required if not self.implements(hook)]
        if missing:
            raise PluginLoadError(f"{label}: does not implement required hook(s) {', '.join(missing)}")
        if legacy_runtime:
            current, old = RUNTIME_V1[2]
            if not all(map(self.implements, current)) and not all(map(self.implements, old)):
                raise PluginLoadError(
                    f"{label}: does not implement required hook(s) {' and '.join(current)} "
                    f"(or the deprecated {' and '.join(old)})"
                )

    @property
    def builds_own_spec(self) -> bool:
        """Whether the plugin is a runtime of API 1.x, which sets its pods up and builds its specs itself."""
        return self.kind == "runtime" and self.api_major == 1

    def takes(self, hook: str, argument: str) -> bool:
        """Whether the plugin's implementation of `hook` takes `argument` (pluggy passes only those)."""
        caller = getattr(self.manager.hook, hook, None)
        return caller is not None and any(argument in impl.argnames for impl in caller.get_hookimpls())

    def has_hook(self, hook: str) -> bool:
        """Whether `hook` is a hook of the plugin's specification (implemented or not)."""
        caller = getattr(self.manager.hook, hook, None)
        return caller is not None and caller.spec is not None

    def implements(self, hook: str) -> bool:
        """Whether the plugin implements `hook`; TypeError for a name that is no hook of its specification
        (a misspelled hook is the core's error, not a plugin that lacks it)."""
        if not self.has_hook(hook):
            raise TypeError(f"{self.kind} plugins of API {self.api_major}.x have no hook {hook!r}")
        return bool(getattr(self.manager.hook, hook).get_hookimpls())

    def require_hook(self, hook: str) -> None:
        """Raise Unimplemented unless the plugin implements `hook`."""
        if not self.implements(hook):
            raise Unimplemented(f"{self.kind} plugin {self.name!r} does not implement {hook}")

    def call(self, hook: str, /, **kwargs: Any) -> Any:
        """Call `hook`; errors other than ShimhubError and ConfigError become PluginFailed naming the plugin.

        A hook the plugin does not implement raises Unimplemented.
        """
        self.require_hook(hook)
        started = time.monotonic()
        try:
            return getattr(self.manager.hook, hook)(**kwargs)
        except (ShimhubError, ConfigError):
            raise
        except Exception as exc:
            log.exception("%s failed in %s", self.label, hook)
            raise PluginFailed(
                f"{self.kind} plugin {self.name!r} failed in {hook}: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            took = time.monotonic() - started
            log.debug("%s plugin %s: %s took %.1f ms", self.kind, self.name, hook, took * 1e3)
            telemetry.PLUGIN_SECONDS.labels(self.kind, self.name, hook).observe(took)


def register(manager: pluggy.PluginManager, plugin_class: type, name: str, label: str) -> object:
    """Instantiate `plugin_class` and register it, refusing hooks that do not match the specs."""
    try:
        instance = plugin_class()
        manager.register(instance, name=name)
        manager.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginLoadError(f"{label}: {exc}") from None
    except Exception as exc:
        raise PluginLoadError(f"{label}: cannot be instantiated: {type(exc).__name__}: {exc}") from exc
    return instance


def load(kind: str, name: str) -> LoadedPlugin:
    """Load plugin `name` of `kind` as a new instance."""
    plugin_class, label = load_class(kind, name)
    return LoadedPlugin(kind, name, plugin_class, label)


def discover() -> list[PluginInfo]:
    """Every installed plugin of every kind, each loaded once to report whether it loads."""
    found: list[PluginInfo] = []
    for kind in KINDS:
        for entry_point in _entry_points(kind):
            distribution, version = _describe(entry_point)
            try:
                load(kind, entry_point.name)
            except (PluginLoadError, PluginMissing) as exc:
                status = f"error: {exc}"
            else:
                status = "ok"
            found.append(PluginInfo(kind, entry_point.name, entry_point.value, distribution, version, status))
    return found

"""shimhub's configuration: TOML files structured into attrs classes.

The schema (the attrs classes) is in `shimhub.config_schema`, re-exported here.
The effective configuration is the embedded default (``default.toml``), then
the main file, then every ``*.toml`` in the drop-in directory beside it
(``shimhub.d``) in name order; later files override earlier ones key by key.
Any error names the file that set the offending key, the key, and what was
expected.
"""

from __future__ import annotations

import logging
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError

from shimhub.config_schema import (
    NRI_ADJUSTMENTS,
    CheckpointsConfig,
    Config,
    HandlerConfig,
    ImagesConfig,
    NetworkConfig,
    NriConfig,
    RegistryConfig,
    StorageConfig,
    StreamingConfig,
    UserNamespacesConfig,
)
from shimhub.errors import ConfigError

__all__ = [
    "CheckpointsConfig",
    "Config",
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_SOURCE",
    "HandlerConfig",
    "ImagesConfig",
    "NRI_ADJUSTMENTS",
    "NetworkConfig",
    "NriConfig",
    "RegistryConfig",
    "StorageConfig",
    "StreamingConfig",
    "UserNamespacesConfig",
    "config_files",
    "converter",
    "default_text",
    "dump",
    "load",
    "set_log_level",
    "split_address",
]

DEFAULT_CONFIG_PATH = Path("/etc/shimhub/shimhub.toml")
DEFAULT_SOURCE = "<embedded default>"

LOG_LEVELS = ("debug", "info", "warning", "error")
CGROUP_DRIVERS = ("cgroupfs", "systemd")
_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$")


def _strict_converter() -> cattrs.Converter:
    """A converter that refuses extra keys and never coerces between types."""
    conv = cattrs.Converter(forbid_extra_keys=True)

    def exact(kind: type, label: str):  # noqa: ANN202 - hook factory
        def structure(value: object, _type: type) -> object:
            if type(value) is bool and kind is not bool:
                raise TypeError(f"expected {label}, got a boolean")
            if kind is float and isinstance(value, int):
                return float(value)
            if not isinstance(value, kind):
                raise TypeError(f"expected {label}, got {type(value).__name__} {value!r}")
            return value

        return structure

    conv.register_structure_hook(str, exact(str, "a string"))
    conv.register_structure_hook(bool, exact(bool, "true or false"))
    conv.register_structure_hook(int, exact(int, "an integer"))
    conv.register_structure_hook(float, exact(float, "a number"))
    conv.register_structure_hook(Any, lambda value, _type: value)

    def string_list(value: object, _type: type) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise TypeError(f"expected a list of strings, got {value!r}")
        return list(value)

    conv.register_structure_hook_func(lambda t: t == list[str], string_list)
    return conv


converter = _strict_converter()


def _walk_errors(exc: BaseException, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], str]]:
    """Yield (key path, message) for every leaf error of a cattrs validation error."""
    if isinstance(exc, ClassValidationError | IterableValidationError):
        for sub in exc.exceptions:
            step = path
            for note in getattr(sub, "__notes__", []):
                if hasattr(note, "name"):
                    step = (*path, note.name)
                elif hasattr(note, "index"):
                    step = (*path, str(note.index))
            yield from _walk_errors(sub, step)
    elif isinstance(exc, ForbiddenExtraKeysError):
        for key in sorted(exc.extra_fields):
            yield (*path, key), "unknown key"
    elif isinstance(exc, KeyError):
        yield path, "required key is missing"
    else:
        yield path, str(exc)


class _Layers:
    """Merges TOML documents in order and remembers which file set each key."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.origin: dict[tuple[str, ...], str] = {}

    def add(self, doc: Mapping[str, Any], source: str) -> None:
        self._merge(self.data, doc, (), source)

    def _merge(self, into: dict[str, Any], doc: Mapping[str, Any], path: tuple[str, ...], source: str) -> None:
        for key, value in doc.items():
            here = (*path, key)
            # `options` tables belong to one plugin: a later file replaces them whole.
            if isinstance(value, dict) and isinstance(into.get(key), dict) and key != "options":
                self.origin.setdefault(here, source)
                self._merge(into[key], value, here, source)
            else:
                into[key] = value
                self.origin[here] = source
                self._forget_below(here)

    def _forget_below(self, path: tuple[str, ...]) -> None:
        for known in [p for p in self.origin if len(p) > len(path) and p[: len(path)] == path]:
            del self.origin[known]

    def source_of(self, path: tuple[str, ...]) -> str:
        """The file that set `path`, or the nearest enclosing table that was set."""
        for end in range(len(path), 0, -1):
            if path[:end] in self.origin:
                return self.origin[path[:end]]
        return DEFAULT_SOURCE


def read_node_file(path: str | Path, limit: int, what: str) -> bytes:
    """The bytes of the node's file `path`, at most `limit`; ConfigError naming it and `what` it is."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(limit + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror}") from None
    if len(raw) > limit:
        raise ConfigError(f"{path}: larger than {limit} bytes")
    return raw


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None


def default_text() -> str:
    """The embedded default configuration, as TOML text."""
    return resources.files("shimhub").joinpath("default.toml").read_text()


def config_files(main: Path) -> list[Path]:
    """The files that make up the configuration: the main file, then its drop-ins in name order."""
    files = [main] if main.exists() else []
    dropins = main.with_suffix(".d")
    if dropins.is_dir():
        files += sorted(p for p in dropins.iterdir() if p.suffix == ".toml" and p.is_file())
    return files


def load(main: Path | None = None, *, required: bool = False, overrides: Mapping[str, Any] | None = None) -> Config:
    """Load the effective configuration.

    `main` defaults to /etc/shimhub/shimhub.toml. A missing main file is fine
    (the embedded default applies) unless `required`, e.g. when the operator
    named the file explicitly. `overrides` (top-level keys, e.g. from the
    command line) apply last.
    """
    main = main or DEFAULT_CONFIG_PATH
    if required and not main.exists():
        raise ConfigError(f"{main}: no such configuration file")
    layers = _Layers()
    layers.add(tomllib.loads(default_text()), DEFAULT_SOURCE)
    for path in config_files(main):
        layers.add(_read_toml(path), str(path))
    if overrides:
        layers.add(overrides, "command line")
    return _structure(layers)


def _structure(layers: _Layers) -> Config:
    try:
        config = converter.structure(layers.data, Config)
    except (ClassValidationError, IterableValidationError) as exc:
        problems = [
            f"{layers.source_of(path)}: {'.'.join(path) or '(top level)'}: {message}"
            for path, message in _walk_errors(exc, ())
        ]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems)) from None
    _check_values(config, layers)
    return config


def split_address(address: str) -> tuple[str, int] | None:
    """(host, port) of "host:port" or "[v6 address]:port"; None when it is not of that form."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        return None
    return host, int(port)


def _check_values(config: Config, layers: _Layers) -> None:
    """Checks of values and of references between keys, each naming its key."""
    problems: list[str] = []

    def bad(path: tuple[str, ...], message: str) -> None:
        problems.append(f"{layers.source_of(path)}: {'.'.join(path)}: {message}")

    _check_settings(config, bad)
    _check_handlers(config, bad)
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))


Complaint = Callable[[tuple[str, ...], str], None]


def _check_settings(config: Config, bad: Complaint) -> None:
    for key in ("socket", "state_dir", "run_dir"):
        if not getattr(config, key).startswith("/"):
            bad((key,), f"expected an absolute path, got {getattr(config, key)!r}")
    if not config.storage.root.startswith("/"):
        bad(("storage", "root"), f"expected an absolute path, got {config.storage.root!r}")
    for key, choices in (("log_level", LOG_LEVELS), ("cgroup_driver", CGROUP_DRIVERS)):
        if getattr(config, key) not in choices:
            bad((key,), f"expected one of {', '.join(choices)}, got {getattr(config, key)!r}")
    addresses = {("metrics_address",): config.metrics_address, ("streaming", "address"): config.streaming.address}
    for path, address in addresses.items():
        if address and split_address(address) is None:
            bad(path, f"expected host:port (port 0 picks a free one), got {address!r}")
    for key in ("token_ttl", "stream_creation_timeout"):
        if getattr(config.streaming, key) <= 0:
            bad(("streaming", key), f"expected a number of seconds > 0, got {getattr(config.streaming, key)}")
    if config.streaming.idle_timeout < 0:
        bad(("streaming", "idle_timeout"), f"expected a number of seconds >= 0, got {config.streaming.idle_timeout}")
    if config.shutdown_grace < 0:
        bad(("shutdown_grace",), f"expected a number of seconds >= 0, got {config.shutdown_grace}")
    _check_user_namespaces(config.user_namespaces, bad)
    _check_nri(config.nri, bad)
    if config.checkpoints.default_timeout <= 0 or config.checkpoints.max_archive_bytes < 0:
        bad(("checkpoints",), "expected default_timeout > 0 and max_archive_bytes >= 0")
    _check_images(config.images, bad)


def _check_nri(settings: NriConfig, bad: Complaint) -> None:
    unknown = sorted(set(settings.allowed_adjustments) - set(NRI_ADJUSTMENTS))
    if unknown:
        bad(("nri", "allowed_adjustments"), f"unknown adjustments {unknown}; known: {', '.join(NRI_ADJUSTMENTS)}")
    for key in ("registration_timeout", "request_timeout"):
        if getattr(settings, key) <= 0:
            bad(("nri", key), f"expected a number of seconds > 0, got {getattr(settings, key)}")


def _check_user_namespaces(ids: UserNamespacesConfig, bad: Complaint) -> None:
    if not ids.mount_dir.startswith("/"):
        bad(("user_namespaces", "mount_dir"), f"expected an absolute path, got {ids.mount_dir!r}")
    if ids.first_host_id < 1 or ids.host_id_count < 1 or ids.first_host_id + ids.host_id_count > 1 << 32:
        bad(
            ("user_namespaces",),
            f"expected host ids within 1-{(1 << 32) - 1}, got first_host_id {ids.first_host_id} "
            f"and host_id_count {ids.host_id_count}",
        )


def _check_images(images: ImagesConfig, bad: Complaint) -> None:
    if images.max_concurrent_downloads < 1:
        bad(("images", "max_concurrent_downloads"), "expected at least 1")
    if images.platform and images.platform.count("/") not in (1, 2):
        bad(("images", "platform"), f"expected os/architecture[/variant], got {images.platform!r}")
    for host, registry in images.registries.items():
        for mirror in registry.mirrors:
            if "/" in mirror or not mirror:
                bad(("images", "registries", host, "mirrors"), f"expected host[:port], got {mirror!r}")
        if registry.mirror_only and not registry.mirrors:
            bad(("images", "registries", host, "mirror_only"), "needs at least one mirror")


def _check_handlers(config: Config, bad: Complaint) -> None:
    for name, handler in config.runtimes.items():
        if not _NAME.match(name):
            bad(("runtimes", name), "a handler name must be lower-case letters, digits, '-' and '.'")
        if not handler.plugin:
            bad(("runtimes", name, "plugin"), "names no runtime plugin")
    known = ", ".join(sorted(config.runtimes)) or "none"
    if config.default_runtime not in config.runtimes:
        bad(("default_runtime",), f"no [runtimes.{config.default_runtime}] table (handlers: {known})")
    if config.untrusted_runtime and config.untrusted_runtime not in config.runtimes:
        bad(("untrusted_runtime",), f"no [runtimes.{config.untrusted_runtime}] table (handlers: {known})")


def dump(config: Config) -> dict[str, Any]:
    """The configuration as plain data (for `shimhub config` and Status)."""
    return converter.unstructure(config)


def set_log_level(level: str) -> None:
    """Apply `level` (one of LOG_LEVELS) to shimhub's loggers."""
    logging.getLogger("shimhub").setLevel(level.upper())

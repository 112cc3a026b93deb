"""shimhub's configuration: TOML files structured into attrs classes.

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
from attrs import define, field
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError

from shimhub.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/shimhub/shimhub.toml")
DEFAULT_SOURCE = "<embedded default>"

LOG_LEVELS = ("debug", "info", "warning", "error")
CGROUP_DRIVERS = ("cgroupfs", "systemd")
_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$")


@define(frozen=True)
class HandlerConfig:
    """One runtime handler: the name a RuntimeClass refers to, bound to a runtime plugin."""

    plugin: str
    #: Options handed to the plugin as they are; the plugin validates them.
    options: dict[str, Any] = field(factory=dict)
    #: Storage driver for this handler's containers ("" = the global one).
    storage_driver: str = ""
    #: Whether a pod may pick this handler with the handler annotation.
    selectable: bool = False
    #: Annotation prefixes of pods that this handler's plugin may see.
    allowed_annotations: list[str] = field(factory=list)


@define(frozen=True)
class StorageConfig:
    """The storage driver that holds image layers and container root filesystems."""

    driver: str = "overlay"
    root: str = "/var/lib/shimhub/storage"
    options: dict[str, Any] = field(factory=dict)


@define(frozen=True)
class RegistryConfig:
    """How to reach one registry host."""

    #: Plain http instead of https (only ever where configured).
    insecure: bool = False
    #: Hosts tried in order before this one, each reached per its own [images.registries.<host>] table.
    mirrors: list[str] = field(factory=list)
    #: Reach this registry only through its mirrors, never itself (an air-gapped node).
    mirror_only: bool = False


@define(frozen=True)
class ImagesConfig:
    """Image pulls and the image store."""

    #: Registries that short names ("busybox") resolve through; more than one is refused as ambiguous.
    search_registries: list[str] = field(factory=lambda: ["docker.io"])
    #: A Docker-style credentials file ({"auths": {"host": {"auth": base64(user:password)}}}), "" for none.
    credentials_file: str = ""
    #: Layers downloaded at once per pull.
    max_concurrent_downloads: int = 3
    #: Platform to pick from multi-platform images ("" = this node's, e.g. linux/amd64).
    platform: str = ""
    #: Seconds to wait for a registry to answer (per request, not per whole download).
    timeout: float = 30.0
    #: Most bytes one layer may unpack to (0 = no limit): a small gzip of zeros must not fill the disk.
    max_layer_bytes: int = 32 << 30
    #: The image trust policy (containers-policy.json(5)); unset: CRI-O's /etc/containers/policy.json when
    #: present, else none; "" for none (every image may be pulled).
    signature_policy: str | None = None
    #: Signature storage by registry and repository (registries.d(5) YAML files), read at each verification.
    registries_d: str = "/etc/containers/registries.d"
    registries: dict[str, RegistryConfig] = field(factory=dict)


@define(frozen=True)
class NetworkConfig:
    """The network backend that gives pods their network."""

    backend: str = "cni"
    options: dict[str, Any] = field(factory=dict)


@define(frozen=True)
class StreamingConfig:
    """The streaming server that Exec, Attach and PortForward hand the kubelet to."""

    #: host:port to listen on (port 0 picks a free one). The kubelet proxies
    #: streams, so loopback is right unless clients must reach it directly.
    address: str = "127.0.0.1:0"
    #: Seconds a URL from Exec, Attach or PortForward stays valid.
    token_ttl: float = 60.0
    #: Seconds a SPDY client gets to open all the streams of a session.
    stream_creation_timeout: float = 30.0
    #: Seconds without data either way after which a session is closed (0: never), as the kubelet's 4 h.
    idle_timeout: float = 14400.0


@define(frozen=True)
class UserNamespacesConfig:
    """Pods with hostUsers: false, each in a user namespace of its own."""

    #: The first host uid/gid the kubelet's mappings may use, and how many from there. By default
    #: from 65536, where the kubelet's ranges start, to the last id: a CRI client cannot map a pod
    #: onto the node's own users (root, daemons, people). Lower it only for a client that needs to.
    first_host_id: int = 65536
    host_id_count: int = (1 << 32) - 65536
    #: Where such pods' root filesystems and volumes are bound for their runtime to reach: the
    #: directory and its parents must be searchable by others (the runtime is no one special on the
    #: host once in the pod's user namespace), so it is not under run_dir (0750).
    mount_dir: str = "/run/shimhub-idmapped"


@define(frozen=True)
class CheckpointsConfig:
    """CheckpointContainer and restores from its archives."""

    #: The container goes on running after its checkpoint (CRI-O's default); false stops it.
    leave_running: bool = True
    #: Seconds a checkpoint may take when the request gives no timeout.
    default_timeout: float = 300.0
    #: Most bytes an archive to restore from may unpack to (0: no limit).
    max_archive_bytes: int = 16 << 30


#: What NRI plugins may adjust, by the names [nri] allowed_adjustments uses.
NRI_ADJUSTMENTS = (
    "annotations", "mounts", "env", "hooks", "devices", "resources", "rlimits", "args", "oom_score_adj", "sysctl",
)  # fmt: skip


@define(frozen=True)
class NriConfig:
    """NRI: the node's NRI plugins, connected over a socket or started by shimhub."""

    enable: bool = False
    #: Where plugins connect ("" for none: only the plugins shimhub starts).
    socket: str = "/var/run/nri/nri.sock"
    #: Plugins shimhub starts, executables named <index>-<name> (two digits, then the name).
    plugin_path: str = "/opt/nri/plugins"
    #: A plugin's configuration: <index>-<name>.conf or <name>.conf here.
    plugin_config_path: str = "/etc/nri/conf.d"
    #: Seconds a plugin has to register once connected, and to answer any request.
    registration_timeout: float = 5.0
    request_timeout: float = 2.0
    #: What plugins may adjust in a container being created.
    allowed_adjustments: list[str] = field(
        factory=lambda: [
            "annotations",
            "mounts",
            "env",
            "hooks",
            "devices",
            "resources",
            "rlimits",
            "args",
            "oom_score_adj",
            "sysctl",
        ]
    )


@define(frozen=True)
class Config:
    """The effective configuration of one shimhub instance."""

    socket: str = "/run/shimhub/shimhub.sock"
    state_dir: str = "/var/lib/shimhub"
    run_dir: str = "/run/shimhub"
    log_level: str = "info"
    cgroup_driver: str = "cgroupfs"
    default_runtime: str = "runc"
    untrusted_runtime: str = ""
    handler_annotation: str = "shimhub.io/runtime-handler"
    runtimes: dict[str, HandlerConfig] = field(factory=dict)
    storage: StorageConfig = field(factory=StorageConfig)
    network: NetworkConfig = field(factory=NetworkConfig)
    images: ImagesConfig = field(factory=ImagesConfig)
    #: Names of extension plugins (entry point group ``shimhub.extension``) to load.
    extensions: list[str] = field(factory=list)
    #: Seconds in-flight RPCs get to finish on SIGTERM.
    shutdown_grace: float = 10.0
    #: host:port of the HTTP endpoint serving Prometheus metrics and inspect data ("" = off).
    metrics_address: str = ""
    streaming: StreamingConfig = field(factory=StreamingConfig)
    user_namespaces: UserNamespacesConfig = field(factory=UserNamespacesConfig)
    checkpoints: CheckpointsConfig = field(factory=CheckpointsConfig)
    nri: NriConfig = field(factory=NriConfig)
    #: Give containers that set no seccomp profile the runtime default one (the CRI says unconfined).
    seccomp_use_default_when_empty: bool = False
    #: The only directory Localhost seccomp profiles are read from (the kubelet's <root-dir>/seccomp).
    seccomp_profile_root: str = "/var/lib/kubelet/seccomp"


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

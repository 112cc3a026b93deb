"""The daemon: configuration, plugins, state and lifecycle managers of one shimhub instance."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from shimhub import cdi, oci, orphans, profiles, telemetry, unpack
from shimhub import config as config_module
from shimhub.backends import Backend
from shimhub.background import Coalesced
from shimhub.config import Config
from shimhub.containers import ContainerManager
from shimhub.errors import ConfigError, FailedPrecondition
from shimhub.extensions import Extensions
from shimhub.handlers import HandlerRegistry
from shimhub.hooktypes import PluginContext
from shimhub.images.auth import Credentials
from shimhub.images.manager import ImageManager
from shimhub.images.store import ImageRecord
from shimhub.locks import KeyedLocks
from shimhub.names import NameRegistry
from shimhub.pods import PodManager
from shimhub.records import PENDING_CREATE, PENDING_REMOVE, ContainerRecord, SandboxRecord
from shimhub.state import StateStore

if TYPE_CHECKING:
    from shimhub.nri.runtime import Nri

log = logging.getLogger(__name__)

#: Keys whose change needs a restart; a reload keeps the old value and says so.
RESTART_KEYS = (
    "socket",
    "state_dir",
    "run_dir",
    "cgroup_driver",
    "storage",
    "network",
    "images",
    "extensions",
    "metrics_address",
    "streaming",
    "user_namespaces",
    "checkpoints",
    "nri",
)


class Daemon:
    """Everything a running shimhub holds, built from one Config."""

    def __init__(self, config: Config) -> None:
        self.config = config
        config_module.set_log_level(config.log_level)
        for directory in (config.state_dir, config.run_dir):
            Path(directory).mkdir(parents=True, exist_ok=True, mode=0o700)
        # Others may pass through (as into /var/lib/containerd) but not list it; each driver's own is 0700.
        Path(config.storage.root).mkdir(parents=True, exist_ok=True, mode=0o711)
        self.store = StateStore(Path(config.state_dir))
        unpack.start_helper()  # the confined layer unpacker, ready before the first pull
        self.locks = KeyedLocks()
        self.pod_names = NameRegistry("pod sandbox")
        self.container_names = NameRegistry("container")
        self.extensions = Extensions(config.extensions)
        self.cdi = cdi.Registry(config.cdi_spec_dirs)
        self.handlers = HandlerRegistry.build(config, self.plugin_context)
        self.network = Backend.setup(
            "network",
            f"network backend {config.network.backend!r}",
            config.network.backend,
            "[network.options]",
            self.plugin_context("network", config.network.backend),
            options=dict(config.network.options),
        )
        #: Every storage driver in use: the global one and those runtime handlers name.
        self.storage_drivers = {
            name: Backend.setup(
                "storage",
                f"storage driver {name!r}",
                name,
                "[storage.options]",
                self.plugin_context("storage", name),
                root=config.storage.root,
                options=dict(config.storage.options) if name == config.storage.driver else {},
            )
            for name in sorted({config.storage.driver} | {h.storage_driver for h in config.runtimes.values()} - {""})
        }
        self.storage = self.storage_drivers[config.storage.driver]
        self.images = ImageManager(config.images, Path(config.state_dir, "images"), config.storage.driver)
        #: Garbage collection after a container's removal, off the RemoveContainer call.
        self._garbage = Coalesced(self.collect_garbage, "image garbage collection")
        self.containers = ContainerManager(self)
        self.pods = PodManager(self, self.containers)
        #: The pod CIDR the kubelet last sent with UpdateRuntimeConfig.
        self.pod_cidr = ""
        #: Called with every lifecycle event after the extensions (the CRI event stream listens here).
        self.listeners: list[Callable[[str, SandboxRecord, ContainerRecord | None], None]] = []
        #: NRI, when enabled (started by `start_nri`); its modules are loaded only then.
        self.nri: Nri | None = None
        if config.nri.enable:
            from shimhub.nri.runtime import Nri

            self.nri = Nri(config.nri, self.store, self.containers, self.cdi)
            self.extensions.nri = self.nri
            self.listeners.append(self.nri.lifecycle_event)

    def storage_for(self, handler_name: str) -> tuple[str, Backend]:
        """The storage driver (name and backend) that a handler's containers use."""
        handler = self.handlers.get(handler_name)
        name = handler.config.storage_driver or self.config.storage.driver
        driver = self.storage_drivers.get(name)
        if driver is None:
            raise FailedPrecondition(f"storage driver {name!r} of runtime handler {handler_name!r} needs a restart")
        return name, driver

    def pull_image(self, image: str, creds: Credentials | None, alive: Callable[[], bool]) -> ImageRecord:
        """Pull an image and unpack it into the default storage driver; downloads stop when `alive` turns false."""
        started = time.monotonic()
        try:
            record = self.images.pull(image, creds, self.storage_drivers, alive)
        except BaseException:
            self.collect_garbage()  # the blobs and layers of a refused image
            raise
        telemetry.PULL_SECONDS.observe(time.monotonic() - started)
        telemetry.PULL_BYTES.inc(record.size)
        return record

    def remove_image(self, image: str) -> None:
        """Remove an image by id, tag or digest; layers containers use stay until they are removed. Idempotent."""
        record = self.images.images.find(image)
        if record is not None:
            self.images.remove(record)
            self.collect_garbage()

    def collect_garbage(self) -> None:
        """Remove image layers and blobs nothing uses any more."""
        in_use = {c.image_ref for c in self.store.containers()}
        in_use |= {volume.image_id for c in self.store.containers() for volume in c.image_volumes}
        self.images.collect_garbage(self.storage_drivers, in_use)

    def collect_garbage_soon(self) -> None:
        """Collect garbage on the collector's thread (requests while it runs make one more run)."""
        self._garbage.request()

    def filesystem_usage(self) -> tuple[tuple[str, int, int], tuple[str, int, int]]:
        """(mountpoint, bytes, inodes) of image content and of container writable layers."""
        content = self.images.usage()
        used = inodes = 0
        for container in self.store.containers():
            if container.storage_driver in self.storage_drivers:
                usage = (
                    self.storage_drivers[container.storage_driver]
                    .installed()
                    .call("storage_usage", container_id=container.id)
                )
                used, inodes = used + usage.used_bytes, inodes + usage.inodes_used
        return (
            (str(Path(self.config.state_dir, "images")), content.used_bytes, content.inodes_used),
            (self.config.storage.root, used, inodes),
        )

    def plugin_context(self, kind: str, name: str) -> PluginContext:
        """The context handed to plugin instance `name` of `kind` at setup."""
        state_dir = Path(self.config.state_dir, "plugins", kind, name)
        run_dir = Path(self.config.run_dir, "plugins", kind, name)
        for directory in (state_dir, run_dir):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        return PluginContext(
            name=name,
            state_dir=state_dir,
            run_dir=run_dir,
            log=logging.getLogger(f"shimhub.plugin.{kind}.{name}"),
            cgroup_driver=self.config.cgroup_driver,
            extensions=self.extensions,
        )

    def recover(self) -> None:
        """Load the persisted records and let each handler reattach to its pods."""
        self.store.load()
        for sandbox_id, kept in sorted(self.store.orphaned.items()):
            pod = orphans.rebuilt_pod(
                sandbox_id, kept, self.store.corrupt_sandbox(sandbox_id), self.config.default_runtime
            )
            self.store.restore_pod(pod, kept)
            log.error(
                "pod sandbox %s: its record is missing or unreadable, its %d containers' records are not: "
                "rebuilt (handler %r) to remove the pod and what it left on the node",
                sandbox_id, len(kept), pod.handler,
            )  # fmt: skip
        sandboxes = self.store.sandboxes()
        for sandbox in sandboxes:
            self.pod_names.restore(sandbox.name, sandbox.id, sandbox.request_digest)
            self._adopt_pod(sandbox)
        containers = self.store.containers()
        for container in containers:
            self.container_names.restore(container.name, container.id, container.request_digest)
        for name in sorted({sandbox.handler for sandbox in sandboxes}):
            handler = self.handlers.handlers.get(name)
            if handler is None or handler.backend.plugin is None:
                log.error("pods of runtime handler %r cannot be recovered: the handler is not available", name)
                continue
            plugin = handler.backend.plugin
            if plugin.implements("runtime_recover"):
                mine = {s.id for s in sandboxes if s.handler == name}
                plugin.call(
                    "runtime_recover",
                    sandboxes=[s for s in sandboxes if s.id in mine],
                    containers=[c for c in containers if c.sandbox_id in mine],
                )
        self._finish_pending(sandboxes, containers)
        log.info(
            "recovered %d pod sandboxes and %d containers", len(self.store.sandboxes()), len(self.store.containers())
        )

    def _adopt_pod(self, sandbox: SandboxRecord) -> None:
        """A pod that a runtime of API 1.x set up before an upgrade: the core takes it over, as it owns pods."""
        handler = self.handlers.handlers.get(sandbox.handler)
        plugin = handler.backend.plugin if handler is not None else None
        if sandbox.pod is not None or plugin is None or plugin.builds_own_spec:
            return
        pod = oci.pod.adopted(sandbox.runtime_data.get("pod"))
        if pod is not None:
            sandbox.pod = pod
            del sandbox.runtime_data["pod"]
            self.store.save_sandbox(sandbox)
            log.info("pod sandbox %s: its pod, set up by its runtime before, is now the core's", sandbox.id[:12])

    def _finish_pending(self, sandboxes: list[SandboxRecord], containers: list[ContainerRecord]) -> None:
        """Roll back creations and finish removals that a crash interrupted; drop what crashed pulls left.

        One that fails again is logged and left pending: the kubelet's next removal finishes it.
        """
        steps: list[tuple[str, Callable[[], None]]] = []
        for container in containers:
            if container.pending == PENDING_CREATE:
                steps.append((f"container {container.id}", partial(self.containers.roll_back, container)))
            elif container.pending == PENDING_REMOVE:
                steps.append((f"container {container.id}", partial(self.containers.finish_removal, container.id)))
        for sandbox in sandboxes:
            if sandbox.pending == PENDING_CREATE:
                steps.append((f"pod sandbox {sandbox.id}", partial(self.pods.roll_back, sandbox)))
            elif sandbox.pending == PENDING_REMOVE:
                steps.append((f"pod sandbox {sandbox.id}", partial(self.pods.remove, sandbox.id)))
        for what, step in steps:
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - one object must not keep the node's runtime down
                log.error("%s: could not finish what a crash interrupted: %s", what, exc)
        self.images.drop_interrupted_layers(self.storage_drivers)
        self.collect_garbage()

    def reload(self, new: Config) -> None:
        """Apply what can change while running: runtime handlers and the log level."""
        for key in RESTART_KEYS:
            if getattr(new, key) != getattr(self.config, key):
                log.warning("config key %r changed; it takes effect after a restart", key)
        in_use = frozenset(sandbox.handler for sandbox in self.store.sandboxes())
        self.handlers = HandlerRegistry.build(new, self.plugin_context, previous=self.handlers, in_use=in_use)
        config_module.set_log_level(new.log_level)
        self.config = attrs.evolve(new, **{key: getattr(self.config, key) for key in RESTART_KEYS})
        log.info("configuration reloaded: handlers %s", ", ".join(sorted(self.handlers.handlers)))

    def start_nri(self) -> None:
        """Listen for NRI plugins and start those of the plugin directory (when NRI is enabled)."""
        if self.nri is not None:
            self.nri.start()

    def stop_nri(self) -> None:
        """Tell the NRI plugins shimhub goes away (when NRI is enabled)."""
        if self.nri is not None:
            self.nri.stop()

    def emit(self, event: str, sandbox: SandboxRecord, container: ContainerRecord | None = None) -> None:
        """Tell the extensions and listeners about a lifecycle change; their errors are logged, never raised."""
        self.extensions.lifecycle_event(event, sandbox, container)
        for listener in self.listeners:
            try:
                listener(event, sandbox, container)
            except Exception:
                log.exception("a listener failed on %s", event)

    def status_info(self) -> dict[str, Any]:
        """Readiness of every handler and backend, for verbose Status and `shimhub status`."""

        def describe(backend: Backend) -> dict[str, Any]:
            readiness = backend.readiness()
            return {"ready": readiness.ready, "reason": readiness.reason, "info": readiness.info}

        return {
            "handlers": {name: describe(h.backend) for name, h in sorted(self.handlers.handlers.items())},
            "network": describe(self.network),
            "storage": {name: describe(driver) for name, driver in self.storage_drivers.items()},
            "pod_cidr": self.pod_cidr,
            "nri": self.nri.status() if self.nri is not None else {"enabled": False},
            "security_modules": profiles.node_lsms(),
            "image_trust_policy": self._policy_summary(),
            "image_registries": self.images.node_registries.summary(),
        }

    def _policy_summary(self) -> dict[str, Any] | None:
        """The image trust policy in force (None: none), or why the file on disk cannot be used."""
        if self.images.policy is None:
            return None
        try:
            return self.images.policy.current().summary()
        except ConfigError as exc:
            return {"path": self.images.policy.path, "error": str(exc)}

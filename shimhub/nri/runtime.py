"""The runtime side of NRI: the plugins' socket, the plugins shimhub starts, and what they are told and asked.

Plugins are called in the order of their index, then name. A plugin that does
not answer within ``request_timeout`` or drops its connection is disconnected
and the request goes on without it: no plugin can stall the node. A plugin
that answers an error to CreateContainer fails that creation (it is the
plugin's policy), as does an adjustment the node does not allow.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from google.protobuf.message import Message

from shimhub import __version__, telemetry
from shimhub.errors import DeadlineExceeded, FailedPrecondition, ShimhubError, Unavailable, Unimplemented
from shimhub.nri import adjust, messages
from shimhub.nri.plugin import Plugin
from shimhub.records import ContainerRecord, SandboxRecord
from shimhub_proto.cri.v1 import api_pb2 as cri
from shimhub_proto.nri import api_pb2 as nri

if TYPE_CHECKING:
    from shimhub.cdi import Registry
    from shimhub.config import NriConfig
    from shimhub.containers import ContainerManager
    from shimhub.state import StateStore

log = logging.getLogger(__name__)
#: A plugin shimhub starts: an executable named <index>-<name>.
LAUNCHABLE = re.compile(r"([0-9]{2})-([A-Za-z0-9_.+-]+)")
CONFIG_LIMIT = 1 << 20
#: Most bytes of pods and containers in one Synchronize message (ttrpc's limit is 4 MiB).
SYNCHRONIZE_PART = 3 << 20
#: shimhub's lifecycle events, as NRI events: (event, method, request type).
EVENTS: dict[str, list[tuple[int, str, type[Message]]]] = {
    "sandbox_stopped": [(nri.STOP_POD_SANDBOX, "StopPodSandbox", nri.StopPodSandboxRequest)],
    "sandbox_removed": [(nri.REMOVE_POD_SANDBOX, "RemovePodSandbox", nri.RemovePodSandboxRequest)],
    "container_created": [(nri.POST_CREATE_CONTAINER, "PostCreateContainer", nri.PostCreateContainerRequest)],
    "container_started": [
        (nri.START_CONTAINER, "StartContainer", nri.StartContainerRequest),
        (nri.POST_START_CONTAINER, "PostStartContainer", nri.PostStartContainerRequest),
    ],
    "container_stopped": [(nri.STOP_CONTAINER, "StopContainer", nri.StopContainerRequest)],
    "container_removed": [(nri.REMOVE_CONTAINER, "RemoveContainer", nri.RemoveContainerRequest)],
}
#: Answers whose `update` field asks for changes to other containers.
UPDATING = {"StopContainer": nri.StopContainerResponse}


class Nri:
    """NRI for one daemon: `start` listens and starts the plugins of the plugin directory."""

    def __init__(self, config: NriConfig, store: StateStore, containers: ContainerManager, devices: Registry) -> None:
        self.config = config
        self.store = store
        self.containers = containers
        self.allowed = frozenset(config.allowed_adjustments)
        #: Where the CDI devices plugins ask for are looked up.
        self.devices = devices
        self._plugins: list[Plugin] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None

    # -- connections ---------------------------------------------------------------

    def start(self) -> None:
        """Listen on the socket (if set) and start the plugins of the plugin directory."""
        if self.config.socket:
            path = Path(self.config.socket)
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(path.lstat().st_mode):
                    path.unlink()
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(str(path))
            os.chmod(path, 0o600)
            listener.listen(16)
            self._listener = listener
            threading.Thread(target=self._accept, args=(listener,), name="nri accept", daemon=True).start()
        self._launch_plugins()
        log.info(
            "NRI: listening on %s; plugins started from %s", self.config.socket or "(none)", self.config.plugin_path
        )

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._adopt, args=(connection, None), name="nri plugin", daemon=True).start()

    def _launch_plugins(self) -> None:
        directory = Path(self.config.plugin_path)
        if not directory.is_dir():
            return
        for path in sorted(directory.iterdir()):
            found = LAUNCHABLE.fullmatch(path.name)
            if not found or not path.is_file() or not os.access(path, os.X_OK):
                continue
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                process = subprocess.Popen(
                    [str(path)],
                    pass_fds=(theirs.fileno(),),
                    env={
                        **os.environ,
                        "NRI_PLUGIN_SOCKET": str(theirs.fileno()),
                        "NRI_PLUGIN_IDX": found.group(1),
                        "NRI_PLUGIN_NAME": found.group(2),
                    },
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            except OSError as exc:
                ours.close()
                log.error("NRI: cannot start plugin %s: %s", path, exc)
                continue
            finally:
                theirs.close()
            self._adopt(ours, process)

    def _adopt(self, connection: socket.socket, process: subprocess.Popen | None) -> None:
        """Register, configure and synchronize the plugin on `connection`; it is called from then on."""
        config = self.config
        plugin = Plugin(connection, self._unsolicited, process)
        try:
            plugin.configure(self._plugin_config, __version__, config.registration_timeout, config.request_timeout)
            answer = self._synchronize(plugin)
        except ShimhubError as exc:
            log.warning("NRI: plugin %s not taken: %s", plugin, exc.message)
            plugin.close()
            return
        with self._lock:
            self._plugins = sorted([*self._plugins, plugin], key=lambda p: (p.index, p.name))
        log.info("NRI: plugin %s connected (events 0x%x)", plugin, plugin.events)
        self._update(answer.update, plugin)

    def _plugin_config(self, index: str, name: str) -> str:
        for candidate in (f"{index}-{name}.conf", f"{name}.conf"):
            path = Path(self.config.plugin_config_path, candidate)
            if path.is_file():
                with path.open("rb") as text:
                    return text.read(CONFIG_LIMIT).decode(errors="replace")
        return ""

    def _synchronize(self, plugin: Plugin) -> nri.SynchronizeResponse:
        """Send the node's pods and containers in messages under the ttrpc limit (`more` set on all but the
        last, as containerd does); the plugin's last answer. The whole takes at most registration_timeout."""
        pods = [messages.pod(s) for s in self.store.sandboxes() if messages.ready(s)]
        containers = [messages.container(c) for c in self.store.visible_containers()]
        parts: list[nri.SynchronizeRequest] = [nri.SynchronizeRequest()]
        size = 0
        for item in [*pods, *containers]:
            item_size = item.ByteSize() + 8  # with the field's tag and length
            if size + item_size > SYNCHRONIZE_PART and size:
                parts.append(nri.SynchronizeRequest())
                size = 0
            (parts[-1].pods if isinstance(item, nri.PodSandbox) else parts[-1].containers).append(item)
            size += item_size
        deadline = time.monotonic() + self.config.registration_timeout
        answer = nri.SynchronizeResponse()
        for number, part in enumerate(parts):
            part.more = number < len(parts) - 1
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeadlineExceeded(f"Synchronize did not finish within {self.config.registration_timeout} s")
            answer = plugin.call("Synchronize", part, nri.SynchronizeResponse, left)
        return answer

    def _drop(self, plugin: Plugin, why: str) -> None:
        with self._lock:
            self._plugins = [p for p in self._plugins if p is not plugin]
        plugin.close()
        log.warning("NRI: plugin %s disconnected: %s", plugin, why)

    def _subscribed(self, event: int) -> list[Plugin]:
        with self._lock:
            current = list(self._plugins)
        gone = [p for p in current if not p.connected]
        for plugin in gone:
            self._drop(plugin, "its connection ended")
        return [p for p in current if p not in gone and p.subscribed(event)]

    def stop(self) -> None:
        """Tell the plugins the runtime goes away, and disconnect them."""
        if self._listener is not None:
            self._listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.config.socket)
        with self._lock:
            plugins, self._plugins = self._plugins, []
        for plugin in plugins:
            with contextlib.suppress(ShimhubError):
                plugin.call("Shutdown", nri.Empty(), nri.Empty, self.config.request_timeout)
            plugin.close()

    def status(self) -> dict[str, Any]:
        with self._lock:
            plugins = [{"name": p.name, "index": p.index, "events": p.events} for p in self._plugins]
        settings = {"socket": self.config.socket, "plugin_path": self.config.plugin_path}
        return {"enabled": True, **settings, "plugins": plugins}

    # -- requests --------------------------------------------------------------------

    def create_container(self, sandbox: SandboxRecord, container: ContainerRecord, spec: dict[str, Any]) -> None:
        """Ask the subscribed plugins about a container being created; apply what they ask to `spec`."""
        plugins = self._subscribed(nri.CREATE_CONTAINER)
        if not plugins:
            return
        started = time.perf_counter()
        timeout = self.config.request_timeout
        namespaces = sandbox.pod_config().linux.security_context.namespace_options
        request = nri.CreateContainerRequest(pod=messages.pod(sandbox), container=messages.container(container, spec))
        for plugin in plugins:
            try:
                answer = plugin.call("CreateContainer", request, nri.CreateContainerResponse, timeout)
            except (DeadlineExceeded, Unavailable) as exc:
                self._drop(plugin, exc.message)
                if self.config.fail_open:
                    continue
                raise type(exc)(f"NRI plugin {plugin} did not answer CreateContainer: {exc.message}") from None
            except ShimhubError as exc:
                raise FailedPrecondition(f"NRI plugin {plugin} refused the container: {exc.message}") from None
            made = adjust.apply(spec, answer.adjust, self.allowed, repr(plugin), namespaces, devices=self.devices)
            if made:
                log.info("NRI: plugin %s adjusted container %s: %s", plugin, container.id[:12], ", ".join(made))
                request.container.CopyFrom(messages.container(container, spec))  # the next plugin sees it adjusted
            self._later(answer.update, answer.evict, plugin)
        telemetry.NRI_SECONDS.observe(time.perf_counter() - started)

    def run_pod_sandbox(self, sandbox: SandboxRecord) -> None:
        """Tell the subscribed plugins of a pod before it is ready; an error a plugin answers fails the pod."""
        fields: dict[str, Message] = {"pod": messages.pod(sandbox)}
        request = nri.RunPodSandboxRequest(**fields)
        for plugin in self._subscribed(nri.RUN_POD_SANDBOX):
            self._notify(plugin, nri.RUN_POD_SANDBOX, "RunPodSandbox", request, fields, refusing=True)

    def lifecycle_event(self, event: str, sandbox: SandboxRecord, container: ContainerRecord | None) -> None:
        """Tell the subscribed plugins of a lifecycle change."""
        for number, method, request_type in EVENTS.get(event, []):
            plugins = self._subscribed(number)
            if not plugins:
                continue  # nothing to describe the pod and container to
            fields: dict[str, Message] = {"pod": messages.pod(sandbox)}
            if container is not None:
                fields["container"] = messages.container(container)
            request = request_type(**fields)
            for plugin in plugins:
                self._notify(plugin, number, method, request, fields)

    def _notify(
        self,
        plugin: Plugin,
        number: int,
        method: str,
        request: Message,
        fields: dict[str, Message],
        *,
        refusing: bool = False,
    ) -> None:
        """Send one event to one plugin; with `refusing`, an error it answers is raised (FailedPrecondition)."""
        timeout = self.config.request_timeout
        try:
            try:
                answer = plugin.call(method, request, UPDATING.get(method, nri.Empty), timeout)
            except Unimplemented:  # a plugin of NRI's first API: the event in a StateChange
                answer = plugin.call("StateChange", nri.StateChangeEvent(event=number, **fields), nri.Empty, timeout)
        except (DeadlineExceeded, Unavailable) as exc:
            self._drop(plugin, exc.message)
            return
        except ShimhubError as exc:
            log.warning("NRI: plugin %s failed %s: %s", plugin, method, exc.message)
            if refusing:
                raise FailedPrecondition(f"NRI plugin {plugin} failed {exc.message}") from None
            return
        if isinstance(answer, nri.StopContainerResponse):
            self._later(answer.update, [], plugin)

    # -- what plugins ask of other containers -----------------------------------------

    def _unsolicited(self, plugin: Plugin, request: nri.UpdateContainersRequest) -> list[nri.ContainerUpdate]:
        failed = self._update(request.update, plugin)
        self._evict(request.evict, plugin)
        return failed

    def _later(
        self, updates: Iterable[nri.ContainerUpdate], evictions: Iterable[nri.ContainerEviction], plugin: Plugin
    ) -> None:
        """Updates and evictions asked for during a request, made once it is done (its locks released)."""
        updates, evictions = list(updates), list(evictions)
        if updates or evictions:
            threading.Thread(
                target=lambda: (self._update(updates, plugin), self._evict(evictions, plugin)),
                name="nri updates",
                daemon=True,
            ).start()

    def _update(self, updates: Iterable[nri.ContainerUpdate], plugin: Plugin) -> list[nri.ContainerUpdate]:
        failed = []
        for update in updates:
            limits = update.linux.resources
            resources = cri.LinuxContainerResources(
                cpu_period=limits.cpu.period.value,
                cpu_quota=limits.cpu.quota.value,
                cpu_shares=limits.cpu.shares.value,
                memory_limit_in_bytes=limits.memory.limit.value,
                cpuset_cpus=limits.cpu.cpus,
                cpuset_mems=limits.cpu.mems,
                unified=dict(limits.unified),
            )
            try:
                self.containers.update_resources(update.container_id, resources)
                log.info("NRI: plugin %s updated container %s", plugin, update.container_id[:12])
            except ShimhubError as exc:
                if not update.ignore_failure:
                    failed.append(update)
                log.warning("NRI: plugin %s: update of %s failed: %s", plugin, update.container_id[:12], exc.message)
        return failed

    def _evict(self, evictions: Iterable[nri.ContainerEviction], plugin: Plugin) -> None:
        for eviction in evictions:
            log.warning(
                "NRI: plugin %s evicts container %s: %s", plugin, eviction.container_id[:12], eviction.reason[:256]
            )
            try:
                self.containers.stop(eviction.container_id, 0)
            except ShimhubError as exc:
                log.warning("NRI: eviction of %s failed: %s", eviction.container_id[:12], exc.message)

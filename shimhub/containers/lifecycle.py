"""StartContainer, StopContainer (its escalation), RemoveContainer, UpdateContainerResources, ReopenContainerLog."""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import TYPE_CHECKING

import attrs

from shimhub import logpaths, resources
from shimhub.containers.base import ContainerBase
from shimhub.errors import DeadlineExceeded, FailedPrecondition, PluginFailed
from shimhub.hooktypes import ContainerState, ContainerStatus
from shimhub.records import PENDING_REMOVE, ContainerRecord, SandboxRecord
from shimhub_proto.cri.v1 import api_pb2 as cri

if TYPE_CHECKING:
    from shimhub.plugins import LoadedPlugin


log = logging.getLogger(__name__)

#: Seconds ReopenContainerLog waits for the runtime to make the new log file.
REOPEN_WAIT = 5.0

#: Seconds a container has to exit after SIGKILL before StopContainer gives up.
KILL_WAIT = 10.0


def _escalate(plugin: LoadedPlugin, sandbox: SandboxRecord, record: ContainerRecord, timeout: int) -> None:
    """Stop a running container as every runtime must: its stop signal and `timeout` seconds to exit (none
    when 0), then SIGKILL to all its processes and KILL_WAIT seconds; DeadlineExceeded if it outlives both."""
    stop_signal = record.stop_signal or record.runtime_data.get("stop_signal") or "SIGTERM"
    steps = [(stop_signal, float(timeout)), ("SIGKILL", KILL_WAIT)] if timeout > 0 else [("SIGKILL", KILL_WAIT)]
    for name, wait in steps:
        plugin.call("runtime_container_kill", sandbox=sandbox, container=record, signal=name)
        if plugin.call("runtime_container_wait", sandbox=sandbox, container=record, timeout=wait):
            return
    raise DeadlineExceeded(f"container {record.id} did not exit within {KILL_WAIT:g} s of SIGKILL")


class Lifecycle(ContainerBase):
    """Start, stop, removal, resource updates and log reopening."""

    def start(self, container_id: str) -> None:
        """Start a created container."""
        record = self.visible(container_id)
        sandbox = self._sandbox_of(record)
        with self.node.locks.hold(record.id):
            if record.state.status != ContainerStatus.CREATED:
                raise FailedPrecondition(f"container {record.id} is {record.state.status.value}, not created")
            plugin = self.node.handlers.get(sandbox.handler).require()
            logpaths.check(record.log_path)
            plugin.call("runtime_container_start", sandbox=sandbox, container=record)
            current = plugin.call("runtime_container_state", sandbox=sandbox, container=record)
            exited = current.status == ContainerStatus.EXITED
            with self._state_guard:  # one that exited at once is announced started, then stopped
                record.state = (
                    attrs.evolve(
                        current, status=ContainerStatus.RUNNING, exit_code=0, finished_at=0, reason="", message=""
                    )
                    if exited
                    else current
                )
                self.node.store.save_container(record)
            self.node.emit("container_started", sandbox, record)
            if exited:
                self._record_state(sandbox, record, current)

    def stop(self, container_id: str, timeout: int) -> None:
        """Stop a container, forcibly after `timeout` seconds. Idempotent."""
        record = self.node.store.container(container_id, missing_ok=True)
        if record is None or record.removing:
            return
        sandbox = self._sandbox_of(record)
        with self.node.locks.hold(record.id):
            if self._refresh(sandbox, record).status == ContainerStatus.EXITED:
                return
            plugin = self.node.handlers.get(sandbox.handler).installed()
            if plugin.implements("runtime_container_kill"):
                _escalate(plugin, sandbox, record, max(timeout, 0))
            else:  # a runtime of plugin API < 1.4
                plugin.call("runtime_container_stop", sandbox=sandbox, container=record, timeout=max(timeout, 0))
            self._refresh(sandbox, record)

    def remove(self, container_id: str) -> None:
        """Remove a container, stopping it first if it runs. Idempotent.

        As containerd's CRI does, the call answers once the container is stopped, its
        removal recorded and its name free: from then on the CRI does not see it. The
        runtime's and the storage's cleanup finish on the removal thread (`finish_removal`);
        a pod's removal, and a restart after a crash, finish them first.
        """
        record = self.node.store.container(container_id, missing_ok=True)
        if record is None or record.removing:
            return
        sandbox = self._sandbox_of(record)
        with self.node.locks.hold(record.id):
            if record.removing:
                return
            # Stopped first: a stop that fails leaves the container as it was, listed, for a retry.
            if self._refresh(sandbox, record).status == ContainerStatus.RUNNING:
                self.stop(record.id, timeout=0)
            record.pending = PENDING_REMOVE
            self.node.store.save_container(record)
            self.node.container_names.release(record.name, record.id)
        self.removals.request()

    def finish_removals(self) -> None:
        """Finish every removal asked for; one that fails is logged and tried again at the next request."""
        for record in self.node.store.containers():
            if record.removing:
                try:
                    self.finish_removal(record.id)
                except Exception as exc:  # noqa: BLE001 - one container must not hold up the others
                    log.error("container %s: removal failed, tried again later: %s", record.id[:12], exc)

    def finish_removal(self, container_id: str) -> None:
        """The runtime's and the storage's part of a container's removal; the record goes last."""
        record = self.node.store.container(container_id, missing_ok=True)
        if record is None:
            return
        sandbox = self._sandbox_of(record)
        with self.node.locks.hold(record.id):
            if self.node.store.container(container_id, missing_ok=True) is None:
                return  # another caller finished it
            plugin = self.node.handlers.get(sandbox.handler).installed()
            plugin.call("runtime_container_remove", sandbox=sandbox, container=record)
            self._remove_files(record)
            self.node.store.delete_container(record.id)
        self.node.locks.forget(record.id)
        if record.image_ref or record.image_volumes:
            self.node.collect_garbage_soon()
        self.node.emit("container_removed", sandbox, record)

    def remove_now(self, container_id: str) -> None:
        """Remove a container and finish its removal before returning (a pod's removal, recovery)."""
        self.remove(container_id)
        self.finish_removal(container_id)

    def state(self, container_id: str) -> tuple[ContainerRecord, ContainerState]:
        """A container's record with its current state."""
        record = self.visible(container_id)
        return record, self._refresh(self._sandbox_of(record), record)

    def refresh_running(self) -> None:
        """Bring every non-final container state up to date (before listing).

        A handler whose plugin implements runtime_container_states is asked
        once for all its containers; the others once per container.
        """
        by_handler: dict[str, list[tuple[SandboxRecord, ContainerRecord]]] = {}
        for record in self.node.store.visible_containers():
            if record.state.status in (ContainerStatus.CREATED, ContainerStatus.RUNNING):
                sandbox = self.node.store.sandbox(record.sandbox_id, missing_ok=True)
                if sandbox is not None:
                    by_handler.setdefault(sandbox.handler, []).append((sandbox, record))
        for name, pairs in by_handler.items():
            try:
                plugin = self.node.handlers.get(name).backend.plugin
                if plugin is not None and plugin.implements("runtime_container_states"):
                    states = plugin.call("runtime_container_states", containers=pairs)
                    for (sandbox, record), current in zip(pairs, states, strict=True):
                        self._record_state(sandbox, record, current)
                    continue
            except Exception:
                log.exception("cannot refresh the states of handler %s's containers", name)
                continue
            for sandbox, record in pairs:
                try:
                    self._refresh(sandbox, record)
                except Exception:
                    log.exception("cannot refresh the state of container %s", record.id[:12])

    def update_resources(self, container_id: str, limits: cri.LinuxContainerResources) -> None:
        """Apply new resource limits and remember them for ContainerStatus: both or neither.

        When the record cannot be saved (a full disk), the runtime is handed the old limits again, so
        that the cgroup, the served status and the record on disk keep agreeing.
        """
        record = self.visible(container_id)
        sandbox = self._sandbox_of(record)
        with self.node.locks.hold(record.id):
            plugin = self.node.handlers.get(sandbox.handler).require()
            before = cri.LinuxContainerResources()
            before.CopyFrom(record.container_config().linux.resources)
            update = functools.partial(plugin.call, "runtime_container_update", sandbox=sandbox, container=record)
            update(resources=resources.fitted(limits))
            record.set_resources(limits)
            try:
                self.node.store.save_container(record)
            except BaseException:
                record.set_resources(before)
                update(resources=resources.fitted(before))
                log.warning("container %s: resources not updated, the record could not be saved", record.id[:12])
                raise

    def reopen_log(self, container_id: str) -> None:
        """Have the runtime reopen the container's log after rotation."""
        sandbox, record, plugin = self._running(container_id)
        logpaths.check(record.log_path)
        plugin.call("runtime_container_reopen_log", sandbox=sandbox, container=record)
        if not record.log_path:
            return
        deadline = time.monotonic() + REOPEN_WAIT
        while not os.path.lexists(record.log_path):  # answered only once the new file is there
            if time.monotonic() > deadline:
                raise PluginFailed(
                    f"container {record.id}: the runtime did not reopen {record.log_path} within {REOPEN_WAIT} s"
                )
            time.sleep(0.005)

"""The container manager's shared ground: finding records and keeping their live state current."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

import attrs

from shimhub import checkpoints, userns
from shimhub.errors import FailedPrecondition, NotFound
from shimhub.hooktypes import ContainerState, ContainerStatus
from shimhub.records import ContainerRecord, SandboxRecord

if TYPE_CHECKING:
    from shimhub.node import Node
    from shimhub.plugins import LoadedPlugin


log = logging.getLogger(__name__)


def exit_reason(exit_code: int) -> str:
    """The CRI reason of an exit a runtime gave none for ("OOMKilled" is the runtime's to say)."""
    return "Completed" if exit_code == 0 else "Error"


class ContainerBase:
    """What every room of the container manager shares: the node, records, live state."""

    node: Node
    _state_guard: threading.Lock

    def visible(self, container_id: str) -> ContainerRecord:
        """A container the CRI can see: NotFound for one whose removal was asked for."""
        record = self.node.store.container(container_id)
        if record.removing:
            raise NotFound(f"container {container_id!r} not found: it is being removed")
        return record

    def _sandbox_of(self, container: ContainerRecord) -> SandboxRecord:
        return self.node.store.sandbox(container.sandbox_id)

    def _running(self, container_id: str) -> tuple[SandboxRecord, ContainerRecord, LoadedPlugin]:
        """A running container, its sandbox and its handler's plugin; FailedPrecondition if not running."""
        record, state = self.state(container_id)
        if state.status != ContainerStatus.RUNNING:
            raise FailedPrecondition(f"container {record.id} is not running")
        sandbox = self._sandbox_of(record)
        return sandbox, record, self.node.handlers.get(sandbox.handler).require()

    def _refresh(self, sandbox: SandboxRecord, record: ContainerRecord) -> ContainerState:
        """Ask the runtime for a non-final state and persist any change."""
        if record.state.status == ContainerStatus.EXITED:
            return record.state
        handler = self.node.handlers.get(sandbox.handler)
        if handler.backend.plugin is None:
            return record.state
        current = handler.backend.plugin.call("runtime_container_state", sandbox=sandbox, container=record)
        return self._record_state(sandbox, record, current)

    def _record_state(self, sandbox: SandboxRecord, record: ContainerRecord, current: ContainerState) -> ContainerState:
        """Persist a changed state; announce an exit once."""
        if current.status == ContainerStatus.EXITED and not current.reason:
            current = attrs.evolve(current, reason=exit_reason(current.exit_code))
        with self._state_guard:  # several callers may see the same change; one records and announces it
            changed = current != record.state and record.state.status != ContainerStatus.EXITED
            if changed:
                record.state = current
                self.node.store.save_container(record)
        if changed and current.status == ContainerStatus.EXITED:
            self.node.emit("container_stopped", sandbox, record)
        return record.state

    def _remove_files(self, record: ContainerRecord) -> None:
        """What the container has on the node besides the runtime's: the binds of a pod in its own user
        namespace, an unpacked checkpoint, then its root filesystem and image volumes."""
        config = self.node.config
        userns.IdmappedBinds.release(config.user_namespaces.mount_dir, record.id)
        checkpoints.discard(config.state_dir, record.id)
        if not record.storage_driver:
            return
        storage = self.node.storage_drivers[record.storage_driver].installed()
        for storage_id in [volume.storage_id for volume in record.image_volumes] + [record.id]:
            storage.call("storage_rootfs_unmount", container_id=storage_id)
            storage.call("storage_rootfs_remove", container_id=storage_id)

"""CheckpointContainer: the container's processes and file changes into an archive."""

from __future__ import annotations

import logging
import shutil
import time

from shimhub import checkpoints
from shimhub.containers.base import ContainerBase
from shimhub.errors import FailedPrecondition
from shimhub.hooktypes import ContainerStatus

log = logging.getLogger(__name__)


class Checkpointing(ContainerBase):
    """CheckpointContainer."""

    def checkpoint(self, container_id: str, location: str, timeout: float) -> None:
        """Write a checkpoint archive of a running container to `location` (CRI-O's layout)."""
        node = self.node
        record = self.visible(container_id)
        sandbox = self._sandbox_of(record)
        checkpoints.check_location(location)
        plugin = node.handlers.get(sandbox.handler).require()
        if not plugin.implements("runtime_container_checkpoint"):
            raise FailedPrecondition(f"runtime handler {sandbox.handler!r} cannot checkpoint containers")
        storage = node.storage_drivers[record.storage_driver].require() if record.storage_driver else None
        if storage is not None and not storage.implements("storage_rootfs_diff"):
            raise FailedPrecondition(
                f"storage driver {record.storage_driver!r} cannot export a container's file changes for a checkpoint"
            )
        settings = node.config.checkpoints
        work = checkpoints.working_directory(node.config.state_dir, record.id)
        started = time.monotonic()
        with node.locks.hold(record.id):
            if self._refresh(sandbox, record).status != ContainerStatus.RUNNING:
                raise FailedPrecondition(f"container {container_id} is not running: only a running one is checkpointed")
            shutil.rmtree(work, ignore_errors=True)
            (work / checkpoints.IMAGES).mkdir(parents=True, mode=0o700)
            try:
                spec = plugin.call(
                    "runtime_container_checkpoint",
                    sandbox=sandbox,
                    container=record,
                    directory=str(work / checkpoints.IMAGES),
                    leave_running=settings.leave_running,
                    timeout=float(timeout) if timeout > 0 else settings.default_timeout,
                )
                checkpoints.write_dumps(work, record.config, record.image_ref, spec)
                if storage is not None:
                    with (work / checkpoints.ROOTFS_DIFF).open("wb") as changes:
                        storage.call("storage_rootfs_diff", container_id=record.id, out=changes)
                size = checkpoints.write_archive(work, location)
            finally:
                checkpoints.discard(node.config.state_dir, record.id)
            if not settings.leave_running:
                self._refresh(sandbox, record)
        log.info(
            "container %s checkpointed to %s: %d bytes in %.2f s",
            record.id[:12],
            location[:256],
            size,
            time.monotonic() - started,
        )

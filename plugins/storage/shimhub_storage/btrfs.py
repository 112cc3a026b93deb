"""The btrfs storage driver: a subvolume per layer, snapshots for child layers and containers.

The storage root must be on btrfs; the driver says so when it is not.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from shimhub.sdk import FilesystemUsage, PluginContext, Readiness, hookimpl, mounts
from shimhub_storage.driver import DriverBase


def _delete_subvolume(path: Path) -> None:
    if path.exists():
        mounts.run("btrfs", "subvolume", "delete", str(path))


class BtrfsDriver(DriverBase):
    """Layers as btrfs subvolumes."""

    @hookimpl
    def storage_setup(self, root: str, options: Mapping[str, Any], context: PluginContext) -> Readiness:
        self.configure(root, options, context)
        if shutil.which("btrfs") is None:
            return self.ready("the btrfs command (btrfs-progs) is not installed")
        backing = mounts.filesystem_type(str(self.root))
        if backing != "btrfs":
            return self.ready(f"storage root {self.root} is on {backing}, not btrfs")
        return self.ready()

    @hookimpl
    def storage_layer_apply(self, layer_id: str, parent_id: str, diff: IO[bytes]) -> FilesystemUsage:
        target = self.layer_dir(layer_id)
        if not target.exists():
            work = self.root / "tmp" / f"layer-{layer_id}"
            _delete_subvolume(work)  # left by an interrupted apply
            if parent_id:
                mounts.run("btrfs", "subvolume", "snapshot", str(self.require_layer(parent_id)), str(work))
            else:
                mounts.run("btrfs", "subvolume", "create", str(work))
            try:
                self.unpack_into(diff, work)
            except BaseException:
                _delete_subvolume(work)
                raise
            os.rename(work, target)
        return mounts.tree_usage(str(target))

    @hookimpl
    def storage_layer_remove(self, layer_id: str) -> None:
        _delete_subvolume(self.layer_dir(layer_id))

    @hookimpl
    def storage_rootfs_create(self, container_id: str, layer_id: str) -> None:
        target = self.container_dir(container_id)
        if layer_id:
            mounts.run("btrfs", "subvolume", "snapshot", str(self.require_layer(layer_id)), str(target))
        else:
            mounts.run("btrfs", "subvolume", "create", str(target))

    @hookimpl
    def storage_rootfs_mount(self, container_id: str) -> str:
        return str(self.container_dir(container_id))

    @hookimpl
    def storage_rootfs_unmount(self, container_id: str) -> None:
        """Nothing is mounted: a container's subvolume is visible where it is."""

    @hookimpl
    def storage_rootfs_remove(self, container_id: str) -> None:
        _delete_subvolume(self.container_dir(container_id))

    @hookimpl
    def storage_usage(self, container_id: str) -> FilesystemUsage:
        return mounts.tree_usage(str(self.container_dir(container_id)))

"""The vfs storage driver: every layer and container is a full copy. Works on any filesystem."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from shimhub.sdk import FilesystemUsage, PluginContext, Readiness, hookimpl, mounts
from shimhub_storage.driver import DriverBase


def copy_tree(source: str, target: str) -> None:
    """Copy `source`'s content into `target` with everything kept (reflinks where the filesystem has them)."""
    mounts.run("cp", "-a", "--reflink=auto", f"{source}/.", target)


class VfsDriver(DriverBase):
    """Layers as directories, each a complete copy of its parent plus its diff."""

    @hookimpl
    def storage_setup(self, root: str, options: Mapping[str, Any], context: PluginContext) -> Readiness:
        self.configure(root, options, context)
        return self.ready()

    @hookimpl
    def storage_layer_apply(self, layer_id: str, parent_id: str, diff: IO[bytes]) -> FilesystemUsage:
        def fill(work: Path) -> None:
            if parent_id:
                copy_tree(str(self.require_layer(parent_id)), str(work))
            self.unpack_into(diff, work)

        target = self.layer_dir(layer_id)
        self.publish(target, fill)
        return mounts.tree_usage(str(target))

    @hookimpl
    def storage_layer_remove(self, layer_id: str) -> None:
        mounts.remove_tree(self.layer_dir(layer_id))

    @hookimpl
    def storage_rootfs_create(self, container_id: str, layer_id: str) -> None:
        rootfs = self.container_dir(container_id) / "rootfs"
        rootfs.mkdir(parents=True, mode=0o755)
        if layer_id:
            copy_tree(str(self.require_layer(layer_id)), str(rootfs))

    @hookimpl
    def storage_rootfs_mount(self, container_id: str) -> str:
        return str(self.container_dir(container_id) / "rootfs")

    @hookimpl
    def storage_rootfs_unmount(self, container_id: str) -> None:
        """Nothing is mounted: a vfs root filesystem is a plain directory."""

    @hookimpl
    def storage_rootfs_remove(self, container_id: str) -> None:
        mounts.remove_tree(self.container_dir(container_id))

    @hookimpl
    def storage_usage(self, container_id: str) -> FilesystemUsage:
        return mounts.tree_usage(str(self.container_dir(container_id) / "rootfs"))

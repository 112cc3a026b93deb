"""The aufs storage driver: a branch per layer with aufs's own whiteouts, a writable branch per container.

No kernel on these machines has aufs (it was never merged upstream): the driver
detects that and refuses, naming the reason.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from shimhub.sdk import FilesystemUsage, InvalidArgument, PluginContext, Readiness, Whiteouts, hookimpl, mounts
from shimhub_storage.driver import UnionDriverBase

MOUNT_OPTIONS_LIMIT = 4096


class AufsWhiteouts(Whiteouts):
    """aufs's form is the OCI one: whiteout files are kept as they are and aufs honours them."""

    keep_entries = True


class AufsDriver(UnionDriverBase):
    """Layers as aufs read-only branches."""

    mount_dir = "mnt"
    writable_dir = "rw"
    whiteouts = AufsWhiteouts()

    @hookimpl
    def storage_setup(self, root: str, options: Mapping[str, Any], context: PluginContext) -> Readiness:
        self.configure(root, options, context)
        if not mounts.kernel_has_filesystem("aufs"):
            return self.ready("the kernel has no aufs filesystem (aufs is an out-of-tree module)")
        return self.ready()

    def _parents(self, layer_id: str) -> list[str]:
        parent_file = self.layer_dir(layer_id) / "parents"
        return parent_file.read_text().split() if parent_file.exists() else []

    @hookimpl
    def storage_layer_apply(self, layer_id: str, parent_id: str, diff: IO[bytes]) -> FilesystemUsage:
        def describe(work: Path) -> None:
            chain = [parent_id, *self._parents(parent_id)] if parent_id else []
            (work / "parents").write_text(" ".join(chain))

        self.add_layer(layer_id, diff, describe)
        return mounts.tree_usage(str(self.layer_dir(layer_id) / "diff"))

    @hookimpl
    def storage_layer_remove(self, layer_id: str) -> None:
        mounts.remove_tree(self.layer_dir(layer_id))

    @hookimpl
    def storage_rootfs_create(self, container_id: str, layer_id: str) -> None:
        directory = self.container_dir(container_id)
        for sub in ("rw", "mnt"):
            (directory / sub).mkdir(parents=True, mode=0o755)
        (directory / "layers").write_text(" ".join([layer_id, *self._parents(layer_id)]) if layer_id else "")

    def branches(self, container_id: str) -> str:
        """The aufs `br` option: the writable branch, then every layer top down, whiteouts honoured."""
        directory = self.container_dir(container_id)
        layers = (directory / "layers").read_text().split()
        branches = [f"{directory / 'rw'}=rw"] + [f"{self.layer_dir(layer) / 'diff'}=ro+wh" for layer in layers]
        option = "br=" + ":".join(branches)
        if len(option) >= MOUNT_OPTIONS_LIMIT:
            raise InvalidArgument(f"the image has too many layers for one aufs mount ({len(layers)})")
        return option

    @hookimpl
    def storage_rootfs_mount(self, container_id: str) -> str:
        mnt = self.container_dir(container_id) / "mnt"
        if not os.path.ismount(mnt):
            mounts.run("mount", "-t", "aufs", "-o", self.branches(container_id), "none", str(mnt))
        return str(mnt)

"""What every storage driver shares: its directories, mounts, usage, and checks of the node."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

from shimhub.sdk import (
    APPLY,
    FilesystemUsage,
    NotFound,
    PluginContext,
    Readiness,
    Whiteouts,
    hookimpl,
    mounts,
    plugin_options,
    unpack,
)


class DriverBase:
    """Directories and bookkeeping shared by the drivers; subclasses implement the hooks."""

    shimhub_api = "1.5"
    #: Options this driver accepts, with their defaults.
    option_defaults: Mapping[str, Any] = {}
    whiteouts: Whiteouts = APPLY

    def __init__(self) -> None:
        self.root = Path()
        self.options: dict[str, Any] = {}
        self.context: PluginContext | None = None

    def configure(self, root: str, options: Mapping[str, Any], context: PluginContext) -> None:
        """Validate options and create the driver's directories under `root`."""
        self.options = plugin_options.validated(options, self.option_defaults)
        self.root = Path(root) / context.name
        self.context = context
        mounts.remove_tree(self.root / "tmp")  # what a crash left half unpacked
        for sub in ("layers", "containers", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)

    def layer_dir(self, layer_id: str) -> Path:
        """Where layer `layer_id` lives."""
        return self.root / "layers" / layer_id

    def container_dir(self, container_id: str) -> Path:
        """Where a container's root filesystem and writable layer live."""
        return self.root / "containers" / container_id

    def require_layer(self, layer_id: str) -> Path:
        """The directory of an existing layer; NotFound otherwise."""
        path = self.layer_dir(layer_id)
        if not path.exists():
            raise NotFound(f"layer {layer_id} is not in the {self.context.name if self.context else ''} driver")
        return path

    def scratch(self) -> Path:
        """A fresh temporary directory on the driver's filesystem."""
        return Path(tempfile.mkdtemp(dir=self.root / "tmp"))

    def publish(self, target: Path, fill: Callable[[Path], None]) -> bool:
        """Create directory `target` at once: `fill` a scratch directory, then rename it.

        If `fill` fails, nothing is left. Returns False when `target` existed already.
        """
        if target.exists():
            return False
        work = self.scratch()
        try:
            fill(work)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        os.rename(work, target)
        return True

    def unpack_into(self, diff: IO[bytes], target: Path) -> None:
        """Unpack a layer tar into `target` with this driver's whiteout form."""
        unpack(diff, str(target), self.whiteouts)

    def ready(self, problem: str = "") -> Readiness:
        """Readiness with the driver's root in its info."""
        return Readiness(ready=not problem, reason=problem, info={"root": str(self.root), **self.options})


class UnionDriverBase(DriverBase):
    """Drivers that mount a union of read-only layers and one writable directory per container."""

    #: A container's mount point and writable directory, under its container directory.
    mount_dir = "merged"
    writable_dir = "upper"

    def add_layer(self, layer_id: str, diff: IO[bytes], describe: Callable[[Path], None]) -> bool:
        """Unpack `diff` into the layer's `diff` directory, atomically and once.

        `describe(directory)` writes the driver's own files next to `diff` before the
        layer appears. Returns False when the layer existed already.
        """

        def fill(work: Path) -> None:
            (work / "diff").mkdir(mode=0o755)
            self.unpack_into(diff, work / "diff")
            describe(work)

        return self.publish(self.layer_dir(layer_id), fill)

    @hookimpl
    def storage_rootfs_unmount(self, container_id: str) -> None:
        mounts.unmount(str(self.container_dir(container_id) / self.mount_dir))

    @hookimpl
    def storage_rootfs_remove(self, container_id: str) -> None:
        self.storage_rootfs_unmount(container_id)
        mounts.remove_tree(self.container_dir(container_id))

    @hookimpl
    def storage_usage(self, container_id: str) -> FilesystemUsage:
        return mounts.tree_usage(str(self.container_dir(container_id) / self.writable_dir))

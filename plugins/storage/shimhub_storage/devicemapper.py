"""The devicemapper storage driver: a thin pool, a thin device per layer, snapshots per container.

The pool is made of the configured block devices, or of sparse loop files under
the storage root when none are configured. Each layer is a thin snapshot of its
parent with the layer's diff applied on a mounted filesystem; a container's root
filesystem is a thin snapshot of its image's top layer. A kernel without
device-mapper (no /dev/mapper/control) is detected and the driver refuses,
naming the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from shimhub.sdk import (
    FailedPrecondition,
    FilesystemUsage,
    PluginContext,
    Readiness,
    hookimpl,
    mounts,
    write_atomically,
)
from shimhub_storage.driver import DriverBase

SECTOR = 512
#: Thin-pool block size in sectors (64 KiB) and the low-water mark in blocks.
POOL_BLOCK_SECTORS = 128
LOW_WATER_BLOCKS = 32768
GIB = 1 << 30


def device_mapper_problem() -> str:
    """Why device-mapper cannot be used on this node ("" when it can)."""
    if not os.path.exists("/dev/mapper/control"):
        return "device-mapper is not available: /dev/mapper/control is missing (no dm support in this kernel)"
    for tool in ("dmsetup", "losetup", "mkfs.ext4"):
        if shutil.which(tool) is None:
            return f"the {tool} command is not installed"
    targets = mounts.run("dmsetup", "targets")
    if "thin-pool" not in targets:
        return "the kernel's device-mapper has no thin-pool target (dm-thin-pool module not loaded)"
    return ""


class DevicemapperDriver(DriverBase):
    """Layers and containers as thin devices of one thin pool."""

    option_defaults: Mapping[str, Any] = {
        "data_device": "",
        "metadata_device": "",
        "loop_data_size_gib": 20,
        "loop_metadata_size_gib": 1,
        "base_size_gib": 10,
        "pool_name": "shimhub-thinpool",
    }

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.devices: dict[str, int] = {}
        #: The pool's device path, known after setup.
        self.pool = ""

    @hookimpl
    def storage_setup(self, root: str, options: Mapping[str, Any], context: PluginContext) -> Readiness:
        self.configure(root, options, context)
        self.pool = f"/dev/mapper/{self.options['pool_name']}"
        problem = device_mapper_problem()
        if problem:
            return self.ready(problem)
        index = self.root / "devices.json"
        self.devices = json.loads(index.read_text()) if index.exists() else {}
        self._ensure_pool()
        return self.ready()

    def _ensure_pool(self) -> None:
        if os.path.exists(self.pool):
            return
        data, metadata = self.options["data_device"], self.options["metadata_device"]
        if not data:
            data = self._loop(self.root / "data.img", self.options["loop_data_size_gib"])
            metadata = self._loop(self.root / "metadata.img", self.options["loop_metadata_size_gib"])
        sectors = int(mounts.run("blockdev", "--getsz", data).strip())
        table = f"0 {sectors} thin-pool {metadata} {data} {POOL_BLOCK_SECTORS} {LOW_WATER_BLOCKS}"
        mounts.run("dmsetup", "create", self.options["pool_name"], "--table", table)

    @staticmethod
    def _loop(path: Path, size_gib: int) -> str:
        if not path.exists():
            with path.open("wb") as sparse:
                sparse.truncate(size_gib * GIB)
        attached = mounts.run("losetup", "-j", str(path)).strip()
        if attached:
            return attached.split(":", 1)[0]
        return mounts.run("losetup", "--find", "--show", str(path)).strip()

    def _save(self) -> None:
        write_atomically(self.root / "devices.json", json.dumps(self.devices).encode())

    def _new_device(self, key: str, origin: str) -> int:
        with self.lock:
            device_id = max(self.devices.values(), default=0) + 1
            if origin:
                mounts.run("dmsetup", "message", self.pool, "0", f"create_snap {device_id} {self.devices[origin]}")
            else:
                mounts.run("dmsetup", "message", self.pool, "0", f"create_thin {device_id}")
            self.devices[key] = device_id
            self._save()
        return device_id

    def _activate(self, key: str) -> str:
        name = f"{self.options['pool_name']}-{key[:48]}"
        path = f"/dev/mapper/{name}"
        if not os.path.exists(path):
            sectors = self.options["base_size_gib"] * GIB // SECTOR
            mounts.run("dmsetup", "create", name, "--table", f"0 {sectors} thin {self.pool} {self.devices[key]}")
        return path

    def _deactivate(self, key: str) -> None:
        name = f"{self.options['pool_name']}-{key[:48]}"
        if os.path.exists(f"/dev/mapper/{name}"):
            mounts.run("dmsetup", "remove", name)

    def _delete(self, key: str) -> None:
        if key not in self.devices:
            return
        self._deactivate(key)
        with self.lock:
            mounts.run("dmsetup", "message", self.pool, "0", f"delete {self.devices.pop(key)}")
            self._save()

    @hookimpl
    def storage_layer_apply(self, layer_id: str, parent_id: str, diff: IO[bytes]) -> FilesystemUsage:
        key = f"layer-{layer_id}"
        mountpoint = self.layer_dir(layer_id)
        if key in self.devices and (mountpoint / "applied").exists():
            return FilesystemUsage(**json.loads((mountpoint / "applied").read_text()))
        self._delete(key)  # an interrupted apply
        if parent_id and f"layer-{parent_id}" not in self.devices:
            raise FailedPrecondition(f"parent layer {parent_id} is not in the devicemapper driver")
        self._new_device(key, f"layer-{parent_id}" if parent_id else "")
        device = self._activate(key)
        if not parent_id:
            mounts.run("mkfs.ext4", "-q", "-E", "nodiscard,lazy_itable_init=0", device)
        work = self.scratch()
        mounts.run("mount", device, str(work))
        try:
            self.unpack_into(diff, work)
            usage = mounts.tree_usage(str(work))
        finally:
            mounts.unmount(str(work))
            work.rmdir()
            self._deactivate(key)
        mountpoint.mkdir(parents=True, exist_ok=True)
        (mountpoint / "applied").write_text(
            json.dumps({"used_bytes": usage.used_bytes, "inodes_used": usage.inodes_used})
        )
        return usage

    @hookimpl
    def storage_layer_remove(self, layer_id: str) -> None:
        self._delete(f"layer-{layer_id}")
        shutil.rmtree(self.layer_dir(layer_id), ignore_errors=True)

    @hookimpl
    def storage_rootfs_create(self, container_id: str, layer_id: str) -> None:
        key = f"container-{container_id}"
        self._new_device(key, f"layer-{layer_id}" if layer_id else "")
        if not layer_id:
            mounts.run("mkfs.ext4", "-q", "-E", "nodiscard", self._activate(key))
        (self.container_dir(container_id) / "rootfs").mkdir(parents=True, mode=0o755)

    @hookimpl
    def storage_rootfs_mount(self, container_id: str) -> str:
        rootfs = self.container_dir(container_id) / "rootfs"
        if not os.path.ismount(rootfs):
            mounts.run("mount", self._activate(f"container-{container_id}"), str(rootfs))
        return str(rootfs)

    @hookimpl
    def storage_rootfs_unmount(self, container_id: str) -> None:
        mounts.unmount(str(self.container_dir(container_id) / "rootfs"))
        self._deactivate(f"container-{container_id}")

    @hookimpl
    def storage_rootfs_remove(self, container_id: str) -> None:
        self.storage_rootfs_unmount(container_id)
        self._delete(f"container-{container_id}")
        shutil.rmtree(self.container_dir(container_id), ignore_errors=True)

    @hookimpl
    def storage_usage(self, container_id: str) -> FilesystemUsage:
        rootfs = self.container_dir(container_id) / "rootfs"
        return mounts.tree_usage(str(rootfs)) if os.path.ismount(rootfs) else FilesystemUsage(0, 0)

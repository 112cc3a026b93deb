"""ClearContainersRuntime: one QEMU VM per pod; each container's root filesystem is a block device.

The VM, its agent and every hook come from `shimhub_vm.runtime.VmRuntime`
(see there for the handler options). What is Clear Containers' own: a
container's root filesystem reaches the guest as a disk. shimhub copies the
root filesystem the storage driver prepared into an ext4 image file and
hot-plugs it into the VM (virtio-SCSI, found in the guest by its serial);
the guest mounts it as the container's root. The container's writes stay in
that image: they are not in the storage driver's writable layer.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path

from shimhub.sdk import ContainerRecord, PluginFailed, SandboxRecord, mounts
from shimhub_vm import qemu
from shimhub_vm.runtime import VmRuntime

#: Room left in a root filesystem image beyond what the files take.
HEADROOM_MIB = 64
UNPLUG_WAIT = 10.0


def _size_mib(path: str) -> int:
    used = subprocess.run(["du", "-s", "-m", "-x", path], capture_output=True, text=True, check=True).stdout
    return int(used.split()[0]) * 3 // 2 + HEADROOM_MIB


class ClearContainersRuntime(VmRuntime):
    """VM pods with each container's root filesystem handed to the guest as a disk."""

    block_devices = True

    def _disk(self, container: ContainerRecord) -> Path:
        assert self.context is not None
        return self.context.state_dir / "disks" / f"{container.id}.ext4"

    def share_rootfs(self, sandbox: SandboxRecord, container: ContainerRecord, rootfs: str) -> dict[str, str]:
        disk = self._disk(container)
        disk.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        mounts.run("mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-d", rootfs, str(disk), f"{_size_mib(rootfs)}M")
        node, serial = f"disk-{container.id[:12]}", container.id[:20]
        qmp = qemu.Qmp(self._dir(sandbox))
        try:
            qmp.execute(
                "blockdev-add",
                **{"node-name": node, "driver": "raw", "file": {"driver": "file", "filename": str(disk)}},
            )
            qmp.execute("device_add", driver="scsi-hd", bus="scsi0.0", drive=node, id=node, serial=serial)
        finally:
            qmp.close()
        return {"type": "block", "serial": serial}

    def release_rootfs(self, sandbox: SandboxRecord, container: ContainerRecord) -> None:
        node = f"disk-{container.id[:12]}"
        if qemu.running(sandbox.runtime_data.get("vm", {}).get("pid", 0)):
            qmp = qemu.Qmp(self._dir(sandbox))
            try:
                with contextlib.suppress(PluginFailed):  # not plugged (any more)
                    qmp.execute("device_del", id=node)
                deadline = time.monotonic() + UNPLUG_WAIT
                while True:
                    try:
                        qmp.execute("blockdev-del", **{"node-name": node})
                        break
                    except PluginFailed as exc:
                        if "not found" in str(exc).lower() or time.monotonic() > deadline:
                            break
                        time.sleep(0.05)  # still in use by the device being unplugged
            finally:
                qmp.close()
        self._disk(container).unlink(missing_ok=True)

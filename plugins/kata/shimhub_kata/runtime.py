"""KataRuntime: one QEMU micro-VM per pod; container root filesystems reach it through virtio-fs.

The VM, its agent and every hook come from `shimhub_vm.runtime.VmRuntime`
(see there for the handler options). What is Kata's own: a container's root
filesystem, mounted on the node by the storage driver, is bind-mounted into
the pod's shared directory, which virtiofsd serves to the guest, so the
guest's runc uses it in place and writes land in the container's writable layer.
"""

from __future__ import annotations

from shimhub.sdk import ContainerRecord, SandboxRecord, mounts
from shimhub_vm.runtime import VmRuntime


class KataRuntime(VmRuntime):
    """VM pods with container root filesystems shared through virtio-fs."""

    def share_rootfs(self, sandbox: SandboxRecord, container: ContainerRecord, rootfs: str) -> dict[str, str]:
        target = self._shared(sandbox) / container.id / "rootfs"
        target.mkdir(parents=True, exist_ok=True)
        mounts.run("mount", "--bind", rootfs, str(target))
        return {"type": "shared", "path": f"{container.id}/rootfs"}

    def release_rootfs(self, sandbox: SandboxRecord, container: ContainerRecord) -> None:
        mounts.unmount(str(self._shared(sandbox) / container.id / "rootfs"))

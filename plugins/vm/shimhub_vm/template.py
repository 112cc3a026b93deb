"""VM templates: a guest booted once per VM shape, its state saved, each pod's VM restored from it.

QEMU saves a paused VM's state by migrating it to a file, and starts another
VM from that file (``-incoming``) instead of booting a kernel. A restored VM
must have its template's devices. A vhost-user-fs device (the pod's shared
directory) cannot be migrated, so a template has a free PCIe root port instead
and the pod's share is plugged in there after the restore; its network
device is the template's, with the pod's tap behind it, and the agent gives
it the pod's MAC address. The agent then steps the guest clock to the host's
and sets the pod up as after a boot (hostname, addresses, routes, share).

A template is kept per shape (hypervisor, machine, acceleration, vCPUs,
memory, kernel parameters, guest files and their modification times), so a
new guest image or other VM options make a new one; a new guest image
removes the templates of the old one. Each restored VM reads
the template's memory into its own: pages are not shared between VMs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import attrs

from shimhub.sdk import DeadlineExceeded, PluginFailed
from shimhub_vm import qemu
from shimhub_vm.agentclient import AgentClient

#: The MAC address of a template's network device (locally administered); the agent gives the pod's.
TEMPLATE_MAC = "02:53:48:00:00:01"
STATE = "state"
MIGRATION_TIMEOUT = 120.0


def _digest(described: object) -> str:
    return hashlib.sha256(json.dumps(described).encode()).hexdigest()[:16]


def location(config: qemu.VmConfig) -> Path:
    """Where the template of VMs shaped as `config` is kept, relative to a handler's templates: a directory
    named after the guest files (their paths, times and sizes), in it one named after everything else the
    saved state depends on."""
    files = [config.guest.kernel, config.guest.initrd, config.guest.image]
    guest = [[path, (found := os.stat(path)).st_mtime_ns, found.st_size] for path in files]
    machine = [config.hypervisor, config.machine, config.accel, config.vcpus, config.memory_mib,
               config.kernel_params, config.scsi]  # fmt: skip
    return Path(_digest(guest), _digest(machine))


class Templates:
    """The templates of one runtime handler, under `directory`; built on first use, one build at a time."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()

    def state(self, config: qemu.VmConfig, boot_timeout: float) -> Path:
        """The saved state for VMs shaped as `config`, booting and saving a template first if there is none.

        Templates of other shapes stay (pods may ask for other vCPUs or memory); those of guest files that
        were replaced go."""
        relative = location(config)
        target = self.directory / relative / STATE
        with self._lock:
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                for stale in self.directory.iterdir():
                    if stale.name != relative.parts[0]:
                        shutil.rmtree(stale, ignore_errors=True)
                self._build(config, target, boot_timeout)
        return target

    @staticmethod
    def _build(config: qemu.VmConfig, target: Path, boot_timeout: float) -> None:
        with tempfile.TemporaryDirectory(prefix="template-", dir=target.parent) as scratch:
            work = Path(scratch)
            booted = attrs.evolve(
                config, directory=work, netns="", tap="", mac=TEMPLATE_MAC, share_socket="", templated=True, incoming=""
            )
            pid = qemu.start(booted, boot_timeout)
            try:
                client = AgentClient(work, boot_timeout)
                client.connect(boot_timeout)
                client.close()
                qmp = qemu.Qmp(work)
                try:
                    qmp.execute("stop")
                    partial = target.with_suffix(".partial")
                    qmp.execute("migrate", uri=f"exec:cat > {partial}")
                    deadline = time.monotonic() + MIGRATION_TIMEOUT
                    while (status := qmp.execute("query-migrate").get("status")) not in ("completed", "failed"):
                        if time.monotonic() > deadline:
                            raise DeadlineExceeded(f"saving the VM template took over {MIGRATION_TIMEOUT:g} s")
                        time.sleep(0.05)
                    if status != "completed":
                        raise PluginFailed(f"saving the VM template failed: {qmp.execute('query-migrate')}")
                    partial.rename(target)
                finally:
                    qmp.close()
            finally:
                qemu.stop(pid, work)


def resume(directory: Path, timeout: float) -> None:
    """Once a VM restored from a template has loaded its state (paused, as the template was saved), plug its
    share into the free root port and let it run."""
    qmp = qemu.Qmp(directory, timeout)
    try:
        deadline = time.monotonic() + timeout
        while (status := qmp.execute("query-migrate").get("status")) != "completed":
            if status == "failed" or time.monotonic() > deadline:
                raise DeadlineExceeded(f"the VM did not load its template within {timeout:g} s ({status})")
            time.sleep(0.01)
        qmp.execute("device_add", driver="vhost-user-fs-pci", id="share-fs", chardev="share", tag=qemu.SHARE_TAG,
                    bus=qemu.SHARE_PORT)  # fmt: skip
        qmp.execute("cont")
    finally:
        qmp.close()

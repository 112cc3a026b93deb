"""One QEMU process per VM pod: its command line, start, QMP commands, stop, and the acceleration probe."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
from attrs import define, field

from shimhub.sdk import DeadlineExceeded, PluginFailed
from shimhub_vm.guest import AGENT_PORT, GuestFiles

#: Kernel parameters every guest gets (before the handler's and the pod's).
BASE_KERNEL_PARAMS = "console=ttyS0 quiet panic=-1 reboot=t"
PROBE_TIMEOUT = 10.0
#: Socket names in a VM's directory.
AGENT_SOCKET = "agent.sock"
#: The vhost-user socket of the VM's virtiofsd, the tag the guest mounts, and the root port a template keeps for it.
SHARE_SOCKET = "share.sock"
SHARE_TAG = "shimhub"
SHARE_PORT = "share-port"
QMP_SOCKET = "qmp.sock"
#: A boot sector that writes 0x31 to port 0xf4 (QEMU's isa-debug-exit), so QEMU exits with code 99.
_PROBE_SECTOR = bytes([0xB0, 0x31, 0xE6, 0xF4, 0xF4, 0xEB, 0xFD]).ljust(510, b"\0") + b"\x55\xaa"
_PROBE_EXIT = (0x31 << 1) | 1


@define
class VmConfig:
    """Everything one VM is started with."""

    hypervisor: str
    machine: str
    accel: str
    vcpus: int
    memory_mib: int
    guest: GuestFiles
    kernel_params: str
    #: The VM's directory: QMP, agent and virtio-fs sockets, pid file, console log.
    #: QEMU runs in it and names its sockets relative to it (socket paths may not exceed 108 bytes).
    directory: Path
    #: Network namespace QEMU runs in and its tap device ("" for none).
    netns: str = ""
    tap: str = ""
    mac: str = ""
    #: vhost-user socket (in `directory`) of the virtiofsd sharing the pod's directory ("" for none).
    share_socket: str = ""
    #: Hot-pluggable virtio-SCSI controller for block-device root filesystems.
    scsi: bool = False
    #: A template's device layout: a network device even without a tap, a free root port for the share,
    #: and the share plugged in only after the start (see `template`).
    templated: bool = False
    #: A template's saved state to start from instead of booting ("" to boot).
    incoming: str = ""
    extra: list[str] = field(factory=list)

    @property
    def pidfile(self) -> Path:
        return self.directory / "qemu.pid"

    @property
    def console_log(self) -> Path:
        return self.directory / "console.log"


def command(config: VmConfig) -> list[str]:
    """QEMU's command line for `config`."""
    memory = f"memory-backend-memfd,id=mem,size={config.memory_mib}M,share=on"
    argv = [
        config.hypervisor,
        "-name", f"shimhub-{config.directory.name[:12]}",
        "-machine", f"{config.machine},accel={config.accel},memory-backend=mem",
        "-cpu", "host" if config.accel == "kvm" else "max",
        "-smp", str(config.vcpus),
        "-m", f"{config.memory_mib}M",
        "-object", memory,
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-kernel", config.guest.kernel,
        "-initrd", config.guest.initrd,
        "-append", " ".join(p for p in (BASE_KERNEL_PARAMS, config.kernel_params) if p),
        "-serial", f"file:{config.console_log}",
        "-drive", f"if=none,id=guest,file={config.guest.image},format=raw,readonly=on",
        "-device", "virtio-blk-pci,drive=guest",
        "-device", "virtio-serial-pci,id=serial0",
        "-chardev", f"socket,id=agent,path={AGENT_SOCKET},server=on,wait=off",
        "-device", f"virtserialport,bus=serial0.0,chardev=agent,name={AGENT_PORT}",
        "-qmp", f"unix:{QMP_SOCKET},server=on,wait=off",
        "-pidfile", str(config.pidfile),
        "-daemonize",
    ]  # fmt: skip
    if config.tap:
        argv += ["-netdev", f"tap,id=net0,ifname={config.tap},script=no,downscript=no"]
    elif config.templated:
        argv += ["-netdev", "hubport,id=net0,hubid=0"]  # nothing behind it: the device is the template's
    if config.tap or config.templated:
        argv += ["-device", f"virtio-net-pci,netdev=net0,mac={config.mac}"]
    if config.templated:
        argv += ["-device", f"pcie-root-port,id={SHARE_PORT},chassis=1"]
    if config.share_socket:  # a template's device is plugged in after the start (the chardev resolves its path now)
        argv += ["-chardev", f"socket,id=share,path={config.share_socket}"]
        argv += [] if config.templated else ["-device", f"vhost-user-fs-pci,chardev=share,tag={SHARE_TAG}"]
    if config.incoming:
        argv += ["-incoming", f"exec:cat {config.incoming}"]
    if config.scsi:
        argv += ["-device", "virtio-scsi-pci,id=scsi0"]
    return argv + config.extra


def start(config: VmConfig, timeout: float) -> int:
    """Start the VM (in its network namespace); its QEMU process's pid once QEMU runs."""
    argv = command(config)
    if config.netns:
        argv = ["nsenter", f"--net={config.netns}", "--", *argv]
    try:
        result = subprocess.run(
            argv, capture_output=True, timeout=timeout, check=False, start_new_session=True, cwd=config.directory
        )
    except subprocess.TimeoutExpired:
        raise DeadlineExceeded(f"QEMU did not start within {timeout:g} s") from None
    if result.returncode != 0:
        detail = result.stderr.decode(errors="replace").strip()
        raise PluginFailed(f"QEMU failed to start (exit code {result.returncode}): {detail}")
    return int(config.pidfile.read_text())


def _unix_socket(directory: Path, name: str, timeout: float, listen: bool) -> socket.socket:
    """A unix socket named `name` in `directory`, connected or listening, however long the directory's path.

    Goes through /proc/self/fd: a socket's path may not exceed 108 bytes.
    """
    fd = os.open(directory, os.O_PATH | os.O_DIRECTORY)
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.settimeout(timeout)
    try:
        if listen:
            unix.bind(f"/proc/self/fd/{fd}/{name}")
            unix.listen()
        else:
            unix.connect(f"/proc/self/fd/{fd}/{name}")
    except OSError:
        unix.close()
        raise
    finally:
        os.close(fd)
    unix.settimeout(None)
    return unix


def connect(directory: Path, name: str, timeout: float) -> socket.socket:
    """A connection to socket `name` in `directory`."""
    return _unix_socket(directory, name, timeout, listen=False)


def listen(directory: Path, name: str) -> socket.socket:
    """A listening socket `name` in `directory` (for a helper such as virtiofsd to inherit)."""
    return _unix_socket(directory, name, 0, listen=True)


def running(pid: int) -> bool:
    """Whether `pid` is a live QEMU process (not a zombie, not a recycled pid of something else)."""
    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and "qemu" in process.name()
    except psutil.Error:
        return False


class Qmp:
    """A QMP connection to one VM."""

    def __init__(self, directory: Path, timeout: float = 10.0) -> None:
        try:
            self._socket = connect(directory, QMP_SOCKET, timeout)
        except OSError as exc:
            raise PluginFailed(f"cannot reach the VM's QMP socket: {exc.strerror or exc}") from None
        self._socket.settimeout(timeout)
        self._file = self._socket.makefile("rwb")
        self._reply()  # the greeting
        self.execute("qmp_capabilities")

    def _reply(self) -> dict:
        while True:
            line = self._file.readline()
            if not line:
                raise PluginFailed("QEMU closed its QMP connection")
            message = json.loads(line)
            if "event" not in message:
                return message

    def execute(self, name: str, **arguments: object) -> object:
        """Run QMP command `name`; its return value, PluginFailed with QEMU's message on error."""
        self._file.write(json.dumps({"execute": name, "arguments": arguments}).encode() + b"\n")
        self._file.flush()
        reply = self._reply()
        if "error" in reply:
            raise PluginFailed(f"QEMU {name}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
            self._socket.close()


def stop(pid: int, directory: Path, timeout: float = 10.0) -> None:
    """Stop the VM: QMP quit, SIGKILL if QEMU does not go; return once the process is gone."""
    if not running(pid):
        return
    with contextlib.suppress(PluginFailed, OSError):
        qmp = Qmp(directory, timeout=2.0)
        try:
            qmp.execute("quit")
        finally:
            qmp.close()
    deadline = time.monotonic() + timeout
    while running(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    if running(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).wait(timeout)


def probe_acceleration(hypervisor: str, machine: str, directory: Path) -> tuple[str, str]:
    """("kvm", "") when /dev/kvm runs a guest of `machine` with the host's CPU, else ("tcg", why not).

    Boots a one-instruction guest under KVM that makes QEMU exit with a known
    code: /dev/kvm may open and still never run a guest.
    """
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg", "/dev/kvm is not there"
    directory.mkdir(parents=True, exist_ok=True)
    disk = directory / "kvm-probe.img"
    disk.write_bytes(_PROBE_SECTOR)
    argv = [
        hypervisor, "-accel", "kvm", "-machine", machine, "-cpu", "host", "-nodefaults", "-display", "none",
        "-no-user-config", "-drive", f"if=none,id=probe,file={disk},format=raw",
        "-device", "virtio-blk-pci,drive=probe", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
    ]  # fmt: skip
    try:
        result = subprocess.run(argv, capture_output=True, timeout=PROBE_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        return "tcg", f"/dev/kvm is there but a guest under it did not run within {PROBE_TIMEOUT:g} s"
    finally:
        disk.unlink(missing_ok=True)
    if result.returncode == _PROBE_EXIT:
        return "kvm", ""
    detail = result.stderr.decode(errors="replace").strip().splitlines()
    return "tcg", f"a guest under /dev/kvm failed: {detail[-1] if detail else f'exit code {result.returncode}'}"

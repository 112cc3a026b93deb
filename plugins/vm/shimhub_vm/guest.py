"""Building what a VM boots: an initramfs and a read-only guest OS image.

The initramfs holds busybox and the guest kernel's modules that a VM pod needs
(virtio PCI, console, block, net, SCSI, virtio-fs); its init loads them,
mounts the guest OS image (the first virtio disk) read-only and hands over to
the agent. The guest OS image is an ext4 file system made from the node's own
busybox, Python interpreter and standard library, runc, and shimhub's agent.

Both are built once per set of inputs and kept in a cache directory under a
name that is a hash of those inputs, so a new kernel, Python or agent gives a
new image and an unchanged node reuses the old one.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from attrs import define

from shimhub.sdk import FailedPrecondition

#: Guest kernel modules loaded at boot (with their dependencies, from modules.dep).
MODULES = ("virtio_pci", "virtio_console", "virtio_blk", "virtio_net", "virtio_scsi", "sd_mod", "virtiofs")
#: Standard library parts the agent never imports (tests, GUI, tooling). Compiled modules
#: (__pycache__) are kept: the guest's Python would otherwise compile every module at every boot.
STDLIB_SKIP = {
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "lib2to3",
    "pydoc_data",
    "site-packages",
    "dist-packages",
    "unittest",
    "distutils",
}
#: The agent program: the only files of this package the guest gets (standard library only).
AGENT_FILES = ("shimhub_vm/__init__.py", "shimhub_vm/channel.py", "shimhub_vm/agent.py")
AGENT_DIR = "/usr/lib/shimhub-agent"
#: The guest side of the virtio-serial port the agent talks on.
AGENT_PORT = "shimhub.agent"

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
while read -r module; do insmod "/modules/$module" || echo "shimhub init: cannot load $module"; done < /modules/order
mkdir -p /newroot
n=0
until mount -t ext4 -o ro /dev/vda /newroot 2>/dev/null; do
  n=$((n + 1)); [ "$n" -gt 200 ] && { echo "shimhub init: no guest OS image on /dev/vda"; poweroff -f; }
  sleep 0.05
done
for fs in proc sys dev; do mount --move "/$fs" "/newroot/$fs"; done
export PYTHONHOME=/usr PYTHONPATH=%(agent_dir)s PYTHONDONTWRITEBYTECODE=1 PATH=/usr/sbin:/usr/bin:/sbin:/bin
exec switch_root /newroot /usr/bin/python3 -S -m shimhub_vm.agent
"""


@define
class GuestFiles:
    """The kernel, initramfs and guest OS image one VM boots from."""

    kernel: str
    initrd: str
    image: str


def default_kernel() -> str:
    """The newest /boot/vmlinuz-* ("" when there is none)."""
    kernels = sorted(Path("/boot").glob("vmlinuz-*"), key=lambda p: [int(n) for n in re.findall(r"\d+", p.name)])
    return str(kernels[-1]) if kernels else ""


def kernel_release(kernel: str) -> str:
    """The release a /boot/vmlinuz-RELEASE kernel's modules are kept under."""
    return Path(kernel).name.removeprefix("vmlinuz-")


def _libraries(binary: str) -> list[str]:
    """The shared libraries `binary` loads, the dynamic loader included (ldd)."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=False).stdout
    return [part for line in out.splitlines() for part in line.split() if part.startswith("/")]


def _module_order(release: str) -> list[str]:
    """Module files (relative to the release's module directory) to load, dependencies first."""
    root = Path("/lib/modules") / release
    try:
        lines = (root / "modules.dep").read_text().splitlines()
    except OSError:
        raise FailedPrecondition(f"no modules for guest kernel {release} in /lib/modules") from None
    deps = {}
    for line in lines:
        module, _, needs = line.partition(":")
        deps[module] = needs.split()
    by_name = {Path(path).name.split(".")[0].replace("-", "_"): path for path in deps}
    order: list[str] = []

    def add(path: str) -> None:
        for dependency in reversed(deps.get(path, [])):
            add(dependency)
        if path not in order:
            order.append(path)

    for name in MODULES:
        if name not in by_name:
            raise FailedPrecondition(f"guest kernel {release} has no module {name}")
        add(by_name[name])
    return order


def _inputs_hash(*parts: str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:16]


def _agent_sources() -> dict[str, bytes]:
    package = Path(__file__).resolve().parent.parent
    return {name: (package / name).read_bytes() for name in AGENT_FILES}


def _runc() -> str:
    path = shutil.which("runc")
    if not path:
        raise FailedPrecondition("runc is not installed: the guest OS image carries the node's runc (Debian runc)")
    return path


def _copy_binary(binary: str, root: Path, destination: str) -> None:
    """Copy `binary` to `destination` in `root` with the shared libraries it needs (into /lib)."""
    target = root / destination.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(os.path.realpath(binary), target)
    _copy_libraries(binary, root)


def _copy_libraries(binary: str, root: Path) -> None:
    """Copy the shared libraries `binary` needs into `root`'s /lib (the dynamic loader into /lib64 too)."""
    for library in _libraries(binary):
        for where in ("lib", "lib64") if "ld-linux" in library else ("lib",):
            copy = root / where / Path(library).name
            copy.parent.mkdir(parents=True, exist_ok=True)
            if not copy.exists():
                shutil.copy2(os.path.realpath(library), copy)


def _write_initramfs(release: str, target: Path) -> None:
    busybox = shutil.which("busybox")
    if not busybox:
        raise FailedPrecondition("busybox is not installed (Debian busybox-static)")
    order = _module_order(release)
    with tempfile.TemporaryDirectory(dir=target.parent) as staging:
        root = Path(staging)
        for directory in ("bin", "proc", "sys", "dev", "modules"):
            (root / directory).mkdir()
        shutil.copy2(busybox, root / "bin" / "busybox")
        for module in order:
            shutil.copy2(Path("/lib/modules") / release / module, root / "modules" / Path(module).name)
        (root / "modules" / "order").write_text("".join(Path(m).name + "\n" for m in order))
        (root / "init").write_text(INIT % {"agent_dir": AGENT_DIR})
        (root / "init").chmod(0o755)
        names = sorted(str(path.relative_to(root)) for path in root.rglob("*"))
        with open(target, "wb") as out:
            subprocess.run(
                ["cpio", "-o", "-H", "newc", "--quiet"],
                input="\n".join(names).encode(),
                cwd=root,
                stdout=out,
                check=True,
            )


def _write_image(target: Path) -> None:
    busybox = shutil.which("busybox")
    if not busybox:
        raise FailedPrecondition("busybox is not installed (Debian busybox-static)")
    with tempfile.TemporaryDirectory(dir=target.parent) as staging:
        root = Path(staging) / "root"
        for directory in ("bin", "sbin", "proc", "sys", "dev", "run", "tmp", "etc", "usr/bin", "usr/sbin"):
            (root / directory).mkdir(parents=True)
        shutil.copy2(busybox, root / "bin" / "busybox")
        for applet in subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split():
            link = root / "bin" / applet
            if not link.exists():
                link.symlink_to("busybox")
        _copy_binary(sys.executable, root, "/usr/bin/python3")
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        shutil.copytree(
            stdlib,
            root / "usr/lib" / stdlib.name,
            symlinks=True,
            ignore=lambda _dir, names: [n for n in names if n in STDLIB_SKIP or n.startswith("config-")],
        )
        dynload = Path(sysconfig.get_paths()["platstdlib"]) / "lib-dynload"
        if dynload.is_dir() and not (root / "usr/lib" / stdlib.name / "lib-dynload").exists():
            shutil.copytree(dynload, root / "usr/lib" / stdlib.name / "lib-dynload")
        for extension in (root / "usr/lib" / stdlib.name / "lib-dynload").glob("*.so"):
            _copy_libraries(str(extension), root)
        _copy_binary(_runc(), root, "/usr/sbin/runc")
        for name, content in _agent_sources().items():
            path = root / AGENT_DIR.lstrip("/") / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(root / AGENT_DIR.lstrip("/"))], check=True)
        (root / "etc/passwd").write_text("root:x:0:0:root:/:/bin/sh\n")
        (root / "etc/group").write_text("root:x:0:\n")
        size_mib = 64 + sum(f.stat().st_size for f in root.rglob("*") if f.is_file() and not f.is_symlink()) // 2**20
        subprocess.run(
            [
                "mkfs.ext4",
                "-q",
                "-F",
                "-L",
                "shimhub-guest",
                "-O",
                "^has_journal",
                "-d",
                str(root),
                str(target),
                f"{size_mib}M",
            ],
            check=True,
            capture_output=True,
        )


class GuestBuilder:
    """Builds and caches guest files under `cache_dir`; safe to call from many threads."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        self._lock = threading.Lock()

    def files(self, kernel: str, initrd: str = "", image: str = "") -> GuestFiles:
        """The files for `kernel`: `initrd` and `image` as given, else built (once) for this node."""
        release = kernel_release(kernel)
        sources = _agent_sources()
        with self._lock:
            self.cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            recipe = Path(__file__).read_bytes().hex()  # a new recipe makes new files
            if not initrd:
                key = _inputs_hash(release, recipe)
                initrd = str(self._cached(f"initrd-{key}.cpio", lambda t: _write_initramfs(release, t)))
            if not image:
                key = _inputs_hash(sys.version, sys.executable, _runc(), recipe, *(v.hex() for v in sources.values()))
                image = str(self._cached(f"guest-{key}.ext4", _write_image))
        return GuestFiles(kernel=kernel, initrd=initrd, image=image)

    def _cached(self, name: str, write: Callable[[Path], None]) -> Path:
        target = self.cache_dir / name
        if not target.exists():
            partial = target.with_suffix(".partial")
            try:
                write(partial)
            except subprocess.CalledProcessError as exc:
                partial.unlink(missing_ok=True)
                detail = (exc.stderr or b"").decode(errors="replace").strip()
                raise FailedPrecondition(f"building the guest's {name} failed: {detail or exc}") from None
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
            partial.rename(target)
        return target

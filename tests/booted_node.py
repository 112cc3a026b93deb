"""A test node booted in QEMU: Debian with systemd as init and pure cgroup v2, running our `node` tests.

    python3 -m tests.booted_node [PYTEST ARGS]     # default: -m node
    python3 -m tests.booted_node -- COMMAND ...    # any command from the checkout, e.g. a benchmark

The node's root filesystem is built from Debian's packages with mmdebstrap
(systemd, runc, crun, conmon, the CNI plugins, dmsetup, thin-provisioning
tools, Debian's cloud kernel) and cached under CACHE by a hash of its recipe,
so a run builds it only when the recipe changed. It boots with
``systemd.unified_cgroup_hierarchy=1 cgroup_no_v1=all`` under KVM where KVM
runs a guest, else TCG. The host's root is shared read-only over virtio-fs;
the guest binds the checkout, this Python, what the tests run from the host
(the registry) and the wheels an offline ./install takes (downloaded once, cached
by requirements) at their own paths, runs pytest as root, prints its output on
the serial console, and powers off. This command prints that output and exits
with pytest's exit code.
"""

from __future__ import annotations

import base64
import configparser
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from shimhub_vm.qemu import probe_acceleration

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path("/var/cache/shimhub/node")
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
#: Debian packages of the node, besides what mmdebstrap's minbase variant brings.
PACKAGES = [
    "systemd",
    "systemd-sysv",
    "dbus",
    "udev",
    "kmod",
    "linux-image-cloud-amd64",
    "initramfs-tools",
    "python3",
    "python3-venv",
    "runc",
    "crun",
    "conmon",
    "catatonit",
    "containernetworking-plugins",
    "iproute2",
    "iptables",
    "util-linux",
    "e2fsprogs",
    "btrfs-progs",
    "gpgv",
    "dmsetup",
    "thin-provisioning-tools",
    "busybox-static",
    "procps",
    "criu",
]
KERNEL_ARGS = "root=/dev/vda rw console=ttyS0 quiet panic=-1 systemd.unified_cgroup_hierarchy=1 cgroup_no_v1=all"
MEMORY_MIB = 4096
#: How long a whole run in the node may take (TCG on 2 cores is slow).
RUN_TIMEOUT = 40 * 60
#: Host files the tests use that the node does not install (the registry the tests pull from).
HOST_FILES = ("/usr/bin/docker-registry",)
MARK = "SHIMHUB-NODE"
#: The node's python3 (Debian bookworm's), for the wheels its offline ./install takes.
NODE_PYTHON = "3.11"
#: Platform tags of the wheels that run on the node (glibc 2.36).
NODE_PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_28_x86_64", "manylinux1_x86_64")

#: The guest's side: mount the host, bind what the run needs, run pytest, report, power off.
GUEST_RUN = r"""#!/bin/sh
exec > /dev/virtio-ports/shimhub.out 2>&1
params=$(tr ' ' '\n' < /proc/cmdline | sed -n 's/^shimhub.node=//p' | base64 -d)
modprobe virtiofs
mkdir -p /host
mount -t virtiofs -o ro host /host
for path in $(echo "$params" | python3 -c 'import json,sys; print(" ".join(json.load(sys.stdin)["binds"]))'); do
    if [ -d "/host$path" ]; then mkdir -p "$path"; else mkdir -p "$(dirname "$path")"; touch "$path"; fi
    mount --bind "/host$path" "$path"
done
for module in overlay loop dm_thin_pool br_netfilter veth bridge; do modprobe "$module" 2>/dev/null; done
cd "$(echo "$params" | python3 -c 'import json,sys; print(json.load(sys.stdin)["cwd"])')"
echo "@MARK@-START cgroup=$(stat -fc %T /sys/fs/cgroup) kernel=$(uname -r)"
echo "$params" | python3 -c 'import json,sys; print("\0".join(json.load(sys.stdin)["argv"]), end="")' > /run/argv
xargs -0 env PYTHONDONTWRITEBYTECODE=1 CI="${CI:-}" SHIMHUB_NODE=1 < /run/argv
echo "@MARK@-EXIT $?"
systemctl poweroff --no-block
"""
GUEST_UNIT = """[Unit]
Description=shimhub node tests
After=multi-user.target
[Service]
Type=oneshot
ExecStart=/usr/local/sbin/shimhub-node-run
[Install]
WantedBy=multi-user.target
"""


def recipe() -> str:
    """What the image is made of; its hash names the cached image."""
    return json.dumps({"packages": PACKAGES, "run": GUEST_RUN, "unit": GUEST_UNIT, "mark": MARK}, sort_keys=True)


def image() -> Path:
    """The cached image directory (root.ext4, vmlinuz, initrd.img), built first if the recipe changed."""
    directory = CACHE / hashlib.sha256(recipe().encode()).hexdigest()[:16]
    if (directory / "root.ext4").exists():
        return directory
    CACHE.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=CACHE, prefix="build-"))
    try:
        root = staging / "root"
        print(f"building the node image ({len(PACKAGES)} Debian packages)", flush=True)
        subprocess.run(
            ["mmdebstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", "bookworm", str(root)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        script = root / "usr/local/sbin/shimhub-node-run"
        script.write_text(GUEST_RUN.replace("@MARK@", MARK))
        script.chmod(0o755)
        (root / "etc/systemd/system/shimhub-node.service").write_text(GUEST_UNIT)
        wants = root / "etc/systemd/system/multi-user.target.wants"
        wants.mkdir(parents=True, exist_ok=True)
        (wants / "shimhub-node.service").symlink_to("/etc/systemd/system/shimhub-node.service")
        (root / "etc/hostname").write_text("shimhub-node\n")
        (root / "etc/hosts").write_text("127.0.0.1\tlocalhost shimhub-node\n::1\tlocalhost\n")
        for kind in ("vmlinuz", "initrd.img"):
            (found,) = (root / "boot").glob(f"{kind}-*")
            shutil.copy2(found, staging / kind)
        subprocess.run(["mkfs.ext4", "-q", "-d", str(root), "-F", str(staging / "root.ext4"), "6G"], check=True)
        shutil.rmtree(root)
        staging.rename(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def requirements() -> list[str]:
    """What pip installs besides shimhub's own distributions: their dependencies and the build backend."""
    found = {"setuptools>=68", "wheel"}
    for setup in [ROOT / "setup.cfg", *sorted(ROOT.glob("plugins/*/setup.cfg"))]:
        parser = configparser.ConfigParser()
        parser.read(setup)
        lines = parser.get("options", "install_requires", fallback="").splitlines()
        found |= {line.strip() for line in lines if line.strip() and not line.strip().startswith(("#", "shimhub"))}
    return sorted(found)


def wheels() -> Path:
    """A directory of the wheels ./install needs on the node (which has no network), cached by requirements."""
    wanted = requirements()
    directory = CACHE / f"wheels-{hashlib.sha256(json.dumps([NODE_PYTHON, wanted]).encode()).hexdigest()[:16]}"
    if directory.is_dir():
        return directory
    staging = Path(tempfile.mkdtemp(dir=CACHE, prefix="wheels-build-"))
    try:
        platforms = [part for platform in NODE_PLATFORMS for part in ("--platform", platform)]
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--implementation", "cp",
             "--python-version", NODE_PYTHON, *platforms, "--dest", str(staging), *wanted],
            check=True,
        )  # fmt: skip
        staging.rename(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def binds() -> list[str]:
    """Host paths the guest binds at the same place: the checkout, this Python, host-only tools, the wheels."""
    paths = {str(ROOT), sys.base_prefix, sys.prefix, sysconfig.get_paths()["purelib"], str(wheels())}
    paths |= {path for path in HOST_FILES if os.path.exists(path)}
    return sorted(paths)


def _qemu_argv(
    directory: Path, disk: Path, console: Path, output: Path, socket: Path, accel: str, params: str
) -> list[str]:
    options = {
        "-machine": "q35",
        "-accel": accel,
        "-cpu": "host" if accel == "kvm" else "max",
        "-smp": str(os.cpu_count() or 2),
        "-m": str(MEMORY_MIB),
        "-monitor": "none",
        "-serial": f"file:{console}",
        "-kernel": str(directory / "vmlinuz"),
        "-initrd": str(directory / "initrd.img"),
        "-append": f"{KERNEL_ARGS} shimhub.node={params}",
        "-drive": f"file={disk},if=virtio,format=raw",
        "-object": f"memory-backend-memfd,id=mem,size={MEMORY_MIB}M,share=on",
        "-numa": "node,memdev=mem",
        "-chardev": f"socket,id=fs,path={socket}",
        "-device": "vhost-user-fs-pci,chardev=fs,tag=host",
    }
    # the run's output: a virtio-serial port written to a file (the serial console has the kernel's and getty's)
    output_port = [
        "-chardev", f"file,id=out,path={output}",
        "-device", "virtio-serial-pci",
        "-device", "virtserialport,chardev=out,name=shimhub.out",
    ]  # fmt: skip
    return [
        "qemu-system-x86_64", "-nographic", "-no-reboot", *(part for pair in options.items() for part in pair),
        *output_port,
    ]  # fmt: skip


#: Boots a run may take: a node whose run service failed before it started is booted again, once.
BOOTS = 2
#: What the console shows when the run service failed before starting (seen once in several boots).
SERVICE_FAILED = ("Failed to start", "shimhub node tests")


def run(command: list[str]) -> int:
    """Boot the node, run `command` there from the checkout, print its output; its exit code."""
    for boot in range(1, BOOTS + 1):
        code = _boot(command)
        if code is not None:
            return code
        print(f"the node's run service failed before it started (boot {boot} of {BOOTS})", flush=True)
    return 2


def _boot(command: list[str]) -> int | None:
    """One boot running `command`: its exit code, or None when the run service failed to start."""
    directory = image()
    with tempfile.TemporaryDirectory(prefix="shimhub-node-") as scratch:
        work = Path(scratch)
        disk, console, output, socket = work / "root.ext4", work / "console.log", work / "output.log", work / "fs.sock"
        subprocess.run(["cp", "--sparse=always", str(directory / "root.ext4"), str(disk)], check=True)
        params = {
            "binds": binds(),
            "cwd": str(ROOT),
            "argv": command,
        }
        encoded = base64.b64encode(json.dumps(params).encode()).decode()
        accel, why = probe_acceleration("qemu-system-x86_64", "q35", work)
        processes: list[subprocess.Popen[bytes]] = []
        try:
            processes.append(
                subprocess.Popen(
                    [
                        VIRTIOFSD,
                        f"--socket-path={socket}",
                        "-o",
                        "source=/",
                        "-o",
                        "sandbox=chroot",
                        "-o",
                        "cache=auto",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            deadline = time.monotonic() + 10
            while not socket.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            print(f"booting the node ({accel}{': ' + why if why else ''})", flush=True)
            argv = _qemu_argv(directory, disk, console, output, socket, accel, encoded)
            processes.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            return _follow(output, console, processes[-1], time.monotonic() + RUN_TIMEOUT)
        finally:
            for process in reversed(processes):
                if process.poll() is None:
                    process.kill()
                process.wait()


def _follow(output: Path, console: Path, qemu: subprocess.Popen[bytes], deadline: float) -> int | None:
    """Print the guest's pytest output as it comes; its exit code (2 when the run never ended, None when its
    service failed before starting)."""
    offset, started, code = 0, False, None
    while True:
        finished = qemu.poll() is not None or time.monotonic() > deadline
        shown = console.read_text(errors="replace").splitlines() if console.exists() and not started else []
        if any(all(words in line for words in SERVICE_FAILED) for line in shown):
            return None
        text = output.read_bytes()[offset:] if output.exists() else b""
        complete = text[: text.rfind(b"\n") + 1] if not finished else text
        offset += len(complete)
        for line in complete.decode(errors="replace").splitlines():
            if line.startswith(f"{MARK}-START"):
                started = True
                print(line, flush=True)
            elif line.startswith(f"{MARK}-EXIT"):
                code = int(line.split()[-1])
            elif started and code is None:
                print(line, flush=True)
        if finished:
            break
        time.sleep(0.5)
    if code is None:
        print(f"the node did not finish its run{' (timed out)' if time.monotonic() > deadline else ''}", flush=True)
        print(console.read_text(errors="replace")[-3000:] if console.exists() else "", flush=True)
        return 2
    return code


def main(argv: list[str]) -> int:
    if argv[:1] == ["--"]:
        command = argv[1:]
        return run([sys.executable, *command[1:]] if command[:1] == ["python3"] else command)  # this Python
    offline_pip = ["env", "PIP_NO_INDEX=1", f"PIP_FIND_LINKS={wheels()}"]  # for ./install on the node
    pytest_args = argv or ["-q", "-rA", "-m", "node"]
    return run([*offline_pip, sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *pytest_args])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

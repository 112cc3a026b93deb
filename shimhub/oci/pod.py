"""A pod's shared pieces: pinned namespaces, /etc files, /dev/shm, and an infra process when PID is shared.

IPC and UTS namespaces are created and pinned to files on a thread of
shimhub's own (no process stays behind); the network namespace comes from the
network backend. Only a pod that shares one PID namespace gets a process of
its own, catatonit as the namespace's init, because a PID namespace dies with
its init.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from shimhub import userns
from shimhub.errors import FailedPrecondition
from shimhub.mounts import run, unmount
from shimhub.namespaces import pin_new
from shimhub.oci.spec import PodContext
from shimhub_proto.cri.v1 import api_pb2 as cri

SHM_SIZE = "64m"
INFRA_WAIT = 5.0


def _mode(options: cri.NamespaceOption, kind: str) -> int:
    return getattr(options, kind)


def resolv_conf(dns: cri.DNSConfig) -> str:
    """/etc/resolv.conf for the pod's DNSConfig (the node's file when the config is empty)."""
    if not (dns.servers or dns.searches or dns.options):
        try:
            return Path("/etc/resolv.conf").read_text()
        except OSError:
            return ""
    lines = [f"nameserver {server}" for server in dns.servers]
    if dns.searches:
        lines.append("search " + " ".join(dns.searches))
    if dns.options:
        lines.append("options " + " ".join(dns.options))
    return "\n".join(lines) + "\n"


def hosts_file(hostname: str, ips: list[str]) -> str:
    """/etc/hosts with localhost and the pod's own name (on 127.0.1.1 when the pod has no IP)."""
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    lines += [f"{ip}\t{hostname}" for ip in (ips or ["127.0.1.1"])] if hostname else []
    return "\n".join(lines) + "\n"


def create(
    directory: Path,
    config: cri.PodSandboxConfig,
    netns: str,
    ips: list[str],
    pause: str,
    *,
    infra: bool = True,
    user_namespace: str = "",
) -> dict[str, Any]:
    """Set the pod up in `directory`; return what later containers and teardown need (JSON-serialisable).

    Without `infra`, a pod sharing one PID namespace gets no infra process here:
    the caller runs one and sets ``namespaces["pid"]`` itself. `user_namespace` is the
    sandbox's (`SandboxRecord.user_namespace`): the directory where the core pinned the
    pod's user namespace and the IPC and UTS namespaces it owns; the pod uses those.
    """
    options = config.linux.security_context.namespace_options
    directory.mkdir(parents=True, exist_ok=True, mode=0o711)
    hostname = config.hostname if options.network != cri.NODE else os.uname().nodename
    (directory / "resolv.conf").write_text(resolv_conf(config.dns_config))
    (directory / "hosts").write_text(hosts_file(hostname, ips))
    (directory / "hostname").write_text(hostname + "\n")
    data: dict[str, Any] = {"dir": str(directory), "hostname": hostname, "namespaces": {}}
    namespaces: dict[str, str] = data["namespaces"]
    namespaces["network"] = netns if options.network != cri.NODE else ""
    # A host-network pod also keeps the node's UTS namespace (its hostname), as the kubelet expects.
    pins = {
        kind: directory / kind
        for kind, shared in (("ipc", options.ipc), ("uts", options.network))
        if shared != cri.NODE
    }
    if user_namespace:
        data["user_namespace"] = user_namespace
        pins = {kind: Path(user_namespace, kind) for kind in pins}  # pinned by the core, hostname set
    for kind in ("ipc", "uts"):
        namespaces[kind] = str(pins[kind]) if kind in pins else ""
    if pins and not user_namespace:
        pin_new(pins, hostname)
    if options.ipc != cri.NODE:
        shm = directory / "shm"
        shm.mkdir(exist_ok=True)
        run("mount", "-t", "tmpfs", "-o", f"nosuid,nodev,noexec,mode=1777,size={SHM_SIZE}", "shm", str(shm))
        data["shm"] = str(shm)
    if options.pid == cri.NODE:
        namespaces["pid"] = ""
    elif options.pid == cri.POD and infra:
        data["infra_pid"] = _start_infra(directory, pause, user_namespace)
        namespaces["pid"] = f"/proc/{data['infra_pid']}/ns/pid"
    return data


def _start_infra(directory: Path, pause: str, user_namespace: str) -> int:
    if shutil.which(pause) is None:
        raise FailedPrecondition(f"a pod sharing its PID namespace needs {pause} (Debian package catatonit)")
    # In a pod's own user namespace, the PID namespace must be that namespace's, or its containers cannot mount /proc
    enter = ["nsenter", f"--user={userns.user_file(user_namespace)}", "--"] if user_namespace else []
    launcher = subprocess.Popen(
        [*enter, "unshare", "--pid", "--fork", "--kill-child", pause, "-P"],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + INFRA_WAIT
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children")
    while time.monotonic() < deadline:
        found = children.read_text().split() if children.exists() else []
        if found:
            (directory / "infra.pid").write_text(found[0])
            return int(found[0])
        time.sleep(0.01)
    launcher.kill()
    raise FailedPrecondition("the pod's infra process did not start")


def context(data: dict[str, Any], config: cri.PodSandboxConfig) -> PodContext:
    """What containers of the pod take from it."""
    directory = Path(data["dir"])
    mappings = userns.requested(config.linux.security_context.namespace_options, "pod sandbox")
    return PodContext(
        namespaces=dict(data["namespaces"]),
        hostname=data["hostname"],
        resolv_conf=str(directory / "resolv.conf"),
        hosts=str(directory / "hosts"),
        hostname_file=str(directory / "hostname"),
        shm=data.get("shm", ""),
        cgroup_parent=config.linux.cgroup_parent,
        sysctls=dict(config.linux.sysctls),
        user_namespace=userns.user_file(data["user_namespace"]) if data.get("user_namespace") else "",
        id_mappings=mappings.oci() if mappings is not None else {},
    )


def stop(data: dict[str, Any]) -> None:
    """Stop the infra process and release the pod's namespaces and /dev/shm. Idempotent.

    The pod's directory alone is enough: after a crash, `data` may hold nothing but "dir".
    """
    if not data.get("dir"):
        return
    directory = Path(data["dir"])
    pid = data.pop("infra_pid", None)
    recorded = directory / "infra.pid"
    if not pid and recorded.exists():
        pid = recorded.read_text().strip()
    if pid:
        _kill_infra(int(pid))
    for name in ("ipc", "uts", "shm"):
        unmount(str(directory / name))


def _kill_infra(pid: int) -> None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            if b"catatonit" not in cmdline.read():
                return  # the pid was reused: not ours any more
        os.kill(pid, signal.SIGKILL)
    except (OSError, ProcessLookupError):
        return


def remove(data: dict[str, Any]) -> None:
    """Remove everything the pod left on the node. Idempotent."""
    stop(data)
    if data.get("dir"):
        shutil.rmtree(data["dir"], ignore_errors=True)

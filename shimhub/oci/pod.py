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
from shimhub.hooktypes import Pod, SpecOptions
from shimhub.mounts import run, unmount
from shimhub.namespaces import pin_new
from shimhub.oci.spec import PodContext
from shimhub_proto.cri.v1 import api_pb2 as cri

SHM_SIZE = "64m"
INFRA_WAIT = 5.0


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
    options: SpecOptions,
    *,
    user_namespace: str = "",
) -> Pod:
    """Set the pod up in `directory`: its files, and unless its runtime holds them (`options.guest`) its
    namespaces, /dev/shm and the init of a shared PID namespace.

    `user_namespace` is the sandbox's (`SandboxRecord.user_namespace`): the directory where the core
    pinned the pod's user namespace and the IPC and UTS namespaces it owns; the pod uses those.
    """
    namespace_options = config.linux.security_context.namespace_options
    directory.mkdir(parents=True, exist_ok=True, mode=0o711)
    hostname = config.hostname if namespace_options.network != cri.NODE else os.uname().nodename
    (directory / "resolv.conf").write_text(resolv_conf(config.dns_config))
    (directory / "hosts").write_text(hosts_file(hostname, ips))
    (directory / "hostname").write_text(hostname + "\n")
    pod = Pod(dir=str(directory), hostname=hostname)
    if options.guest:  # the VM's own namespaces are the pod's
        pod.namespaces = {"network": "", "ipc": "", "uts": ""}
        return pod
    pod.namespaces["network"] = netns if namespace_options.network != cri.NODE else ""
    # A host-network pod also keeps the node's UTS namespace (its hostname), as the kubelet expects.
    pins = {
        kind: directory / kind
        for kind, shared in (("ipc", namespace_options.ipc), ("uts", namespace_options.network))
        if shared != cri.NODE
    }
    if user_namespace:
        pins = {kind: Path(user_namespace, kind) for kind in pins}  # pinned by the core, hostname set
    for kind in ("ipc", "uts"):
        pod.namespaces[kind] = str(pins[kind]) if kind in pins else ""
    if pins and not user_namespace:
        pin_new(pins, hostname)
    if namespace_options.ipc != cri.NODE:
        shm = directory / "shm"
        shm.mkdir(exist_ok=True)
        run("mount", "-t", "tmpfs", "-o", f"nosuid,nodev,noexec,mode=1777,size={SHM_SIZE}", "shm", str(shm))
        pod.shm = str(shm)
    if namespace_options.pid == cri.NODE:
        pod.namespaces["pid"] = ""
    elif namespace_options.pid == cri.POD:
        pod.infra_pid = _start_infra(directory, options.pod_init, user_namespace)
        pod.namespaces["pid"] = f"/proc/{pod.infra_pid}/ns/pid"
    return pod


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


def adopted(data: dict[str, Any]) -> Pod | None:
    """The `Pod` of what a runtime of API 1.x kept in ``runtime_data["pod"]`` (a pod set up before the core
    owned pods, found after an upgrade), so that the core stops and removes it; None if it is no such."""
    if not isinstance(data, dict) or not data.get("dir") or not isinstance(data.get("namespaces"), dict):
        return None
    return Pod(
        dir=str(data["dir"]),
        hostname=str(data.get("hostname", "")),
        namespaces={str(k): str(v) for k, v in data["namespaces"].items()},
        shm=str(data.get("shm", "")),
        infra_pid=int(data.get("infra_pid", 0) or 0),
    )


def context(pod: Pod, config: cri.PodSandboxConfig, user_namespace: str) -> PodContext:
    """What containers of the pod take from it; `user_namespace` as for `create`."""
    mappings = userns.requested(config.linux.security_context.namespace_options, "pod sandbox")
    return PodContext(
        namespaces=dict(pod.namespaces),
        hostname=pod.hostname,
        resolv_conf=pod.file("resolv.conf"),
        hosts=pod.file("hosts"),
        hostname_file=pod.file("hostname"),
        shm=pod.shm,
        cgroup_parent=config.linux.cgroup_parent,
        sysctls=dict(config.linux.sysctls),
        user_namespace=userns.user_file(user_namespace) if user_namespace else "",
        id_mappings=mappings.oci() if mappings is not None else {},
    )


def stop(directory: Path, pod: Pod | None) -> None:
    """Stop the infra process and release the pod's namespaces and /dev/shm. Idempotent.

    The pod's directory alone is enough: after a crash, `pod` may be None.
    """
    pid = pod.infra_pid if pod is not None else 0
    recorded = directory / "infra.pid"
    if not pid and recorded.exists():
        pid = int(recorded.read_text().strip() or 0)
    if pid:
        _kill_infra(pid)
    if pod is not None:
        pod.infra_pid = 0
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


def remove(directory: Path, pod: Pod | None) -> None:
    """Remove everything the pod left on the node. Idempotent."""
    stop(directory, pod)
    shutil.rmtree(directory, ignore_errors=True)

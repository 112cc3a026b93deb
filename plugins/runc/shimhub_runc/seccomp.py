"""Seccomp profiles for the OCI spec: RuntimeDefault, Unconfined and Localhost."""

from __future__ import annotations

import json
import os
from typing import Any

from shimhub.errors import InvalidArgument
from shimhub_proto.cri.v1 import api_pb2 as cri

#: System calls the RuntimeDefault profile refuses: ones that reach into the kernel's global
#: state (modules, clocks, keyrings, mounts, namespaces, swap, reboot), trace or read other
#: processes' memory, or have a history of container escapes.
DENIED = [
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "get_kernel_syms",
    "init_module",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mount",
    "mount_setattr",
    "move_mount",
    "nfsservctl",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pivot_root",
    "process_vm_readv",
    "process_vm_writev",
    "ptrace",
    "query_module",
    "quotactl",
    "reboot",
    "request_key",
    "setns",
    "settimeofday",
    "stime",
    "swapoff",
    "swapon",
    "sysfs",
    "_sysctl",
    "umount",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "ustat",
    "vm86",
    "vm86old",
]
ARCHITECTURES = ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32", "SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]


def runtime_default() -> dict[str, Any]:
    """shimhub's default profile: everything allowed but DENIED, which fails with EPERM."""
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ARCHITECTURES,
        "syscalls": [{"names": DENIED, "action": "SCMP_ACT_ERRNO", "errnoRet": 1}],
    }


def profile(security: cri.SecurityProfile | None, deprecated_path: str, privileged: bool) -> dict[str, Any] | None:
    """The OCI seccomp section for a container, or None when unconfined."""
    if privileged:
        return None
    if security is not None:
        kind, ref = security.profile_type, security.localhost_ref
    elif deprecated_path:
        kind = {
            "unconfined": cri.SecurityProfile.Unconfined,
            "runtime/default": cri.SecurityProfile.RuntimeDefault,
            "docker/default": cri.SecurityProfile.RuntimeDefault,
        }.get(deprecated_path, cri.SecurityProfile.Localhost)
        ref = deprecated_path.removeprefix("localhost/")
    else:
        return None  # no profile asked for: unconfined, as the CRI specifies
    if kind == cri.SecurityProfile.Unconfined:
        return None
    if kind == cri.SecurityProfile.RuntimeDefault:
        return runtime_default()
    if not os.path.isabs(ref):
        raise InvalidArgument(f"seccomp localhost profile {ref!r} must be an absolute path on the node")
    try:
        with open(ref, encoding="utf-8") as file:
            loaded = json.load(file)
    except OSError as exc:
        raise InvalidArgument(f"seccomp localhost profile {ref}: {exc.strerror}") from None
    except ValueError as exc:
        raise InvalidArgument(f"seccomp localhost profile {ref} is not JSON: {exc}") from None
    if not isinstance(loaded, dict) or "defaultAction" not in loaded:
        raise InvalidArgument(f"seccomp localhost profile {ref} has no defaultAction")
    return loaded

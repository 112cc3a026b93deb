"""Seccomp profiles for the OCI spec: RuntimeDefault, Unconfined and Localhost."""

from __future__ import annotations

import json
from typing import Any

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


def profile(security: cri.SecurityProfile, privileged: bool) -> dict[str, Any] | None:
    """The OCI seccomp section for a container, or None when unconfined.

    shimhub has settled the field: a Localhost reference names its own verified copy of the profile.
    """
    if privileged or security.profile_type == cri.SecurityProfile.Unconfined:
        return None
    if security.profile_type == cri.SecurityProfile.RuntimeDefault:
        return runtime_default()
    with open(security.localhost_ref, encoding="utf-8") as file:
        return json.load(file)

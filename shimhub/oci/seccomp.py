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
IO_URING = ["io_uring_enter", "io_uring_register", "io_uring_setup"]
#: clone's flags that make namespaces: mount, cgroup, UTS, IPC, user, PID, network.
NAMESPACE_FLAGS = [0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000]
EPERM, ENOSYS = 1, 38
ARCHITECTURES = ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32", "SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]


def runtime_default(capabilities: list[str]) -> dict[str, Any]:
    """shimhub's default profile: everything allowed but DENIED and io_uring, which fail with EPERM; clone3
    fails with ENOSYS (so that the C library falls back to clone, whose flags a filter can see); clone may
    make no namespace unless the container holds CAP_SYS_ADMIN."""
    rules: list[dict[str, Any]] = [
        {"names": [*DENIED, *IO_URING], "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM},
        {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS},
    ]
    if "CAP_SYS_ADMIN" not in capabilities:
        # One rule a flag: the conditions of one rule must all hold, and any one flag is enough to refuse.
        rules += [
            {
                "names": ["clone"],
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": EPERM,
                "args": [{"index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}],
            }
            for flag in NAMESPACE_FLAGS
        ]
    return {"defaultAction": "SCMP_ACT_ALLOW", "architectures": ARCHITECTURES, "syscalls": rules}


def profile(security: cri.SecurityProfile, privileged: bool, capabilities: list[str]) -> dict[str, Any] | None:
    """The OCI seccomp section for a container holding `capabilities`, or None when unconfined.

    shimhub has settled the field: a Localhost reference names its own verified copy of the profile.
    """
    if privileged or security.profile_type == cri.SecurityProfile.Unconfined:
        return None
    if security.profile_type == cri.SecurityProfile.RuntimeDefault:
        return runtime_default(capabilities)
    with open(security.localhost_ref, encoding="utf-8") as file:
        return json.load(file)

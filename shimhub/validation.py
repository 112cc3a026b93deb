"""Checks of CRI requests that the core makes before anything is created."""

from __future__ import annotations

from shimhub import mountinfo
from shimhub.errors import InvalidArgument
from shimhub_proto.cri.v1 import api_pb2 as cri

#: The longest hostname the kernel takes, in bytes.
HOSTNAME_MAX = 64


def check_hostname(hostname: str) -> None:
    """Refuse a pod hostname the kernel cannot take, or one that would break /etc/hosts."""
    size = len(hostname.encode())
    if size > HOSTNAME_MAX:
        raise InvalidArgument(
            f"hostname {hostname[:HOSTNAME_MAX]!r}... is {size} bytes long; the kernel takes at most {HOSTNAME_MAX}"
        )
    if any(c.isspace() or not c.isprintable() for c in hostname):
        raise InvalidArgument(f"hostname {hostname!r} has white space or control characters")


def check_identity(security: cri.LinuxContainerSecurityContext | cri.LinuxSandboxSecurityContext, whose: str) -> None:
    """Refuse a group without a user: the group would apply to the image's user, which the client did not see."""
    username = getattr(security, "run_as_username", "")
    if security.HasField("run_as_group") and not (security.HasField("run_as_user") or username):
        raise InvalidArgument(f"{whose} security context: run_as_group is set without run_as_user or run_as_username")


def check_mounts(config: cri.ContainerConfig, recursive_read_only: bool) -> None:
    """Refuse mount combinations the CRI forbids, and propagation the host cannot give or a pod may not have.

    `recursive_read_only`: whether the handler can make recursive read-only mounts (it says so in Status).
    """
    privileged = config.linux.security_context.privileged
    for mount in config.mounts:
        where = f"mount at {mount.container_path[:256]!r}"
        if mount.recursive_read_only:
            if not recursive_read_only:
                raise InvalidArgument(f"{where}: this runtime handler cannot make recursive read-only mounts")
            if not mount.readonly:
                raise InvalidArgument(f"{where}: recursive_read_only needs readonly")
            if mount.propagation != cri.PROPAGATION_PRIVATE:
                raise InvalidArgument(f"{where}: recursive_read_only needs propagation PROPAGATION_PRIVATE")
        if mount.propagation == cri.PROPAGATION_PRIVATE or mount.image.image:
            continue
        if mount.propagation == cri.PROPAGATION_BIDIRECTIONAL and not privileged:
            raise InvalidArgument(f"{where}: BIDIRECTIONAL propagation is only for privileged containers")
        holder = mountinfo.containing(mount.host_path)
        if mount.propagation == cri.PROPAGATION_BIDIRECTIONAL and not holder.shared:
            raise InvalidArgument(
                f"{where}: BIDIRECTIONAL propagation needs the host path on a shared mount; "
                f"{holder.mount_point} is not shared"
            )
        if not (holder.shared or holder.slave):
            raise InvalidArgument(
                f"{where}: HOST_TO_CONTAINER propagation needs the host path on a shared or slave mount; "
                f"{holder.mount_point} is neither"
            )


#: Sysctls in the IPC namespace a pod has (the kubelet's and the OCI runtimes' list), and prefixes of such.
IPC_SYSCTLS = frozenset(
    ("kernel.msgmax", "kernel.msgmnb", "kernel.msgmni", "kernel.sem", "kernel.shmall", "kernel.shmmax",
     "kernel.shmmni", "kernel.shm_rmid_forced")
)  # fmt: skip
IPC_SYSCTL_PREFIXES = ("fs.mqueue.",)
UTS_SYSCTLS = frozenset(("kernel.domainname", "kernel.hostname"))


def check_pod(config: cri.PodSandboxConfig) -> None:
    """Refuse DNS settings that would add lines to resolv.conf and sysctls the pod's namespaces do not hold."""
    dns = config.dns_config
    for field_name, values in (("servers", dns.servers), ("searches", dns.searches), ("options", dns.options)):
        for value in values:
            if not value or any(c.isspace() or not c.isprintable() for c in value):
                raise InvalidArgument(f"dns_config.{field_name}: {value[:256]!r} is empty or has white space")
    for key, value in config.linux.sysctls.items():
        check_sysctl(key, value, config.linux.security_context.namespace_options)


def check_cgroup_parent(parent: str, driver: str) -> None:
    """Refuse a cgroup parent in the other cgroup driver's form: a slice name for systemd, a path for cgroupfs."""
    if not parent:
        return
    where = f"linux.cgroup_parent {parent[:256]!r}"
    if driver == "systemd":
        if "/" in parent or not parent.endswith(".slice") or any(c.isspace() for c in parent):
            raise InvalidArgument(
                f"{where} is not a systemd slice name (such as kubepods-burstable-pod<uid>.slice), "
                "and shimhub's cgroup_driver is systemd: set the kubelet's cgroupDriver to systemd too"
            )
    elif parent.endswith(".slice") or ".." in parent.split("/"):
        raise InvalidArgument(
            f"{where} is a systemd slice name or climbs with '..', and shimhub's cgroup_driver is cgroupfs: "
            "set the kubelet's cgroupDriver to cgroupfs too, or shimhub's cgroup_driver to systemd"
        )


def _sysctl_namespace(key: str) -> str:
    """The namespace a sysctl belongs to ("" for one that is the whole node's)."""
    if key in IPC_SYSCTLS or key.startswith(IPC_SYSCTL_PREFIXES):
        return "ipc"
    if key.startswith("net."):
        return "network"
    return "uts" if key in UTS_SYSCTLS else ""


def check_sysctl(key: str, value: str, options: cri.NamespaceOption) -> None:
    """Refuse a sysctl that is not namespaced, or is in a namespace the pod shares with the node."""
    where = f"sysctl {key[:128]!r}"
    if not key or "/" in key or ".." in key or any(c.isspace() for c in key):
        raise InvalidArgument(f"{where} is not a sysctl name")
    if "\n" in value or "\0" in value:
        raise InvalidArgument(f"{where}: its value has a newline or NUL")
    namespace = _sysctl_namespace(key)
    if not namespace:
        raise InvalidArgument(f"{where} is not namespaced: it would change the whole node")
    shared = options.ipc == cri.NODE if namespace == "ipc" else options.network == cri.NODE
    if shared:
        raise InvalidArgument(f"{where} is in the {namespace} namespace, which this pod shares with the node")

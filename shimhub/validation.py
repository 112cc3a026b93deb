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

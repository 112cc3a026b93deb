"""Checks of CRI requests that the core makes before anything is created."""

from __future__ import annotations

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

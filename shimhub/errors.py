"""Errors that carry a gRPC status code.

The core and plugins raise these; the RPC layer turns them into the matching
gRPC status with the message as details. Any other exception reaching the RPC
layer is a bug and becomes INTERNAL (logged with its traceback, never sent).
"""

from __future__ import annotations

import errno

import grpc

#: The errnos of a full disk or quota: a write that fails with one is RESOURCE_EXHAUSTED.
NO_SPACE = frozenset((errno.ENOSPC, errno.EDQUOT))


class ShimhubError(Exception):
    """Base class: an error a client may see, with its gRPC status code."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ShimhubError):
    """The request is malformed or names something that cannot be used."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ShimhubError):
    """The named pod, container or image does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ShimhubError):
    """A pod or container of that name exists already."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(ShimhubError):
    """The object is not in a state that allows the request."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Refused(Exception):
    """Raised by an extension's `shimhub_adjust_oci_spec` to refuse the container, saying why.

    CreateContainer then fails with FAILED_PRECONDITION naming the extension and the reason.
    """


class PermissionDenied(ShimhubError):
    """The node's configuration does not allow the request."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(ShimhubError):
    """A registry refused the credentials (or asked for some and none were given)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class Unimplemented(ShimhubError):
    """The RPC, or the hook behind it, is not implemented for this object."""

    code = grpc.StatusCode.UNIMPLEMENTED


class Unavailable(ShimhubError):
    """A dependency (runtime binary, network backend) is not ready right now."""

    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(ShimhubError):
    """A limit was reached, e.g. a subscriber fell too far behind."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(ShimhubError):
    """The work did not finish within the time allowed."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class PluginFailed(ShimhubError):
    """A plugin tried and failed; the message says what the plugin reported."""

    code = grpc.StatusCode.INTERNAL


_BY_STATUS: dict[grpc.StatusCode, type[ShimhubError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        PermissionDenied,
        Unimplemented,
        Unavailable,
        ResourceExhausted,
        DeadlineExceeded,
    )
}


def from_status(code: grpc.StatusCode | int | str, message: str) -> ShimhubError:
    """The error for a status a peer (a shim, a VM agent) answered with, given as a StatusCode, its number or
    its name: the same gRPC code where shimhub has one, else INTERNAL."""
    for status in grpc.StatusCode:
        if code in (status, status.value[0], status.name):
            return _BY_STATUS.get(status, PluginFailed)(message)
    return PluginFailed(message)


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file and key."""


class PluginLoadError(Exception):
    """A plugin cannot be loaded; the message names the distribution and entry point."""

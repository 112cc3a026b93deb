"""The plugin SDK: all that a plugin may import from shimhub.

A plugin imports from here (and `shimhub_proto` for the CRI's messages, and
`shimhub.testing` in its tests); CI refuses any other import of a `shimhub`
module from under `plugins/`, so what is listed here is the whole contract.
Hook specifications and `API_VERSION` are in `shimhub.hookspecs`, re-exported.

Groups:

* the contract: `hookimpl`, `API_VERSION`, the value types of hooks, errors;
* records the hooks receive (`SandboxRecord`, `ContainerRecord`);
* the CRI's meaning, built by the core: `oci` (OCI spec, seccomp, a pod's
  shared pieces), `User`;
* node helpers: `cgroups`, `netns`, `namespaces`, `fifos`, `ttrpc`, `crilog`,
  `mountinfo`, `mounts`, `processes`, `plugin_options`, `write_atomically`,
  `unpack` (layer archives, confined to their target).
"""

from shimhub import (
    cgroups,
    crilog,
    fifos,
    mountinfo,
    mounts,
    namespaces,
    netns,
    oci,
    plugin_options,
    processes,
    ttrpc,
)
from shimhub.errors import (
    AlreadyExists,
    ConfigError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    PluginFailed,
    ResourceExhausted,
    ShimhubError,
    Unavailable,
    Unimplemented,
)
from shimhub.errors import from_status as error_from_status
from shimhub.hookspecs import API_VERSION, hookimpl
from shimhub.hooktypes import (
    STDERR,
    STDOUT,
    ContainerState,
    ContainerStatus,
    ContainerUsage,
    DeviceIo,
    ExecResult,
    FilesystemUsage,
    HandlerFeatures,
    PluginContext,
    PodNetwork,
    Readiness,
    StreamedProcess,
)
from shimhub.records import ContainerRecord, SandboxRecord
from shimhub.state import write_atomically
from shimhub.unpack import UnsafeLayer, Whiteouts, unpack
from shimhub.users import User

__all__ = [
    "API_VERSION",
    "STDERR",
    "STDOUT",
    "AlreadyExists",
    "ConfigError",
    "ContainerRecord",
    "ContainerState",
    "ContainerStatus",
    "ContainerUsage",
    "DeadlineExceeded",
    "DeviceIo",
    "ExecResult",
    "FailedPrecondition",
    "FilesystemUsage",
    "HandlerFeatures",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "PluginContext",
    "PluginFailed",
    "PodNetwork",
    "Readiness",
    "ResourceExhausted",
    "SandboxRecord",
    "ShimhubError",
    "StreamedProcess",
    "Unavailable",
    "Unimplemented",
    "UnsafeLayer",
    "User",
    "Whiteouts",
    "cgroups",
    "crilog",
    "error_from_status",
    "fifos",
    "hookimpl",
    "mountinfo",
    "mounts",
    "namespaces",
    "netns",
    "oci",
    "plugin_options",
    "processes",
    "ttrpc",
    "unpack",
    "write_atomically",
]

"""The plugin SDK: all that a plugin may import from shimhub.

A plugin imports from here (and `shimhub_proto` for the CRI's messages, and
`shimhub.testing` in its tests); CI refuses any other import of a `shimhub`
module from under `plugins/`, so what is listed here is the whole contract.
Hook specifications and `API_VERSION` are in `shimhub.hookspecs`, re-exported.

Groups:

* the contract: `hookimpl`, `API_VERSION`, the value types of hooks, errors;
* records the hooks receive (`SandboxRecord`, `ContainerRecord`);
* what the core built from the CRI for a runtime: `Pod` (``SandboxRecord.pod``),
  `SpecOptions` (what a handler asks of the core's pipeline), `User`, and
  `oci_resources`, `termination_log`, `termination_message`;
* a container's output into its CRI log and to attached clients: `OutputFanout`;
* node helpers: `cgroups`, `netns`, `namespaces`, `fifos`, `ttrpc`, `crilog`,
  `mountinfo`, `mounts`, `processes`, `plugin_options`, `write_atomically`,
  `unpack` (layer archives, confined to their target) with `Whiteouts` (`APPLY`, or a
  driver's own subclass), `remove_path`, `make_directories`.
"""

from shimhub import (
    cgroups,
    crilog,
    fifos,
    mountinfo,
    mounts,
    namespaces,
    netns,
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
    Refused,
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
    Pod,
    PodNetwork,
    Pressure,
    PressureLine,
    Readiness,
    SpecOptions,
    StreamedProcess,
)
from shimhub.oci.container import termination_log, termination_message
from shimhub.oci.spec import resources as oci_resources
from shimhub.output import EXEC_BACKLOG, Attachment, OutputFanout
from shimhub.records import ContainerRecord, SandboxRecord
from shimhub.state import write_atomically
from shimhub.unpack import APPLY, UnsafeLayer, Whiteouts, make_directories, remove_path, unpack
from shimhub.users import User

__all__ = [
    "API_VERSION",
    "APPLY",
    "EXEC_BACKLOG",
    "STDERR",
    "STDOUT",
    "AlreadyExists",
    "Attachment",
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
    "OutputFanout",
    "PermissionDenied",
    "PluginContext",
    "PluginFailed",
    "Refused",
    "Pod",
    "PodNetwork",
    "Pressure",
    "PressureLine",
    "Readiness",
    "ResourceExhausted",
    "SandboxRecord",
    "ShimhubError",
    "SpecOptions",
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
    "make_directories",
    "mountinfo",
    "mounts",
    "namespaces",
    "netns",
    "oci_resources",
    "plugin_options",
    "processes",
    "remove_path",
    "termination_log",
    "termination_message",
    "ttrpc",
    "unpack",
    "write_atomically",
]

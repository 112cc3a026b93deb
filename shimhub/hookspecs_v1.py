"""The runtime hooks of plugin API 1.x, for runtimes that still declare it (deprecated; gone in 3.0).

Such a runtime sets its pods up itself and builds each container's spec; the
core hands it the 1.x arguments and sets up no `SandboxRecord.pod` for it.
Storage drivers, network backends and extensions of 1.x need no adapter: their
hooks are the same in 2.0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from shimhub.hookspecs import RuntimeSpec, hookspec

if TYPE_CHECKING:
    from shimhub.hooktypes import PodNetwork
    from shimhub.records import ContainerRecord, SandboxRecord
    from shimhub_proto.cri.v1 import api_pb2 as cri

_V1 = (
    'plugin API 1.x is deprecated and goes in 3.0: declare shimhub_api = "2.0" and take the finished OCI '
    'spec the core hands runtime_container_create (see docs/plugins.md, "From API 1.x")'
)


class RuntimeSpecV1(RuntimeSpec):
    """The runtime hooks of API 1.x, for plugins that declare it (deprecated).

    Such a runtime sets its pod up itself in `runtime_sandbox_run` and builds
    each container's spec in `runtime_container_create`, calling the extension
    relay of its `PluginContext`; the core sets up no `SandboxRecord.pod` for it.
    """

    @hookspec(firstresult=True, warn_on_impl=DeprecationWarning(_V1))
    def runtime_sandbox_run(  # type: ignore[override]
        self, sandbox: SandboxRecord, config: cri.PodSandboxConfig, network: PodNetwork
    ) -> None:
        """Create and start the pod sandbox (its namespaces and files too); return when it is ready."""

    @hookspec(firstresult=True, warn_on_impl=DeprecationWarning(_V1))
    def runtime_container_create(  # type: ignore[override]
        self,
        sandbox: SandboxRecord,
        container: ContainerRecord,
        config: cri.ContainerConfig,
        rootfs: str,
        image: Mapping[str, Any],
    ) -> None:
        """Create a container whose root filesystem is mounted at `rootfs`; `image` is its image's config."""

    @hookspec(firstresult=True)
    def runtime_container_restore(  # type: ignore[override]  # noqa: PLR0917
        self,
        sandbox: SandboxRecord,
        container: ContainerRecord,
        config: cri.ContainerConfig,
        rootfs: str,
        image: Mapping[str, Any],
        checkpoint: str,
        checkpointed_spec: Mapping[str, Any],
    ) -> None:
        """`runtime_container_create` resuming the processes checkpointed into `checkpoint`."""

    @hookspec(
        firstresult=True,
        warn_on_impl=DeprecationWarning(
            "runtime_container_stop is deprecated since plugin API 1.4 and is not in 2.0: implement "
            "runtime_container_kill and runtime_container_wait, and shimhub owns the stop signal, the "
            "escalation to SIGKILL and the timeouts"
        ),
    )
    def runtime_container_stop(self, sandbox: SandboxRecord, container: ContainerRecord, timeout: int) -> None:
        """Stop the container: its stop signal, then SIGKILL after `timeout` seconds. Idempotent.

        Deprecated since 1.4: called only for a plugin without `runtime_container_kill` and
        `runtime_container_wait`. A runtime implements those two or this one.
        """


#: Runtime plugins of API 1.x: their specification and required hooks, and the hooks of which they implement
#: one set (the current one first) or the other (deprecated).
RUNTIME_V1 = (
    RuntimeSpecV1,
    (
        "runtime_setup",
        "runtime_sandbox_run",
        "runtime_sandbox_stop",
        "runtime_sandbox_remove",
        "runtime_container_create",
        "runtime_container_start",
        "runtime_container_remove",
        "runtime_container_state",
    ),
    (("runtime_container_kill", "runtime_container_wait"), ("runtime_container_stop",)),
)

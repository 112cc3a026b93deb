"""The plugin contract: pluggy hook specifications for every plugin kind.

Plugin kinds and their entry point groups:

* runtime plugins (``shimhub.runtime``) run pod sandboxes and containers;
  shimhub makes one instance per runtime handler that names the plugin;
* storage drivers (``shimhub.storage``) hold image layers and container root
  filesystems; one instance per driver in use;
* network backends (``shimhub.network``) give pods their network; one instance;
* extensions (``shimhub.extension``) observe and adjust what the others do;
  loaded only when named in the config's ``extensions`` list.

An entry point names a class. shimhub instantiates it with no arguments and
registers the instance with a pluggy plugin manager that knows only the hook
specifications of that kind, so a hook implementation with a wrong name or a
wrong argument is refused at startup. Every plugin class declares the API
version it was written for as ``shimhub_api = "MAJOR.MINOR"``: shimhub loads it
when the major equals ``API_VERSION``'s and the minor is not newer, and a
plugin of API 1.x through the adapter of `shimhub.hookspecs_v1` (deprecated).

In API 2.0 the core owns the pod and the OCI spec: it sets up the pod's
namespaces and files (``SandboxRecord.pod``), builds each container's spec, lets
the extensions and NRI adjust it, and hands the runtime the finished spec. A
runtime only runs it.

Hooks are called from gRPC worker threads, several at a time for different
pods; shimhub never calls two hooks at once for the same pod or container.
A hook raises a ``shimhub.errors.ShimhubError`` subclass for an error the
client should see with that gRPC code; any other exception reaches the client
as INTERNAL naming the plugin. Hooks marked "optional" may be left out: the
RPC that needs them then answers UNIMPLEMENTED.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import IO, TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import socket

    from shimhub.hooktypes import (
        ContainerState,
        ContainerUsage,
        ExecResult,
        FilesystemUsage,
        PluginContext,
        PodNetwork,
        Readiness,
        StreamedProcess,
    )
    from shimhub.records import ContainerRecord, SandboxRecord
    from shimhub_proto.cri.v1 import api_pb2 as cri

PROJECT = "shimhub"
#: The version of this contract. A new optional hook raises the minor; a
#: changed or removed hook raises the major.
API_VERSION = "2.0"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class RuntimeSpec:
    """Hooks of a runtime plugin. Each is called on the handler's own instance only."""

    @hookspec(firstresult=True)
    def runtime_setup(self, options: Mapping[str, Any], context: PluginContext) -> Readiness:
        """Validate the handler's `options` and probe the node.

        Raise ``shimhub.errors.ConfigError`` for options that are wrong (shimhub
        refuses to start); return ``Readiness(ready=False, reason=...)`` when the
        options are right but the node cannot run them (e.g. the runtime binary
        is missing): the handler is then disabled and shown so in Status.
        Required.
        """

    @hookspec(firstresult=True)
    def runtime_readiness(self) -> Readiness:
        """Whether the handler can run pods now. Optional (default: as at setup)."""

    @hookspec(firstresult=True)
    def runtime_recover(self, sandboxes: list[SandboxRecord], containers: list[ContainerRecord]) -> None:
        """Reattach to this handler's pods and containers after shimhub restarted. Optional."""

    @hookspec(firstresult=True)
    def runtime_sandbox_run(
        self, sandbox: SandboxRecord, config: cri.PodSandboxConfig, network: PodNetwork, spec: dict[str, Any]
    ) -> None:
        """Start whatever the handler runs for the pod itself; return when it is ready.

        :param sandbox: the pod; ``sandbox.pod`` is what the core set up for it (namespaces, files).
        :param config: the pod's config; ``config.annotations`` holds only those the handler allows.
        :param network: what the network backend set up (``network.netns_path`` is in ``sandbox.pod``).
        :param spec: the OCI spec of the pod's sandbox process (the handler's pod init, joining every
            namespace of the pod), for a runtime that runs one, e.g. as a shim v2 sandbox task; built
            only when the implementation takes this argument.

        The plugin may keep what it needs later in ``sandbox.runtime_data``
        (JSON-serialisable); shimhub persists it. Optional: a runtime that runs
        nothing per pod leaves it out.
        """

    @hookspec(firstresult=True)
    def runtime_sandbox_stop(self, sandbox: SandboxRecord) -> None:
        """Stop the sandbox's own processes (its containers are already stopped). Idempotent. Optional."""

    @hookspec(firstresult=True)
    def runtime_sandbox_remove(self, sandbox: SandboxRecord) -> None:
        """Remove everything the runtime holds for the sandbox on the node. Idempotent. Optional."""

    @hookspec(firstresult=True)
    def runtime_sandbox_update(self, sandbox: SandboxRecord, resources: cri.LinuxContainerResources) -> None:
        """Apply new pod-level resources. Optional."""

    @hookspec(firstresult=True)
    def runtime_container_create(
        self, sandbox: SandboxRecord, container: ContainerRecord, config: cri.ContainerConfig, spec: dict[str, Any]
    ) -> None:
        """Create (not start) a container from its finished OCI spec. Required.

        :param sandbox: the container's pod.
        :param container: the container; ``container.rootfs`` is its mounted root filesystem ("" for a
            container without an image: the plugin decides whether it can run one), ``container.log_path``
            its CRI log.
        :param config: the container's CRI config, for what is not in a spec (tty, stdin, stdin_once).
        :param spec: the OCI spec as the core finished it: built from the CRI config and the image,
            with the devices, then adjusted by the extensions and NRI. Its ``root.path`` is
            ``container.rootfs``; ``linux.cgroupsPath`` is where the container's cgroup goes.
        """

    @hookspec(firstresult=True)
    def runtime_container_start(self, sandbox: SandboxRecord, container: ContainerRecord) -> None:
        """Start a created container. Required."""

    @hookspec(firstresult=True)
    def runtime_container_kill(self, sandbox: SandboxRecord, container: ContainerRecord, signal: str) -> None:
        """Send `signal` (a name such as "SIGTERM", or a number as a string) to the container's init process;
        SIGKILL goes to every process of the container. A container that has already exited or is gone is
        no error. Since 1.4; with `runtime_container_wait` it replaces `runtime_container_stop`: shimhub
        then chooses the stop signal, escalates to SIGKILL and owns the timeouts.
        """

    @hookspec(firstresult=True)
    def runtime_container_wait(self, sandbox: SandboxRecord, container: ContainerRecord, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the container to exit: True once it has (or is gone), False if it
        still runs. Since 1.4 (see `runtime_container_kill`).
        """

    @hookspec(firstresult=True)
    def runtime_container_remove(self, sandbox: SandboxRecord, container: ContainerRecord) -> None:
        """Remove a stopped container's runtime state. Idempotent. Required."""

    @hookspec(firstresult=True)
    def runtime_container_state(self, sandbox: SandboxRecord, container: ContainerRecord) -> ContainerState:
        """The container's live state. Called often: keep it cheap. Required."""

    @hookspec(firstresult=True)
    def runtime_container_states(self, containers: list[tuple[SandboxRecord, ContainerRecord]]) -> list[ContainerState]:
        """The live states of many created or running containers, in order. Optional (since 1.2).

        Called by the list calls, which would otherwise call
        runtime_container_state once per container: answer all at once and
        cheaply (e.g. one directory listing), leaving checks that only a rare
        failure needs to runtime_container_state, which single-container
        status calls still use.
        """

    @hookspec(firstresult=True)
    def runtime_container_update(
        self, sandbox: SandboxRecord, container: ContainerRecord, resources: cri.LinuxContainerResources
    ) -> None:
        """Apply new resource limits to a container. Optional."""

    @hookspec(firstresult=True)
    def runtime_container_reopen_log(self, sandbox: SandboxRecord, container: ContainerRecord) -> None:
        """Reopen the container's log file after the kubelet rotated it. Optional."""

    @hookspec(firstresult=True)
    def runtime_container_checkpoint(
        self, sandbox: SandboxRecord, container: ContainerRecord, directory: str, leave_running: bool, timeout: float
    ) -> Mapping[str, Any]:
        """Checkpoint a running container's processes into the empty `directory`; return its OCI spec.

        With `leave_running` the container goes on running, else it is stopped (its exit recorded as
        for any stop). Raise DeadlineExceeded past `timeout` seconds, FailedPrecondition when the node
        cannot (saying why). Optional, since 1.5: without it CheckpointContainer is FAILED_PRECONDITION.
        """

    @hookspec(firstresult=True)
    def runtime_container_restore(  # noqa: PLR0917 - hooks take their arguments by name
        self,
        sandbox: SandboxRecord,
        container: ContainerRecord,
        config: cri.ContainerConfig,
        spec: dict[str, Any],
        checkpoint: str,
        checkpointed_spec: Mapping[str, Any],
    ) -> None:
        """Create a container like `runtime_container_create`, whose start resumes the processes that
        `runtime_container_checkpoint` wrote into the directory `checkpoint` (shimhub keeps it until the
        container is removed); `checkpointed_spec` is the OCI spec the checkpointed container ran with.
        Optional, since 1.5: required to create containers from checkpoints.
        """

    @hookspec(firstresult=True)
    def runtime_container_stats(self, sandbox: SandboxRecord, container: ContainerRecord) -> ContainerUsage:
        """The container's resource usage now; fields it cannot tell stay None. Optional (since 1.0).

        An exited container's usage may be all None. Without this hook the stats
        RPCs report only the writable layer.
        """

    @hookspec(firstresult=True)
    def runtime_sandbox_stats(self, sandbox: SandboxRecord) -> ContainerUsage | None:
        """The pod's own resource usage (a pod cgroup, a VM), or None. Optional (since 1.1).

        Without it, or when it returns None, a pod's usage is the sum of its containers'.
        """

    @hookspec(firstresult=True)
    def runtime_exec_sync(
        self, sandbox: SandboxRecord, container: ContainerRecord, cmd: list[str], timeout: float | None
    ) -> ExecResult:
        """Run `cmd` in the container and wait for it, killing it after `timeout` seconds. Optional.

        Only for plugins without ``runtime_exec``: where that hook exists, shimhub runs
        ExecSync through it, reading the output with its own bounds and deadline.
        """

    @hookspec(firstresult=True)
    def runtime_exec(
        self, sandbox: SandboxRecord, container: ContainerRecord, cmd: list[str], tty: bool, stdin: bool
    ) -> StreamedProcess:
        """Start `cmd` in the running container for a streaming client; return its stdio. Optional (since 1.2).

        With `tty` the process gets a terminal (its stderr goes to the terminal);
        without `stdin` its standard input is empty. Called when the client
        connects, on the streaming server's thread. Without this hook Exec
        answers UNIMPLEMENTED.
        """

    @hookspec(firstresult=True)
    def runtime_attach(self, sandbox: SandboxRecord, container: ContainerRecord, stdin: bool) -> StreamedProcess:
        """Connect to the running container's main process: its output from now on, and its stdin if `stdin`.

        Closing the returned process's input follows the container's
        `stdin_once`. Optional (since 1.2); without it Attach answers UNIMPLEMENTED.
        """

    @hookspec(firstresult=True)
    def runtime_port_forward(self, sandbox: SandboxRecord, port: int) -> socket.socket:
        """A stream socket connected to TCP `port` inside the pod. Optional (since 1.2).

        Raise ``shimhub.errors.Unavailable`` (or another ShimhubError) when
        nothing listens there; the client sees the message. Without this hook
        PortForward answers UNIMPLEMENTED.
        """


class StorageSpec:
    """Hooks of a storage driver. Each is called on the driver's own instance only."""

    @hookspec(firstresult=True)
    def storage_setup(self, root: str, options: Mapping[str, Any], context: PluginContext) -> Readiness:
        """Validate `options`, prepare `root` and probe the kernel features the driver needs. Required."""

    @hookspec(firstresult=True)
    def storage_layer_apply(self, layer_id: str, parent_id: str, diff: IO[bytes]) -> FilesystemUsage:
        """Create layer `layer_id` on top of `parent_id` ("" for a base layer) from an uncompressed tar. Required."""

    @hookspec(firstresult=True)
    def storage_layer_remove(self, layer_id: str) -> None:
        """Remove a layer that no other layer or container uses. Idempotent. Required."""

    @hookspec(firstresult=True)
    def storage_rootfs_create(self, container_id: str, layer_id: str) -> None:
        """Create a container's writable root filesystem on top of image layer `layer_id`. Required."""

    @hookspec(firstresult=True)
    def storage_rootfs_mount(self, container_id: str) -> str:
        """Mount the container's root filesystem; return the mount point. Required."""

    @hookspec(firstresult=True)
    def storage_rootfs_mount_idmapped(self, container_id: str, user_namespace: str, root: tuple[int, int]) -> str:
        """Mount the container's root filesystem ID-mapped into a pod's user namespace; return the mount point.

        `user_namespace` is the pinned namespace file; `root` the host uid and gid of its root. A file of
        the image owned by k must appear owned by the namespace's mapping of k, and files the container
        creates must be stored with their host ids (so owned by the pod's range on the host). Optional,
        since 1.5: without it shimhub binds what `storage_rootfs_mount` returns ID-mapped itself, which
        works where that filesystem takes ID-mapped mounts (btrfs, ext4, xfs, tmpfs) and not on an
        overlay or union mount (overlayfs takes ID-mapped layers instead).
        """

    @hookspec(firstresult=True)
    def storage_rootfs_diff(self, container_id: str, out: IO[bytes]) -> None:
        """Write what the container changed in its root filesystem to `out`, as an uncompressed OCI layer
        tar (deletions as ``.wh.`` entries). Optional, since 1.5: checkpoints need it."""

    @hookspec(firstresult=True)
    def storage_rootfs_unmount(self, container_id: str) -> None:
        """Unmount the container's root filesystem. Idempotent. Required."""

    @hookspec(firstresult=True)
    def storage_rootfs_remove(self, container_id: str) -> None:
        """Remove the container's root filesystem and writable layer. Idempotent. Required."""

    @hookspec(firstresult=True)
    def storage_usage(self, container_id: str) -> FilesystemUsage:
        """Bytes and inodes of the container's writable layer. Required."""


class NetworkSpec:
    """Hooks of a network backend."""

    @hookspec(firstresult=True)
    def network_setup(self, options: Mapping[str, Any], context: PluginContext) -> Readiness:
        """Validate `options` and probe the node. Required."""

    @hookspec(firstresult=True)
    def network_readiness(self) -> Readiness:
        """Whether pods can get a network now (Status's NetworkReady). Optional (default: as at setup)."""

    @hookspec(firstresult=True)
    def network_pod_setup(self, sandbox: SandboxRecord, config: cri.PodSandboxConfig) -> PodNetwork:
        """Create the pod's network namespace and network. Required."""

    @hookspec(firstresult=True)
    def network_pod_teardown(self, sandbox: SandboxRecord, network: PodNetwork) -> None:
        """Release the pod's network and namespace. Idempotent, also after a restart. Required."""

    @hookspec(firstresult=True)
    def network_pod_check(self, sandbox: SandboxRecord, network: PodNetwork) -> None:
        """Raise if the pod's network is not as set up. Optional."""


class ExtensionSpec:
    """Hooks any extension may implement; every implementation is called."""

    @hookspec
    def shimhub_adjust_oci_spec(self, sandbox: SandboxRecord, container: ContainerRecord, spec: dict[str, Any]) -> None:
        """Change a container's OCI runtime spec in place before the runtime creates it.

        :param sandbox: the container's pod (read only).
        :param container: the container being created (read only).
        :param spec: the OCI runtime spec, a copy shared by the extensions of this call: their edits
            replace the container's spec only when every extension returned (whole or not at all).

        Raise ``shimhub.errors.Refused("why")`` to refuse the container: CreateContainer fails with
        FAILED_PRECONDITION naming the extension and the reason. Any other exception is the
        extension's fault: it is logged, every edit of this call is discarded and the spec is
        adjusted again without that extension. Called through pluggy's call loop: ``tryfirst``,
        ``trylast`` and wrappers (``wrapper=True``) apply. Refusing since plugin API 1.6.
        """

    @hookspec
    def shimhub_lifecycle_event(self, event: str, sandbox: SandboxRecord, container: ContainerRecord | None) -> None:
        """Observe a change: "sandbox_ready", "sandbox_stopped", "sandbox_removed",
        "container_created", "container_started", "container_stopped", "container_removed".

        Called after the change is recorded; must not block for long.
        """


#: Entry point group, hook specification class and required hooks of each plugin kind.
KINDS: dict[str, tuple[str, type, tuple[str, ...]]] = {
    "runtime": (
        "shimhub.runtime",
        RuntimeSpec,
        (
            "runtime_setup",
            "runtime_container_create",
            "runtime_container_start",
            "runtime_container_kill",
            "runtime_container_wait",
            "runtime_container_remove",
            "runtime_container_state",
        ),
    ),
    "storage": (
        "shimhub.storage",
        StorageSpec,
        (
            "storage_setup",
            "storage_layer_apply",
            "storage_layer_remove",
            "storage_rootfs_create",
            "storage_rootfs_mount",
            "storage_rootfs_unmount",
            "storage_rootfs_remove",
            "storage_usage",
        ),
    ),
    "network": ("shimhub.network", NetworkSpec, ("network_setup", "network_pod_setup", "network_pod_teardown")),
    "extension": ("shimhub.extension", ExtensionSpec, ()),
}

"""Pod sandbox lifecycle: run, stop, remove, with rollback on failure.

Order of work for RunPodSandbox: the record is persisted first (so a crash
can be cleaned up after a restart), then the network backend sets up the
pod's network (not for host-network pods), then the runtime plugin starts the
sandbox in it. Anything that fails undoes what was done before it.
"""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

from shimhub import logpaths, netns, oci, resources, userns
from shimhub.errors import FailedPrecondition, InvalidArgument
from shimhub.faults import crash_point
from shimhub.hooktypes import PodNetwork
from shimhub.names import new_id
from shimhub.records import (
    PENDING_CREATE,
    PENDING_REMOVE,
    SANDBOX_NOTREADY,
    SANDBOX_READY,
    SandboxRecord,
    proto_to_dict,
)
from shimhub.streaming import portforward
from shimhub.streaming.requests import PortForwardRequest
from shimhub.validation import check_cgroup_parent, check_hostname, check_identity, check_pod
from shimhub_proto.cri.v1 import api_pb2 as cri

if TYPE_CHECKING:
    from shimhub.containers import ContainerManager
    from shimhub.handlers import Handler
    from shimhub.node import Node

log = logging.getLogger(__name__)


def sandbox_name(metadata: cri.PodSandboxMetadata) -> str:
    """The unique CRI name of a sandbox."""
    return f"{metadata.name}_{metadata.namespace}_{metadata.uid}_{metadata.attempt}"


class PodManager:
    """Runs, stops and removes pod sandboxes."""

    def __init__(self, node: Node, containers: ContainerManager) -> None:
        self.node = node
        self.containers = containers

    def run(self, config: cri.PodSandboxConfig, runtime_handler: str, digest: str, wait: float | None) -> str:
        """Create and start a sandbox; return its id (the in-flight or existing one for a retry)."""
        metadata = config.metadata
        for field_name in ("name", "namespace", "uid"):
            if not getattr(metadata, field_name):
                raise InvalidArgument(f"pod sandbox metadata.{field_name} is empty")
        check_hostname(config.hostname)
        check_pod(config)
        if config.log_directory:
            logpaths.check_directory(config.log_directory)
        check_cgroup_parent(config.linux.cgroup_parent, self.node.config.cgroup_driver)
        check_identity(config.linux.security_context, "pod sandbox")
        handler = self.node.handlers.select(runtime_handler, config.annotations)
        handler.require()
        ids = self.node.config.user_namespaces
        mappings = userns.check_pod(config, (ids.first_host_id, ids.host_id_count))
        if mappings is not None:
            missing = userns.unsupported(handler.backend.setup_readiness.features)
            if missing:
                raise FailedPrecondition(
                    f"runtime handler {handler.name!r} cannot run pods in user namespaces (hostUsers: false): {missing}"
                )
            userns.check_reachable(ids.mount_dir)

        def create() -> str:
            return self._create(config, handler.name, digest, mappings)

        def reusable(sandbox_id: str) -> bool:
            found = self.node.store.sandbox(sandbox_id, missing_ok=True)
            return found is not None and found.state == SANDBOX_READY

        return self.node.pod_names.create(sandbox_name(metadata), digest, create, reusable, wait)

    def _create(
        self, config: cri.PodSandboxConfig, handler_name: str, digest: str, mappings: userns.Mappings | None
    ) -> str:
        """Create the sandbox; in a user namespace of its own with `mappings` (None: the node's)."""
        node = self.node
        handler = node.handlers.get(handler_name)
        plugin = handler.require()
        record = SandboxRecord(
            id=new_id(),
            name=sandbox_name(config.metadata),
            handler=handler_name,
            created_at=time.time_ns(),
            config=proto_to_dict(config),
            request_digest=digest,
            network_released=True,
            pending=PENDING_CREATE,
        )
        plugin_config = cri.PodSandboxConfig()
        plugin_config.CopyFrom(config)
        plugin_config.annotations.clear()
        plugin_config.annotations.update(handler.allowed_annotations(config.annotations))
        plugin_config.hostname = config.hostname or socket.gethostname()
        resources.fit(plugin_config.linux.resources)
        with node.locks.hold(record.id):
            node.store.save_sandbox(record)
            crash_point("run_pod:saved")
            try:
                if mappings is not None:
                    record.user_namespace = str(Path(node.config.run_dir, "userns", record.id))
                    node.store.save_sandbox(record)
                    userns.create(
                        Path(record.user_namespace), mappings, netns.pod_path(record.id), plugin_config.hostname
                    )
                if not record.host_network:
                    backend = node.network.require()
                    record.network_released = False  # from here on, a rollback tears the network down
                    node.store.save_sandbox(record)
                    record.network = backend.call("network_pod_setup", sandbox=record, config=plugin_config)
                    crash_point("run_pod:network")
                    node.store.save_sandbox(record)
                if not plugin.builds_own_spec:
                    self._set_up_pod(record, plugin_config, handler)
                if plugin.implements("runtime_sandbox_run"):
                    arguments = {"sandbox": record, "config": plugin_config, "network": record.network}
                    if plugin.takes("runtime_sandbox_run", "spec"):
                        arguments["spec"] = oci.container.sandbox_process(
                            record, plugin_config, node.config.cgroup_driver, handler.spec_options
                        )
                    plugin.call("runtime_sandbox_run", **arguments)
                crash_point("run_pod:sandbox")
                node.extensions.pod_sandbox_starting(record)  # NRI: before the pod is ready or listed
                record.state = SANDBOX_READY
                record.pending = ""
                node.store.save_sandbox(record)
            except BaseException:
                self._undo(record)
                raise
        log.info("pod sandbox %s (%s) ready on handler %s", record.id[:12], record.name, handler_name)
        node.emit("sandbox_ready", record)
        return record.id

    def _pod_dir(self, record: SandboxRecord) -> Path:
        """Where the pod's files and pins are (a pod set up before API 2.0 keeps its runtime's directory)."""
        return Path(record.pod.dir) if record.pod is not None else Path(self.node.config.run_dir, "pods", record.id)

    def _set_up_pod(self, record: SandboxRecord, config: cri.PodSandboxConfig, handler: Handler) -> None:
        """The pod's namespaces and files, in one place for every handler (``record.pod``)."""
        record.pod = oci.pod.create(
            self._pod_dir(record),
            config,
            record.network.netns_path,
            record.network.ips,
            handler.spec_options,
            user_namespace=record.user_namespace,
        )
        self.node.store.save_sandbox(record)

    def _call_runtime(self, record: SandboxRecord, hook: str) -> None:
        """Run the runtime's `hook` (stop or remove) for the pod if it has one."""
        plugin = self.node.handlers.get(record.handler).installed()
        if plugin.implements(hook):
            plugin.call(hook, sandbox=record)

    def roll_back(self, record: SandboxRecord) -> None:
        """Undo the creation of a sandbox that a crash interrupted (after a restart)."""
        with self.node.locks.hold(record.id):
            self._undo(record)
        self.node.pod_names.release(record.name, record.id)
        log.warning("pod sandbox %s (%s): creation interrupted by a crash, rolled back", record.id[:12], record.name)

    def _undo(self, record: SandboxRecord) -> None:
        """Best-effort removal of a sandbox whose creation failed."""
        try:
            self._call_runtime(record, "runtime_sandbox_remove")
        except Exception:
            log.exception("cleanup of failed sandbox %s: runtime removal failed", record.id[:12])
        oci.pod.remove(self._pod_dir(record), record.pod)
        try:
            self._release_network(record)
        except Exception:
            log.exception("cleanup of failed sandbox %s: network teardown failed", record.id[:12])
        self._release_user_namespace(record)
        self.node.store.delete_sandbox(record.id)

    def _release_network(self, record: SandboxRecord) -> None:
        if record.network_released:
            return
        self.node.network.installed().call("network_pod_teardown", sandbox=record, network=record.network)
        record.network_released = True
        record.network = PodNetwork(netns_path=record.network.netns_path, data=record.network.data)

    @staticmethod
    def _release_user_namespace(record: SandboxRecord) -> None:
        """Unpin the pod's own namespaces, and its network namespace if no backend adopted it."""
        if record.user_namespace:
            userns.release(record.user_namespace)
            netns.delete(netns.pod_path(record.id))

    def stop(self, sandbox_id: str) -> None:
        """Stop every container of the sandbox, the sandbox, and release its network. Idempotent."""
        record = self.node.store.sandbox(sandbox_id, missing_ok=True)
        if record is None:
            return
        with self.node.locks.hold(record.id):
            for container in self.node.store.containers(record.id):
                if container.removing:  # its runtime cleanup goes before the pod's
                    self.containers.finish_removal(container.id)
                else:
                    self.containers.stop(container.id, timeout=0)
            self._call_runtime(record, "runtime_sandbox_stop")
            oci.pod.stop(self._pod_dir(record), record.pod)
            self._release_network(record)
            changed = record.state != SANDBOX_NOTREADY
            record.state = SANDBOX_NOTREADY
            self.node.store.save_sandbox(record)
        if changed:
            self.node.emit("sandbox_stopped", record)

    def remove(self, sandbox_id: str) -> None:
        """Remove the sandbox and its containers, stopping them first. Idempotent."""
        record = self.node.store.sandbox(sandbox_id, missing_ok=True)
        if record is None:
            return
        with self.node.locks.hold(record.id):
            record.pending = PENDING_REMOVE
            self.node.store.save_sandbox(record)
            for container in self.node.store.containers(record.id):
                self.containers.remove_now(container.id)
            crash_point("remove_pod:containers")
            if record.state == SANDBOX_READY:
                self.stop(record.id)
            self._call_runtime(record, "runtime_sandbox_remove")
            oci.pod.remove(self._pod_dir(record), record.pod)
            crash_point("remove_pod:runtime")
            self._release_network(record)
            crash_point("remove_pod:network")
            self._release_user_namespace(record)
            self.node.store.delete_sandbox(record.id)
            self.node.pod_names.release(record.name, record.id)
        self.node.locks.forget(record.id)
        log.info("pod sandbox %s (%s) removed", record.id[:12], record.name)
        self.node.emit("sandbox_removed", record)

    def update_resources(self, sandbox_id: str, limits: cri.LinuxContainerResources) -> None:
        """Hand new pod-level resources, those the node can enforce, to the runtime."""
        record = self.node.store.sandbox(sandbox_id)
        enforced = resources.fitted(limits)
        with self.node.locks.hold(record.id):
            plugin = self.node.handlers.get(record.handler).require()
            plugin.call("runtime_sandbox_update", sandbox=record, resources=enforced)

    def port_forward_request(self, request: cri.PortForwardRequest) -> PortForwardRequest:
        """Check a PortForward and prepare the connections made when its streaming client connects."""
        record = self.node.store.sandbox(request.pod_sandbox_id)
        if record.state != SANDBOX_READY:
            raise FailedPrecondition(f"pod sandbox {record.id} is not ready")
        plugin = self.node.handlers.get(record.handler).require()
        plugin.require_hook("runtime_port_forward")
        bad = [port for port in request.port if not portforward.is_port(port)]
        if bad:
            raise InvalidArgument(f"not TCP ports (1-65535): {bad}")

        def connect(port: int) -> socket.socket:
            return plugin.call("runtime_port_forward", sandbox=self.node.store.sandbox(record.id), port=port)

        return PortForwardRequest(list(request.port), connect)

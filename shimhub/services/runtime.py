"""The CRI RuntimeService: pod sandboxes, containers, exec and runtime status."""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from shimhub import __version__, metrics, userns
from shimhub.config import converter
from shimhub.errors import NotFound, ResourceExhausted
from shimhub.events import EventBus
from shimhub.hooktypes import ContainerState, ContainerStatus
from shimhub.records import SANDBOX_READY, ContainerRecord, SandboxRecord
from shimhub.stats import StatsCollector
from shimhub_proto.cri.v1 import api_pb2 as cri

if TYPE_CHECKING:
    from shimhub.daemon import Daemon
    from shimhub.streaming.server import StreamingServer

#: CRI API version reported by Version.
CRI_VERSION = "v1"
#: Items per message of the Stream* list RPCs.
STREAM_CHUNK = 500

T = TypeVar("T")


class _Identified(Protocol):
    id: str


R = TypeVar("R", bound=_Identified)

_CONTAINER_STATES = {
    ContainerStatus.CREATED: cri.CONTAINER_CREATED,
    ContainerStatus.RUNNING: cri.CONTAINER_RUNNING,
    ContainerStatus.EXITED: cri.CONTAINER_EXITED,
    ContainerStatus.UNKNOWN: cri.CONTAINER_UNKNOWN,
}


def request_digest(request: object, *extra: str) -> str:
    """A digest identifying a creation request, to recognise the kubelet's retries."""
    digest = hashlib.sha256(request.SerializeToString(deterministic=True))  # type: ignore[attr-defined]
    for part in extra:
        digest.update(part.encode())
    return digest.hexdigest()


def labels_match(labels: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    """Whether every key of `selector` is in `labels` with the same value."""
    return all(labels.get(key) == value for key, value in selector.items())


def chunks(items: list[T], size: int = STREAM_CHUNK) -> Iterator[list[T]]:
    """`items` in lists of at most `size`; one empty list when there are none."""
    if not items:
        yield []
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _sandbox_state(record: SandboxRecord) -> int:
    return cri.SANDBOX_READY if record.state == SANDBOX_READY else cri.SANDBOX_NOTREADY


def sandbox_summary(record: SandboxRecord) -> cri.PodSandbox:
    """The PodSandbox list entry of a sandbox."""
    config = record.pod_config()
    return cri.PodSandbox(
        id=record.id,
        metadata=config.metadata,
        state=_sandbox_state(record),
        created_at=record.created_at,
        labels=config.labels,
        annotations=config.annotations,
        runtime_handler=record.handler,
    )


def sandbox_status(record: SandboxRecord) -> cri.PodSandboxStatus:
    """The PodSandboxStatus of a sandbox."""
    config = record.pod_config()
    ips = record.network.ips if not record.network_released else []
    return cri.PodSandboxStatus(
        id=record.id,
        metadata=config.metadata,
        state=_sandbox_state(record),
        created_at=record.created_at,
        network=cri.PodSandboxNetworkStatus(
            ip=ips[0] if ips else "", additional_ips=[cri.PodIP(ip=ip) for ip in ips[1:]]
        ),
        linux=cri.LinuxPodSandboxStatus(
            namespaces=cri.Namespace(options=config.linux.security_context.namespace_options)
        ),
        labels=config.labels,
        annotations=config.annotations,
        runtime_handler=record.handler,
    )


def _image_spec(record: ContainerRecord, config: cri.ContainerConfig) -> cri.ImageSpec:
    """The image a container runs, named by the tag it was created from (as containerd does)."""
    if not record.image_name:
        return config.image
    return cri.ImageSpec(
        image=record.image_name,
        annotations=config.image.annotations,
        user_specified_image=config.image.user_specified_image,
        runtime_handler=config.image.runtime_handler,
    )


def container_summary(record: ContainerRecord, state: ContainerState) -> cri.Container:
    """The Container list entry of a container."""
    config = record.container_config()
    return cri.Container(
        id=record.id,
        pod_sandbox_id=record.sandbox_id,
        metadata=config.metadata,
        image=_image_spec(record, config),
        image_ref=record.image_repo_digest or record.image_ref,
        image_id=record.image_ref,
        state=_CONTAINER_STATES[state.status],
        created_at=record.created_at,
        labels=config.labels,
        annotations=config.annotations,
    )


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class Serialized(Generic[R]):
    """Each object's message, serialized once per state it is in."""

    def __init__(self, summary: Callable[[R], Message], state: Callable[[R], object]) -> None:
        self.summary = summary
        self.state = state
        self._messages: dict[str, tuple[object, bytes]] = {}

    def message(self, record: R) -> bytes:
        state = self.state(record)
        cached = self._messages.get(record.id)
        if cached is None or cached[0] != state:
            cached = (state, self.summary(record).SerializeToString())
            self._messages[record.id] = cached
        return cached[1]

    def forget(self, object_id: str) -> None:
        self._messages.pop(object_id, None)


class ListEntries(Generic[R]):
    """Each object's entry in one field of a response: tag, length and its message from `messages`.

    A repeated field is on the wire the concatenation of its entries, so a list
    answer is a join of these bytes instead of hundreds of messages built anew.
    Entries of fields that hold the same message share its `messages`.
    """

    def __init__(self, field: FieldDescriptor, messages: Serialized[R]) -> None:
        self.tag = _varint(field.number << 3 | 2)  # length-delimited
        self.messages = messages
        self._entries: dict[str, tuple[bytes, bytes]] = {}

    def entry(self, record: R) -> bytes:
        message = self.messages.message(record)
        cached = self._entries.get(record.id)
        if cached is None or cached[0] is not message:
            cached = (message, self.tag + _varint(len(message)) + message)
            self._entries[record.id] = cached
        return cached[1]

    def answer(self, records: list[R]) -> bytes:
        """A serialized list response holding `records`."""
        return b"".join(self.entry(record) for record in records)

    def forget(self, object_id: str) -> None:
        self._entries.pop(object_id, None)
        self.messages.forget(object_id)


def container_status(record: ContainerRecord, state: ContainerState) -> cri.ContainerStatus:
    """The ContainerStatus of a container."""
    config = record.container_config()
    return cri.ContainerStatus(
        id=record.id,
        metadata=config.metadata,
        state=_CONTAINER_STATES[state.status],
        created_at=record.created_at,
        started_at=state.started_at,
        finished_at=state.finished_at,
        exit_code=state.exit_code,
        image=_image_spec(record, config),
        image_ref=record.image_repo_digest or record.image_ref,
        image_id=record.image_ref,
        reason=state.reason,
        message=state.message,
        labels=config.labels,
        annotations=config.annotations,
        mounts=config.mounts,
        log_path=record.log_path,
        resources=cri.ContainerResources(linux=config.linux.resources),
        stop_signal=config.stop_signal,
        user=cri.ContainerUser(
            linux=cri.LinuxContainerUser(
                uid=record.user.uid,
                gid=record.user.gid,
                supplemental_groups=sorted({record.user.gid, *record.user.additional_gids}),
            )
        ),
    )


def _current_status(record: ContainerRecord) -> cri.ContainerStatus:
    return container_status(record, record.state)


def _status_key(record: ContainerRecord) -> tuple[object, ...]:
    """What a container's status is made of that can change: its state and its config (new resources)."""
    return (record.state, record.container_config())


#: PodSandboxStatusResponse.timestamp's tag (field 4, varint).
_TIMESTAMP_TAG = bytes([4 << 3])


def _json(value: object) -> str:
    return json.dumps(converter.unstructure(value), sort_keys=True)


_EVENT_TYPES = {
    "container_created": cri.CONTAINER_CREATED_EVENT,
    "container_started": cri.CONTAINER_STARTED_EVENT,
    "container_stopped": cri.CONTAINER_STOPPED_EVENT,
    "container_removed": cri.CONTAINER_DELETED_EVENT,
}
#: Seconds between looks for containers that exited on their own while an event stream is open.
EVENT_POLL = 1.0


class RuntimeService:
    """Implements runtime.v1.RuntimeService on top of a Daemon."""

    def __init__(self, daemon: Daemon, streaming: StreamingServer) -> None:
        self.daemon = daemon
        self.streaming = streaming
        self.listed_containers: ListEntries[ContainerRecord] = ListEntries(
            cri.ListContainersResponse.DESCRIPTOR.fields_by_name["containers"],
            Serialized(lambda record: container_summary(record, record.state), lambda record: record.state.status),
        )
        self.listed_sandboxes: ListEntries[SandboxRecord] = ListEntries(
            cri.ListPodSandboxResponse.DESCRIPTOR.fields_by_name["items"],
            Serialized(sandbox_summary, lambda record: record.state),
        )
        # Status answers of unchanged objects are the bytes serialized last time (non-verbose calls); a
        # container's status is serialized once for ContainerStatus and PodSandboxStatus.
        statuses = Serialized(_current_status, _status_key)
        self.container_statuses: ListEntries[ContainerRecord] = ListEntries(
            cri.ContainerStatusResponse.DESCRIPTOR.fields_by_name["status"], statuses
        )
        self.pod_container_statuses: ListEntries[ContainerRecord] = ListEntries(
            cri.PodSandboxStatusResponse.DESCRIPTOR.fields_by_name["containers_statuses"], statuses
        )
        self.sandbox_statuses: ListEntries[SandboxRecord] = ListEntries(
            cri.PodSandboxStatusResponse.DESCRIPTOR.fields_by_name["status"],
            Serialized(sandbox_status, lambda record: (record.state, record.network_released, record.network)),
        )
        self.stats = StatsCollector(daemon)
        self.events: EventBus[cri.ContainerEventResponse] = EventBus(size=lambda event: event.ByteSize())
        daemon.listeners.append(self._lifecycle)

    # -- runtime-wide ----------------------------------------------------

    def Version(self, request: cri.VersionRequest, context: grpc.ServicerContext) -> cri.VersionResponse:
        return cri.VersionResponse(
            version="0.1.0", runtime_name="shimhub", runtime_version=__version__, runtime_api_version=CRI_VERSION
        )

    def Status(self, request: cri.StatusRequest, context: grpc.ServicerContext) -> cri.StatusResponse:
        daemon = self.daemon
        registry = daemon.handlers
        default = registry.handlers[registry.config.default_runtime]
        default_ready = default.backend.readiness()
        network_ready = daemon.network.readiness()
        conditions = [
            cri.RuntimeCondition(
                type="RuntimeReady",
                status=default_ready.ready,
                reason="" if default_ready.ready else "DefaultHandlerNotReady",
                message="" if default_ready.ready else f"runtime handler {default.name!r}: {default_ready.reason}",
            ),
            cri.RuntimeCondition(
                type="NetworkReady",
                status=network_ready.ready,
                reason="" if network_ready.ready else "NetworkPluginNotReady",
                message="" if network_ready.ready else f"{daemon.network.role}: {network_ready.reason}",
            ),
        ]
        handlers: list[cri.RuntimeHandler] = []
        disabled: list[str] = []
        for name, handler in sorted(registry.handlers.items()):
            readiness = handler.backend.readiness()
            if not readiness.ready:
                disabled.append(f"{name}: {readiness.reason}")
                continue
            features = cri.RuntimeHandlerFeatures(
                recursive_read_only_mounts=readiness.features.recursive_read_only_mounts,
                user_namespaces=not userns.unsupported(readiness.features),
            )
            handlers.append(cri.RuntimeHandler(name=name, features=features))
            if handler is default:
                handlers.append(cri.RuntimeHandler(name="", features=features))
        conditions.append(
            cri.RuntimeCondition(
                type="RuntimeHandlersReady",
                status=not disabled,
                reason="HandlersDisabled" if disabled else "",
                message="; ".join(disabled),
            )
        )
        info = {"status": json.dumps(daemon.status_info(), sort_keys=True)} if request.verbose else {}
        return cri.StatusResponse(
            status=cri.RuntimeStatus(conditions=conditions),
            runtime_handlers=handlers,
            info=info,
            features=cri.RuntimeFeatures(supplemental_groups_policy=True),
        )

    def RuntimeConfig(
        self, request: cri.RuntimeConfigRequest, context: grpc.ServicerContext
    ) -> cri.RuntimeConfigResponse:
        driver = cri.SYSTEMD if self.daemon.config.cgroup_driver == "systemd" else cri.CGROUPFS
        return cri.RuntimeConfigResponse(linux=cri.LinuxRuntimeConfiguration(cgroup_driver=driver))

    def UpdateRuntimeConfig(
        self, request: cri.UpdateRuntimeConfigRequest, context: grpc.ServicerContext
    ) -> cri.UpdateRuntimeConfigResponse:
        self.daemon.pod_cidr = request.runtime_config.network_config.pod_cidr
        return cri.UpdateRuntimeConfigResponse()

    # -- pod sandboxes ---------------------------------------------------

    def RunPodSandbox(
        self, request: cri.RunPodSandboxRequest, context: grpc.ServicerContext
    ) -> cri.RunPodSandboxResponse:
        sandbox_id = self.daemon.pods.run(
            request.config, request.runtime_handler, request_digest(request), context.time_remaining()
        )
        return cri.RunPodSandboxResponse(pod_sandbox_id=sandbox_id)

    def StopPodSandbox(
        self, request: cri.StopPodSandboxRequest, context: grpc.ServicerContext
    ) -> cri.StopPodSandboxResponse:
        self.daemon.pods.stop(request.pod_sandbox_id)
        return cri.StopPodSandboxResponse()

    def RemovePodSandbox(
        self, request: cri.RemovePodSandboxRequest, context: grpc.ServicerContext
    ) -> cri.RemovePodSandboxResponse:
        self.daemon.pods.remove(request.pod_sandbox_id)
        return cri.RemovePodSandboxResponse()

    def PodSandboxStatus(
        self, request: cri.PodSandboxStatusRequest, context: grpc.ServicerContext
    ) -> cri.PodSandboxStatusResponse | bytes:
        record = self.daemon.store.sandbox(request.pod_sandbox_id)
        containers = []
        for container in self._newest_first(record.id):
            with contextlib.suppress(NotFound):  # removed meanwhile
                containers.append(self.daemon.containers.state(container.id)[0])
        if not request.verbose:  # in wire form, from the entries of what did not change
            return (
                self.sandbox_statuses.entry(record)
                + self.pod_container_statuses.answer(containers)
                + _TIMESTAMP_TAG
                + _varint(time.time_ns())
            )
        return cri.PodSandboxStatusResponse(
            status=sandbox_status(record),
            containers_statuses=[container_status(container, container.state) for container in containers],
            info={"info": _json(record)},
            timestamp=time.time_ns(),
        )

    def _newest_first(self, sandbox_id: str) -> list[ContainerRecord]:
        """A pod's containers, the newest first: the kubelet takes the first status with a container's name."""
        visible = self.daemon.store.visible_containers(sandbox_id)
        return sorted(visible, key=lambda record: record.created_at, reverse=True)

    def _sandboxes(self, query: cri.PodSandboxFilter) -> list[SandboxRecord]:
        return [
            record
            for record in self.daemon.store.sandboxes()
            if record.id.startswith(query.id)
            and (not query.HasField("state") or _sandbox_state(record) == query.state.state)
            and labels_match(record.pod_config().labels, query.label_selector)
        ]

    def ListPodSandbox(self, request: cri.ListPodSandboxRequest, context: grpc.ServicerContext) -> bytes:
        """Answered in wire form: a serialized ListPodSandboxResponse."""
        return self.listed_sandboxes.answer(self._sandboxes(request.filter))

    def StreamPodSandboxes(
        self, request: cri.StreamPodSandboxesRequest, context: grpc.ServicerContext
    ) -> Iterator[cri.StreamPodSandboxesResponse]:
        for part in chunks([sandbox_summary(record) for record in self._sandboxes(request.filter)]):
            yield cri.StreamPodSandboxesResponse(pod_sandboxes=part)

    def UpdatePodSandboxResources(
        self, request: cri.UpdatePodSandboxResourcesRequest, context: grpc.ServicerContext
    ) -> cri.UpdatePodSandboxResourcesResponse:
        self.daemon.pods.update_resources(request.pod_sandbox_id, request.resources)
        return cri.UpdatePodSandboxResourcesResponse()

    # -- containers ------------------------------------------------------

    def CreateContainer(
        self, request: cri.CreateContainerRequest, context: grpc.ServicerContext
    ) -> cri.CreateContainerResponse:
        container_id = self.daemon.containers.create(
            request.pod_sandbox_id, request.config, request_digest(request), context.time_remaining()
        )
        return cri.CreateContainerResponse(container_id=container_id)

    def StartContainer(
        self, request: cri.StartContainerRequest, context: grpc.ServicerContext
    ) -> cri.StartContainerResponse:
        self.daemon.containers.start(request.container_id)
        return cri.StartContainerResponse()

    def StopContainer(
        self, request: cri.StopContainerRequest, context: grpc.ServicerContext
    ) -> cri.StopContainerResponse:
        self.daemon.containers.stop(request.container_id, request.timeout)
        return cri.StopContainerResponse()

    def RemoveContainer(
        self, request: cri.RemoveContainerRequest, context: grpc.ServicerContext
    ) -> cri.RemoveContainerResponse:
        self.daemon.containers.remove(request.container_id)
        return cri.RemoveContainerResponse()

    def ContainerStatus(
        self, request: cri.ContainerStatusRequest, context: grpc.ServicerContext
    ) -> cri.ContainerStatusResponse | bytes:
        record, state = self.daemon.containers.state(request.container_id)
        if not request.verbose:
            return self.container_statuses.entry(record)
        return cri.ContainerStatusResponse(status=container_status(record, state), info={"info": _json(record)})

    def _container_records(self, query: cri.ContainerFilter | cri.ContainerStatsFilter) -> list[ContainerRecord]:
        """Containers matching the id prefix, pod id prefix and label selector of a filter."""
        return [
            record
            for record in self.daemon.store.visible_containers()
            if record.id.startswith(query.id)
            and record.sandbox_id.startswith(query.pod_sandbox_id)
            and (not query.label_selector or labels_match(record.container_config().labels, query.label_selector))
        ]

    def _listed(self, query: cri.ContainerFilter) -> list[ContainerRecord]:
        """The containers a list call answers with, their states refreshed."""
        self.daemon.containers.refresh_running()
        return [
            record
            for record in self._container_records(query)
            if not query.HasField("state") or _CONTAINER_STATES[record.state.status] == query.state.state
        ]

    def ListContainers(self, request: cri.ListContainersRequest, context: grpc.ServicerContext) -> bytes:
        """Answered in wire form: a serialized ListContainersResponse."""
        return self.listed_containers.answer(self._listed(request.filter))

    def StreamContainers(
        self, request: cri.StreamContainersRequest, context: grpc.ServicerContext
    ) -> Iterator[cri.StreamContainersResponse]:
        summaries = [container_summary(record, record.state) for record in self._listed(request.filter)]
        for part in chunks(summaries):
            yield cri.StreamContainersResponse(containers=part)

    def UpdateContainerResources(
        self, request: cri.UpdateContainerResourcesRequest, context: grpc.ServicerContext
    ) -> cri.UpdateContainerResourcesResponse:
        self.daemon.containers.update_resources(request.container_id, request.linux)
        return cri.UpdateContainerResourcesResponse()

    def CheckpointContainer(
        self, request: cri.CheckpointContainerRequest, context: grpc.ServicerContext
    ) -> cri.CheckpointContainerResponse:
        self.daemon.containers.checkpoint(request.container_id, request.location, request.timeout)
        return cri.CheckpointContainerResponse()

    def ReopenContainerLog(
        self, request: cri.ReopenContainerLogRequest, context: grpc.ServicerContext
    ) -> cri.ReopenContainerLogResponse:
        self.daemon.containers.reopen_log(request.container_id)
        return cri.ReopenContainerLogResponse()

    def ExecSync(self, request: cri.ExecSyncRequest, context: grpc.ServicerContext) -> cri.ExecSyncResponse:
        result = self.daemon.containers.exec_sync(request.container_id, list(request.cmd), request.timeout)
        return cri.ExecSyncResponse(stdout=result.stdout, stderr=result.stderr, exit_code=result.exit_code)

    # -- streaming: each answers with a single-use URL on the streaming server ---------

    def Exec(self, request: cri.ExecRequest, context: grpc.ServicerContext) -> cri.ExecResponse:
        return cri.ExecResponse(url=self.streaming.url("exec", self.daemon.containers.exec_request(request)))

    def Attach(self, request: cri.AttachRequest, context: grpc.ServicerContext) -> cri.AttachResponse:
        return cri.AttachResponse(url=self.streaming.url("attach", self.daemon.containers.attach_request(request)))

    def PortForward(self, request: cri.PortForwardRequest, context: grpc.ServicerContext) -> cri.PortForwardResponse:
        forward = self.daemon.pods.port_forward_request(request)
        return cri.PortForwardResponse(url=self.streaming.url("portforward", forward))

    # -- stats -------------------------------------------------------------

    def _container_stats(self, query: cri.ContainerStatsFilter) -> list[cri.ContainerStats]:
        found = []
        for record in self._container_records(query):
            sandbox = self.daemon.store.sandbox(record.sandbox_id, missing_ok=True)
            if sandbox is not None:
                found.append(self.stats.container(sandbox, record))
        return found

    def ContainerStats(
        self, request: cri.ContainerStatsRequest, context: grpc.ServicerContext
    ) -> cri.ContainerStatsResponse:
        record = self.daemon.containers.visible(request.container_id)
        return cri.ContainerStatsResponse(
            stats=self.stats.container(self.daemon.store.sandbox(record.sandbox_id), record)
        )

    def ListContainerStats(
        self, request: cri.ListContainerStatsRequest, context: grpc.ServicerContext
    ) -> cri.ListContainerStatsResponse:
        return cri.ListContainerStatsResponse(stats=self._container_stats(request.filter))

    def StreamContainerStats(
        self, request: cri.StreamContainerStatsRequest, context: grpc.ServicerContext
    ) -> Iterator[cri.StreamContainerStatsResponse]:
        for part in chunks(self._container_stats(request.filter)):
            yield cri.StreamContainerStatsResponse(container_stats=part)

    def _pod_records(self, query: cri.PodSandboxStatsFilter) -> list[SandboxRecord]:
        return [
            record
            for record in self.daemon.store.sandboxes()
            if (not query.id or record.id.startswith(query.id))
            and (not query.label_selector or labels_match(record.pod_config().labels, query.label_selector))
        ]

    def PodSandboxStats(
        self, request: cri.PodSandboxStatsRequest, context: grpc.ServicerContext
    ) -> cri.PodSandboxStatsResponse:
        record = self.daemon.store.sandbox(request.pod_sandbox_id)
        return cri.PodSandboxStatsResponse(stats=self.stats.pod(record))

    def ListPodSandboxStats(
        self, request: cri.ListPodSandboxStatsRequest, context: grpc.ServicerContext
    ) -> cri.ListPodSandboxStatsResponse:
        return cri.ListPodSandboxStatsResponse(stats=[self.stats.pod(r) for r in self._pod_records(request.filter)])

    def StreamPodSandboxStats(
        self, request: cri.StreamPodSandboxStatsRequest, context: grpc.ServicerContext
    ) -> Iterator[cri.StreamPodSandboxStatsResponse]:
        for part in chunks([self.stats.pod(r) for r in self._pod_records(request.filter)]):
            yield cri.StreamPodSandboxStatsResponse(pod_sandbox_stats=part)

    def ListMetricDescriptors(
        self, request: cri.ListMetricDescriptorsRequest, context: grpc.ServicerContext
    ) -> cri.ListMetricDescriptorsResponse:
        return cri.ListMetricDescriptorsResponse(descriptors=metrics.descriptors())

    def ListPodSandboxMetrics(
        self, request: cri.ListPodSandboxMetricsRequest, context: grpc.ServicerContext
    ) -> cri.ListPodSandboxMetricsResponse:
        return cri.ListPodSandboxMetricsResponse(
            pod_metrics=[self.stats.metrics(record) for record in self.daemon.store.sandboxes()]
        )

    def StreamPodSandboxMetrics(
        self, request: cri.StreamPodSandboxMetricsRequest, context: grpc.ServicerContext
    ) -> Iterator[cri.StreamPodSandboxMetricsResponse]:
        for part in chunks([self.stats.metrics(record) for record in self.daemon.store.sandboxes()]):
            yield cri.StreamPodSandboxMetricsResponse(pod_sandbox_metrics=part)

    # -- events ------------------------------------------------------------

    def _lifecycle(self, event: str, sandbox: SandboxRecord, container: ContainerRecord | None) -> None:
        """Publish a container event, with the pod's status and its containers' as they are now."""
        if event in ("container_removed", "sandbox_removed"):
            self.stats.forget(container.id if container is not None else sandbox.id)
        if event == "container_removed" and container is not None:
            for entries in (self.listed_containers, self.container_statuses, self.pod_container_statuses):
                entries.forget(container.id)
        if event == "sandbox_removed":
            self.listed_sandboxes.forget(sandbox.id)
            self.sandbox_statuses.forget(sandbox.id)
        kind = _EVENT_TYPES.get(event)
        if kind is None or container is None or not self.events.has_subscribers:
            return
        statuses = [
            container_status(record, record.state)
            for record in self._newest_first(sandbox.id)
            if record.id != container.id or kind != cri.CONTAINER_DELETED_EVENT
        ]
        self.events.publish(
            cri.ContainerEventResponse(
                container_id=container.id,
                container_event_type=kind,
                created_at=time.time_ns(),
                pod_sandbox_status=sandbox_status(sandbox),
                containers_statuses=statuses,
            )
        )

    def GetContainerEvents(
        self, request: cri.GetEventsRequest, context: grpc.ServicerContext
    ) -> Iterator[cri.ContainerEventResponse]:
        subscription = self.events.subscribe()
        yield from subscription.events(EVENT_POLL, context.is_active, self.daemon.containers.refresh_running)
        if subscription.overflowed:
            raise ResourceExhausted(
                f"this event stream fell more than {self.events.limit} events or {self.events.byte_limit} bytes "
                "behind; list again and resubscribe"
            )

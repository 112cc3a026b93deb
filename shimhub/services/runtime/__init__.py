"""The CRI RuntimeService, a room per group of calls (as containerd's CRI server has a file per call).

* `node`: Version, Status, RuntimeConfig; `pods`: the pod sandbox calls; `containers`: the container
  calls; `streaming`: ExecSync, Exec, Attach, PortForward; `stats`: statistics and metrics; `events`:
  GetContainerEvents;
* `views`: the CRI messages made from records; `wire`: serialized answers reused, chunks, filters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shimhub.events import EventBus
from shimhub.records import ContainerRecord, SandboxRecord
from shimhub.services.runtime.containers import ContainerCalls
from shimhub.services.runtime.events import EventCalls
from shimhub.services.runtime.node import NodeCalls
from shimhub.services.runtime.pods import PodCalls
from shimhub.services.runtime.stats import StatsCalls
from shimhub.services.runtime.streaming import StreamingCalls
from shimhub.services.runtime.views import (
    container_summary,
    current_status,
    sandbox_status,
    sandbox_summary,
    status_key,
)
from shimhub.services.runtime.wire import ListEntries, Serialized
from shimhub.stats import StatsCollector
from shimhub_proto.cri.v1 import api_pb2 as cri

if TYPE_CHECKING:
    from shimhub.daemon import Daemon
    from shimhub.streaming.server import StreamingServer

__all__ = ["RuntimeService"]


class RuntimeService(NodeCalls, PodCalls, ContainerCalls, StreamingCalls, StatsCalls, EventCalls):
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
        statuses = Serialized(current_status, status_key)
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

"""The ground every room of the RuntimeService shares."""

from __future__ import annotations

from typing import TYPE_CHECKING

from shimhub.events import EventBus
from shimhub.records import ContainerRecord, SandboxRecord
from shimhub.services.runtime.wire import ListEntries
from shimhub.stats import StatsCollector
from shimhub_proto.cri.v1 import api_pb2 as cri

if TYPE_CHECKING:
    from shimhub.daemon import Daemon
    from shimhub.streaming.server import StreamingServer


class Room:
    """What every room of the RuntimeService shares (set by `RuntimeService.__init__`)."""

    daemon: Daemon
    streaming: StreamingServer
    listed_containers: ListEntries[ContainerRecord]
    listed_sandboxes: ListEntries[SandboxRecord]
    container_statuses: ListEntries[ContainerRecord]
    pod_container_statuses: ListEntries[ContainerRecord]
    sandbox_statuses: ListEntries[SandboxRecord]
    stats: StatsCollector
    events: EventBus[cri.ContainerEventResponse]

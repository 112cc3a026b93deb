"""GetContainerEvents: lifecycle events as the CRI's container events."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc

from shimhub.errors import ResourceExhausted
from shimhub.records import ContainerRecord, SandboxRecord
from shimhub.services.runtime.room import Room
from shimhub.services.runtime.views import container_status, sandbox_status
from shimhub_proto.cri.v1 import api_pb2 as cri

_EVENT_TYPES = {
    "container_created": cri.CONTAINER_CREATED_EVENT,
    "container_started": cri.CONTAINER_STARTED_EVENT,
    "container_stopped": cri.CONTAINER_STOPPED_EVENT,
    "container_removed": cri.CONTAINER_DELETED_EVENT,
}

#: Seconds between looks for containers that exited on their own while an event stream is open.
EVENT_POLL = 1.0


class EventCalls(Room):
    """GetContainerEvents: lifecycle events as the CRI's container events."""

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

"""The pod sandbox calls: run, stop, remove, status, lists, resource updates."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import grpc

from shimhub.errors import NotFound
from shimhub.records import ContainerRecord, SandboxRecord
from shimhub.services.runtime.room import Room
from shimhub.services.runtime.views import (
    TIMESTAMP_TAG,
    container_status,
    sandbox_state,
    sandbox_status,
    sandbox_summary,
)
from shimhub.services.runtime.wire import chunks, labels_match, record_json, request_digest, varint
from shimhub_proto.cri.v1 import api_pb2 as cri


class PodCalls(Room):
    """The pod sandbox calls: run, stop, remove, status, lists, resource updates."""

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
                + TIMESTAMP_TAG
                + varint(time.time_ns())
            )
        return cri.PodSandboxStatusResponse(
            status=sandbox_status(record),
            containers_statuses=[container_status(container, container.state) for container in containers],
            info={"info": record_json(record)},
            timestamp=time.time_ns(),
        )

    def _newest_first(self, sandbox_id: str) -> list[ContainerRecord]:
        """A pod's containers, the newest first: the kubelet takes the first status with a container's name."""
        visible = self.daemon.store.visible_containers(sandbox_id)
        return sorted(visible, key=lambda record: record.created_at, reverse=True)

    def _sandboxes(self, query: cri.PodSandboxFilter) -> list[SandboxRecord]:
        return [
            record
            for record in self.daemon.store.visible_sandboxes()
            if record.id.startswith(query.id)
            and (not query.HasField("state") or sandbox_state(record) == query.state.state)
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

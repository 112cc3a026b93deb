"""The container calls: create, start, stop, remove, status, lists, updates, checkpoints, logs."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from shimhub.records import ContainerRecord
from shimhub.services.runtime.room import Room
from shimhub.services.runtime.views import CONTAINER_STATES, container_status, container_summary
from shimhub.services.runtime.wire import chunks, labels_match, record_json, request_digest
from shimhub_proto.cri.v1 import api_pb2 as cri


class ContainerCalls(Room):
    """The container calls: create, start, stop, remove, status, lists, updates, checkpoints, logs."""

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
        return cri.ContainerStatusResponse(status=container_status(record, state), info={"info": record_json(record)})

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
            if not query.HasField("state") or CONTAINER_STATES[record.state.status] == query.state.state
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

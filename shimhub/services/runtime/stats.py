"""Container and pod statistics and metrics."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from shimhub import metrics
from shimhub.records import SandboxRecord
from shimhub.services.runtime.room import Room
from shimhub.services.runtime.wire import chunks, labels_match
from shimhub_proto.cri.v1 import api_pb2 as cri


class StatsCalls(Room):
    """Container and pod statistics and metrics."""

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
            for record in self.daemon.store.visible_sandboxes()
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

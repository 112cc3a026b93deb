"""cAdvisor-compatible pod and container metrics for ListPodSandboxMetrics.

The kubelet's `/metrics/cadvisor` endpoint can be served from these instead
of cAdvisor: the names, types and label keys are cAdvisor's. Values are
integers (the CRI's UInt64Value), so CPU seconds are whole seconds, as other
runtimes report them too.
"""

from __future__ import annotations

from attrs import define
from google.protobuf.message import Message

from shimhub_proto.cri.v1 import api_pb2 as cri

#: Label keys of every pod and container metric, in order.
LABEL_KEYS = ("container", "id", "image", "name", "namespace", "pod")
#: Extra label key of the per-interface network metrics.
INTERFACE_KEY = "interface"


@define(frozen=True)
class Family:
    """One metric: its name, help and type, and the CpuUsage or MemoryUsage field it reports."""

    name: str
    help: str
    metric_type: int
    source: str  # "cpu" or "memory"
    field: str
    #: The field's value is divided by this (nanoseconds to seconds for CPU time).
    divisor: int = 1

    def value(self, usage: dict[str, Message]) -> cri.UInt64Value | None:
        """The metric's value from {"cpu": CpuUsage, "memory": MemoryUsage}; None when unknown."""
        message = usage[self.source]
        if not message.HasField(self.field):
            return None
        return cri.UInt64Value(value=getattr(message, self.field).value // self.divisor)


CONTAINER_FAMILIES = (
    Family(
        "container_cpu_usage_seconds_total",
        "Cumulative CPU time consumed, in seconds.",
        cri.COUNTER,
        "cpu",
        "usage_core_nano_seconds",
        divisor=10**9,
    ),
    Family(
        "container_memory_usage_bytes",
        "Current memory usage, including all memory regardless of when it was accessed, in bytes.",
        cri.GAUGE,
        "memory",
        "usage_bytes",
    ),
    Family(
        "container_memory_working_set_bytes", "Current working set, in bytes.", cri.GAUGE, "memory", "working_set_bytes"
    ),
    Family("container_memory_rss", "Size of RSS, in bytes.", cri.GAUGE, "memory", "rss_bytes"),
    Family(
        "container_memory_failures_total",
        "Cumulative count of memory allocation failures (page faults).",
        cri.COUNTER,
        "memory",
        "page_faults",
    ),
)
#: Network metrics: name, help, and the NetworkInterfaceUsage field they report.
NETWORK_FAMILIES = (
    ("container_network_receive_bytes_total", "Cumulative count of bytes received.", "rx_bytes"),
    ("container_network_receive_errors_total", "Cumulative count of errors encountered while receiving.", "rx_errors"),
    ("container_network_transmit_bytes_total", "Cumulative count of bytes transmitted.", "tx_bytes"),
    (
        "container_network_transmit_errors_total",
        "Cumulative count of errors encountered while transmitting.",
        "tx_errors",
    ),
)
PROCESS_FAMILY = ("container_processes", "Number of processes running inside the container.")


def descriptors() -> list[cri.MetricDescriptor]:
    """Every metric ListPodSandboxMetrics may report."""
    found = [cri.MetricDescriptor(name=f.name, help=f.help, label_keys=LABEL_KEYS) for f in CONTAINER_FAMILIES]
    found += [
        cri.MetricDescriptor(name=name, help=help_text, label_keys=(*LABEL_KEYS, INTERFACE_KEY))
        for name, help_text, _ in NETWORK_FAMILIES
    ]
    found.append(cri.MetricDescriptor(name=PROCESS_FAMILY[0], help=PROCESS_FAMILY[1], label_keys=LABEL_KEYS))
    return found


def _metrics(labels: list[str], timestamp: int, cpu: cri.CpuUsage, memory: cri.MemoryUsage) -> list[cri.Metric]:
    found = []
    for family in CONTAINER_FAMILIES:
        value = family.value({"cpu": cpu, "memory": memory})
        if value is not None:
            found.append(
                cri.Metric(
                    name=family.name,
                    timestamp=timestamp,
                    metric_type=family.metric_type,
                    label_values=labels,
                    value=value,
                )
            )
    return found


def pod_metrics(stats: cri.PodSandboxStats) -> cri.PodSandboxMetrics:
    """The metrics of one pod (labelled as cAdvisor labels the pod's cgroup) and of each of its containers."""
    pod = stats.attributes.metadata
    linux = stats.linux
    pod_labels = ["POD", stats.attributes.id, "", pod.name, pod.namespace, pod.name]
    pod_found = _metrics(pod_labels, linux.cpu.timestamp, linux.cpu, linux.memory)
    for interface in linux.network.interfaces:
        for name, _, field_name in NETWORK_FAMILIES:
            pod_found.append(
                cri.Metric(
                    name=name,
                    timestamp=linux.network.timestamp,
                    metric_type=cri.COUNTER,
                    label_values=[*pod_labels, interface.name],
                    value=getattr(interface, field_name),
                )
            )
    if linux.process.HasField("process_count"):
        pod_found.append(
            cri.Metric(
                name=PROCESS_FAMILY[0],
                timestamp=linux.process.timestamp,
                metric_type=cri.GAUGE,
                label_values=pod_labels,
                value=linux.process.process_count,
            )
        )
    containers = []
    for container in linux.containers:
        labels = [
            container.attributes.metadata.name,
            container.attributes.id,
            "",
            container.attributes.metadata.name,
            pod.namespace,
            pod.name,
        ]
        containers.append(
            cri.ContainerMetrics(
                container_id=container.attributes.id,
                metrics=_metrics(labels, container.cpu.timestamp, container.cpu, container.memory),
            )
        )
    return cri.PodSandboxMetrics(pod_sandbox_id=stats.attributes.id, metrics=pod_found, container_metrics=containers)

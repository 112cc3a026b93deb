"""cAdvisor-compatible pod and container metrics for ListMetricDescriptors and ListPodSandboxMetrics.

The kubelet's `/metrics/cadvisor` endpoint can be served from these instead
of cAdvisor: the names, types and label keys are cAdvisor's. Values are
integers (the CRI's UInt64Value), so seconds are whole seconds, as other
runtimes report them too. A series whose source the runtime or the node
cannot give is left out, never made up.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from functools import cache

from attrs import define, field

from shimhub.hooktypes import ContainerUsage, DeviceIo
from shimhub.netns import InterfaceCounters
from shimhub_proto.cri.v1 import api_pb2 as cri

#: Label keys of every pod and container metric, in order.
LABEL_KEYS = ("container", "id", "image", "name", "namespace", "pod")
#: Extra label key of the per-interface network metrics.
INTERFACE_KEY = "interface"
NANO = 10**9


@define
class Sample:
    """What one pod or container's metrics are computed from."""

    #: Values of LABEL_KEYS.
    labels: list[str]
    usage: ContainerUsage
    resources: cri.LinuxContainerResources = field(factory=cri.LinuxContainerResources)
    started_at: int = 0
    #: Bytes and inodes of the writable layer, and the filesystem holding it.
    fs_used_bytes: int | None = None
    fs: os.statvfs_result | None = None
    interfaces: list[InterfaceCounters] = field(factory=list)


#: Extra label values and the value of one series.
Series = tuple[tuple[str, ...], int]


@define(frozen=True)
class Family:
    """One metric: name, help, type, its extra label keys, and how to get its series from a sample."""

    name: str
    help: str
    metric_type: int
    series: Callable[[Sample], Iterable[Series]]
    extra_keys: tuple[str, ...] = ()


def _one(value: int | None) -> list[Series]:
    return [] if value is None else [((), value)]


def _usage(name: str, divisor: int = 1) -> Callable[[Sample], list[Series]]:
    def series(sample: Sample) -> list[Series]:
        value = getattr(sample.usage, name)
        return _one(None if value is None else value // divisor)

    return series


def _spec(name: str) -> Callable[[Sample], list[Series]]:
    def series(sample: Sample) -> list[Series]:
        return _one(getattr(sample.resources, name)) if sample.labels[0] != "POD" else []

    return series


@cache
def _device_name(major: int, minor: int) -> str:
    """/dev/<name> of a block device, from sysfs ("" when unknown)."""
    try:
        with open(f"/sys/dev/block/{major}:{minor}/uevent") as uevent:
            for line in uevent:
                if line.startswith("DEVNAME="):
                    return "/dev/" + line.strip().partition("=")[2]
    except OSError:
        pass
    return ""


def _io(pick: Callable[[DeviceIo], int]) -> Callable[[Sample], list[Series]]:
    def series(sample: Sample) -> list[Series]:
        return [((_device_name(d.major, d.minor),), pick(d)) for d in sample.usage.io]

    return series


def _blkio(sample: Sample) -> list[Series]:
    found: list[Series] = []
    for d in sample.usage.io:
        name, major, minor = _device_name(d.major, d.minor), str(d.major), str(d.minor)
        found += [((name, major, minor, "Read"), d.read_bytes), ((name, major, minor, "Write"), d.write_bytes)]
    return found


def _fs(pick: Callable[[os.statvfs_result], int]) -> Callable[[Sample], list[Series]]:
    def series(sample: Sample) -> list[Series]:
        return [] if sample.fs is None else [(("",), pick(sample.fs))]

    return series


def _network(name: str) -> Callable[[Sample], list[Series]]:
    def series(sample: Sample) -> list[Series]:
        return [((i.name,), getattr(i, name)) for i in sample.interfaces]

    return series


# fmt: off
G, C = cri.GAUGE, cri.COUNTER
FS, IF = ("device",), (INTERFACE_KEY,)
FAMILIES = (
    Family("container_cpu_usage_seconds_total", "Cumulative cpu time consumed in seconds.", C,
           _usage("cpu_usage_core_nanoseconds", NANO)),
    Family("container_cpu_user_seconds_total", "Cumulative user cpu time consumed in seconds.", C,
           _usage("cpu_user_nanoseconds", NANO)),
    Family("container_cpu_system_seconds_total", "Cumulative system cpu time consumed in seconds.", C,
           _usage("cpu_system_nanoseconds", NANO)),
    Family("container_cpu_cfs_periods_total", "Number of elapsed enforcement period intervals.", C,
           _usage("cpu_cfs_periods")),
    Family("container_cpu_cfs_throttled_periods_total", "Number of throttled period intervals.", C,
           _usage("cpu_cfs_throttled_periods")),
    Family("container_cpu_cfs_throttled_seconds_total", "Total time duration the container has been throttled.", C,
           _usage("cpu_cfs_throttled_nanoseconds", NANO)),
    Family("container_memory_usage_bytes", "Current memory usage in bytes, including all memory regardless of when "
           "it was accessed.", G, _usage("memory_usage_bytes")),
    Family("container_memory_working_set_bytes", "Current working set in bytes.", G,
           _usage("memory_working_set_bytes")),
    Family("container_memory_rss", "Size of RSS in bytes.", G, _usage("memory_rss_bytes")),
    Family("container_memory_cache", "Number of bytes of page cache memory.", G, _usage("memory_cache_bytes")),
    Family("container_memory_mapped_file", "Size of memory mapped files in bytes.", G,
           _usage("memory_mapped_file_bytes")),
    Family("container_memory_kernel_usage", "Size of kernel memory allocated in bytes.", G,
           _usage("memory_kernel_bytes")),
    Family("container_memory_swap", "Container swap usage in bytes.", G, _usage("memory_swap_bytes")),
    Family("container_memory_max_usage_bytes", "Maximum memory usage recorded in bytes.", G,
           _usage("memory_max_usage_bytes")),
    Family("container_memory_failcnt", "Number of memory usage hits limits.", C, _usage("memory_failcnt")),
    Family("container_memory_failures_total", "Cumulative count of memory allocation failures (page faults).", C,
           _usage("memory_page_faults")),
    Family("container_oom_events_total", "Count of out of memory events observed for the container.", C,
           _usage("oom_events")),
    Family("container_processes", "Number of processes running inside the container.", G, _usage("process_count")),
    Family("container_threads", "Number of threads running inside the container.", G, _usage("threads")),
    Family("container_threads_max", "Maximum number of threads allowed inside the container, 0 for no limit.", G,
           _usage("threads_max")),
    Family("container_file_descriptors", "Number of open file descriptors for the container.", G,
           _usage("file_descriptors")),
    Family("container_sockets", "Number of open sockets for the container.", G, _usage("sockets")),
    Family("container_spec_cpu_period", "CPU period of the container.", G, _spec("cpu_period")),
    Family("container_spec_cpu_shares", "CPU share of the container.", G, _spec("cpu_shares")),
    Family("container_spec_memory_limit_bytes", "Memory limit for the container, 0 for none.", G,
           _spec("memory_limit_in_bytes")),
    Family("container_spec_memory_swap_limit_bytes", "Memory swap limit for the container, 0 for none.", G,
           _spec("memory_swap_limit_in_bytes")),
    Family("container_start_time_seconds", "Start time of the container since unix epoch in seconds.", G,
           lambda s: _one(s.started_at // NANO if s.started_at else None)),
    Family("container_last_seen", "Last time a container was seen by the exporter.", G,
           lambda s: _one(s.usage.timestamp // NANO)),
    Family("container_fs_usage_bytes", "Number of bytes that are consumed by the container on this filesystem.", G,
           lambda s: [] if s.fs_used_bytes is None else [(("",), s.fs_used_bytes)], FS),
    Family("container_fs_limit_bytes", "Number of bytes that can be consumed by the container on this filesystem.",
           G, _fs(lambda v: v.f_blocks * v.f_frsize), FS),
    Family("container_fs_inodes_total", "Number of Inodes.", G, _fs(lambda v: v.f_files), FS),
    Family("container_fs_inodes_free", "Number of available Inodes.", G, _fs(lambda v: v.f_ffree), FS),
    Family("container_fs_reads_bytes_total", "Cumulative count of bytes read.", C, _io(lambda d: d.read_bytes), FS),
    Family("container_fs_writes_bytes_total", "Cumulative count of bytes written.", C, _io(lambda d: d.write_bytes),
           FS),
    Family("container_fs_reads_total", "Cumulative count of reads completed.", C, _io(lambda d: d.reads), FS),
    Family("container_fs_writes_total", "Cumulative count of writes completed.", C, _io(lambda d: d.writes), FS),
    Family("container_blkio_device_usage_total", "Blkio device bytes usage.", C, _blkio,
           ("device", "major", "minor", "operation")),
    Family("container_network_receive_bytes_total", "Cumulative count of bytes received.", C, _network("rx_bytes"),
           IF),
    Family("container_network_receive_errors_total", "Cumulative count of errors encountered while receiving.", C,
           _network("rx_errors"), IF),
    Family("container_network_receive_packets_total", "Cumulative count of packets received.", C,
           _network("rx_packets"), IF),
    Family("container_network_receive_packets_dropped_total",
           "Cumulative count of packets dropped while receiving.", C, _network("rx_dropped"), IF),
    Family("container_network_transmit_bytes_total", "Cumulative count of bytes transmitted.", C,
           _network("tx_bytes"), IF),
    Family("container_network_transmit_errors_total", "Cumulative count of errors encountered while transmitting.",
           C, _network("tx_errors"), IF),
    Family("container_network_transmit_packets_total", "Cumulative count of packets transmitted.", C,
           _network("tx_packets"), IF),
    Family("container_network_transmit_packets_dropped_total",
           "Cumulative count of packets dropped while transmitting.", C, _network("tx_dropped"), IF),
)
# fmt: on


def descriptors() -> list[cri.MetricDescriptor]:
    """Every metric ListPodSandboxMetrics may report."""
    return [cri.MetricDescriptor(name=f.name, help=f.help, label_keys=(*LABEL_KEYS, *f.extra_keys)) for f in FAMILIES]


def metrics(sample: Sample) -> list[cri.Metric]:
    """Every series of one pod or container."""
    timestamp = sample.usage.timestamp or time.time_ns()
    return [
        cri.Metric(
            name=family.name,
            timestamp=timestamp,
            metric_type=family.metric_type,
            label_values=[*sample.labels, *extra],
            value=cri.UInt64Value(value=max(value, 0)),
        )
        for family in FAMILIES
        for extra, value in family.series(sample)
    ]


def pod_metrics(sandbox_id: str, pod: Sample, containers: list[tuple[str, Sample]]) -> cri.PodSandboxMetrics:
    """The metrics of one pod (labelled as cAdvisor labels the pod's cgroup) and of each of its containers."""
    return cri.PodSandboxMetrics(
        pod_sandbox_id=sandbox_id,
        metrics=metrics(pod),
        container_metrics=[cri.ContainerMetrics(container_id=cid, metrics=metrics(s)) for cid, s in containers],
    )

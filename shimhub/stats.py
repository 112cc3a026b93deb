"""Resource usage of pods and containers, as the CRI stats RPCs report it.

CPU and memory come from the runtime plugin (`runtime_container_stats`, and
`runtime_sandbox_stats` where the pod has a usage of its own, such as a pod
cgroup or a VM); the writable layer from the storage driver; pod network
traffic from the pod's network namespace. CPU rates (nano-cores) are computed
from the previous sample of the same object.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from google.protobuf.message import Message

from shimhub import metrics, netns
from shimhub.errors import ShimhubError
from shimhub.hooktypes import ContainerUsage, FilesystemUsage, Pressure, PressureLine
from shimhub.records import ContainerRecord, SandboxRecord
from shimhub_proto.cri.v1 import api_pb2 as cri

if TYPE_CHECKING:
    from shimhub.node import Node

log = logging.getLogger(__name__)

_SUMMED = (
    "cpu_usage_core_nanoseconds",
    "memory_working_set_bytes",
    "memory_usage_bytes",
    "memory_rss_bytes",
    "memory_page_faults",
    "memory_major_page_faults",
    "process_count",
    "cpu_user_nanoseconds",
    "cpu_system_nanoseconds",
    "memory_cache_bytes",
    "memory_mapped_file_bytes",
    "memory_kernel_bytes",
    "memory_swap_bytes",
    "oom_events",
    "threads",
    "file_descriptors",
    "sockets",
)


def _value(number: int | None) -> cri.UInt64Value | None:
    return cri.UInt64Value(value=number) if number is not None else None


def _fields(**values: object) -> dict[str, object]:
    """Keyword arguments for a message, without the ones that are unknown (None)."""
    return {key: value for key, value in values.items() if value is not None}


def _psi(pressure: Pressure) -> cri.PsiStats:
    """The CRI's PsiStats of a resource's pressure (totals in nanoseconds)."""

    def data(line: PressureLine) -> cri.PsiData:
        return cri.PsiData(Total=line.total_ns, Avg10=line.avg10, Avg60=line.avg60, Avg300=line.avg300)

    stats = cri.PsiStats(Some=data(pressure.some))
    if pressure.full is not None:
        stats.Full.CopyFrom(data(pressure.full))
    return stats


def summed(usages: Iterable[ContainerUsage]) -> ContainerUsage:
    """The sum of several usages (a field is known when any of them knows it)."""
    total = ContainerUsage(timestamp=time.time_ns())
    for usage in usages:
        for name in _SUMMED:
            value = getattr(usage, name)
            if value is not None:
                setattr(total, name, (getattr(total, name) or 0) + value)
    return total


class StatsCollector:
    """Builds CRI stats messages and remembers the last CPU sample of each object."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._previous: dict[str, tuple[int, int]] = {}
        self._lock = threading.Lock()

    def _nano_cores(self, key: str, usage: ContainerUsage) -> int | None:
        """CPU nanoseconds per second since the previous sample of `key` (None for the first)."""
        if usage.cpu_usage_core_nanoseconds is None:
            return None
        with self._lock:
            previous = self._previous.get(key)
            self._previous[key] = (usage.timestamp, usage.cpu_usage_core_nanoseconds)
        if previous is None or usage.timestamp <= previous[0] or usage.cpu_usage_core_nanoseconds < previous[1]:
            return None
        return (usage.cpu_usage_core_nanoseconds - previous[1]) * 10**9 // (usage.timestamp - previous[0])

    def forget(self, object_id: str) -> None:
        """Drop the CPU sample of a removed pod or container."""
        with self._lock:
            self._previous.pop(object_id, None)

    def _cpu_and_memory(self, key: str, usage: ContainerUsage) -> dict[str, Message]:
        cpu = cri.CpuUsage(
            timestamp=usage.timestamp,
            **_fields(
                usage_core_nano_seconds=_value(usage.cpu_usage_core_nanoseconds),
                usage_nano_cores=_value(self._nano_cores(key, usage)),
            ),
        )
        available = (
            max(usage.memory_limit_bytes - usage.memory_working_set_bytes, 0)
            if usage.memory_limit_bytes is not None and usage.memory_working_set_bytes is not None
            else None
        )
        memory = cri.MemoryUsage(
            timestamp=usage.timestamp,
            **_fields(
                working_set_bytes=_value(usage.memory_working_set_bytes),
                available_bytes=_value(available),
                usage_bytes=_value(usage.memory_usage_bytes),
                rss_bytes=_value(usage.memory_rss_bytes),
                page_faults=_value(usage.memory_page_faults),
                major_page_faults=_value(usage.memory_major_page_faults),
            ),
        )
        if usage.cpu_pressure is not None:
            cpu.psi.CopyFrom(_psi(usage.cpu_pressure))
        if usage.memory_pressure is not None:
            memory.psi.CopyFrom(_psi(usage.memory_pressure))
        found: dict[str, Message] = {"cpu": cpu, "memory": memory}
        if usage.io_pressure is not None:
            found["io"] = cri.IoUsage(timestamp=usage.timestamp, psi=_psi(usage.io_pressure))
        return found

    def _runtime_answer(self, sandbox: SandboxRecord, hook: str, **arguments: object) -> ContainerUsage | None:
        """What the pod's runtime plugin answers to a stats hook; None when it has no such hook."""
        handler = self.node.handlers.handlers.get(sandbox.handler)
        plugin = handler.backend.plugin if handler is not None else None
        if plugin is None or not plugin.implements(hook):
            return None
        return plugin.call(hook, sandbox=sandbox, **arguments)

    def container_usage(self, sandbox: SandboxRecord, container: ContainerRecord) -> ContainerUsage:
        """What the runtime reports for a container (only a timestamp when it cannot say)."""
        usage = self._runtime_answer(sandbox, "runtime_container_stats", container=container)
        return usage or ContainerUsage(timestamp=time.time_ns())

    def container(
        self, sandbox: SandboxRecord, container: ContainerRecord, usage: ContainerUsage | None = None
    ) -> cri.ContainerStats:
        """The ContainerStats of one container."""
        usage = usage or self.container_usage(sandbox, container)
        config = container.container_config()
        stats = cri.ContainerStats(
            attributes=cri.ContainerAttributes(
                id=container.id, metadata=config.metadata, labels=config.labels, annotations=config.annotations
            ),
            **self._cpu_and_memory(container.id, usage),
        )
        if usage.memory_swap_bytes is not None:
            available = (
                max(usage.swap_limit_bytes - usage.memory_swap_bytes, 0) if usage.swap_limit_bytes is not None else None
            )
            stats.swap.CopyFrom(
                cri.SwapUsage(
                    timestamp=usage.timestamp,
                    **_fields(swap_usage_bytes=_value(usage.memory_swap_bytes), swap_available_bytes=_value(available)),
                )
            )
        layer = self._writable_layer(container)
        if layer is not None:
            stats.writable_layer.CopyFrom(
                cri.FilesystemUsage(
                    timestamp=usage.timestamp,
                    fs_id=cri.FilesystemIdentifier(mountpoint=self.node.config.storage.root),
                    used_bytes=cri.UInt64Value(value=layer.used_bytes),
                    inodes_used=cri.UInt64Value(value=layer.inodes_used),
                )
            )
        return stats

    def pod(self, sandbox: SandboxRecord) -> cri.PodSandboxStats:
        """The PodSandboxStats of one pod, with the stats of each of its containers."""
        containers = self.node.store.visible_containers(sandbox.id)
        usages = [self.container_usage(sandbox, c) for c in containers]
        usage = self._runtime_answer(sandbox, "runtime_sandbox_stats") or summed(usages)
        config = sandbox.pod_config()
        linux = cri.LinuxPodSandboxStats(
            **self._cpu_and_memory(sandbox.id, usage),
            containers=[self.container(sandbox, c, u) for c, u in zip(containers, usages, strict=True)],
        )
        if usage.process_count is not None:
            linux.process.CopyFrom(
                cri.ProcessUsage(timestamp=usage.timestamp, process_count=cri.UInt64Value(value=usage.process_count))
            )
        network = self.network(sandbox)
        if network is not None:
            linux.network.CopyFrom(network)
        return cri.PodSandboxStats(
            attributes=cri.PodSandboxAttributes(
                id=sandbox.id, metadata=config.metadata, labels=config.labels, annotations=config.annotations
            ),
            linux=linux,
        )

    def metrics(self, sandbox: SandboxRecord) -> cri.PodSandboxMetrics:
        """cAdvisor's metrics of one pod and its containers."""
        config = sandbox.pod_config()
        pod = config.metadata
        containers = self.node.store.visible_containers(sandbox.id)
        usages = [self.container_usage(sandbox, c) for c in containers]
        try:
            fs = os.statvfs(self.node.config.storage.root)
        except OSError:
            fs = None
        samples = []
        for container, usage in zip(containers, usages, strict=True):
            name = container.container_config().metadata.name
            layer = self._writable_layer(container)
            samples.append(
                (
                    container.id,
                    metrics.Sample(
                        labels=[name, container.id, container.image_name, name, pod.namespace, pod.name],
                        usage=usage,
                        resources=container.container_config().linux.resources,
                        started_at=container.state.started_at,
                        fs_used_bytes=layer.used_bytes if layer is not None else None,
                        fs=fs,
                    ),
                )
            )
        whole = metrics.Sample(
            labels=["POD", sandbox.id, "", pod.name, pod.namespace, pod.name],
            usage=self._runtime_answer(sandbox, "runtime_sandbox_stats") or summed(usages),
            started_at=sandbox.created_at,
            interfaces=self._interfaces(sandbox),
        )
        return metrics.pod_metrics(sandbox.id, whole, samples)

    def _writable_layer(self, container: ContainerRecord) -> FilesystemUsage | None:
        """What the storage driver says the container's writable layer holds (None when it cannot say)."""
        driver = self.node.storage_drivers.get(container.storage_driver)
        if driver is None or driver.plugin is None:
            return None
        try:
            return driver.plugin.call("storage_usage", container_id=container.id)
        except ShimhubError as exc:
            log.debug("no writable-layer usage for %s: %s", container.id[:12], exc)
            return None

    def _interfaces(self, sandbox: SandboxRecord) -> list[netns.InterfaceCounters]:
        """The counters of the pod's own interfaces ([] for host-network pods and released networks)."""
        if sandbox.host_network or sandbox.network_released or not sandbox.network.netns_path:
            return []
        pids = [c.state.pid for c in self.node.store.containers(sandbox.id) if c.state.pid]
        return [c for c in netns.interface_counters(sandbox.network.netns_path, pids) if c.name != "lo"]

    def network(self, sandbox: SandboxRecord) -> cri.NetworkUsage | None:
        """Traffic of the pod's own network namespace (None for host-network pods and released networks)."""
        counters = self._interfaces(sandbox)
        if not counters:
            return None
        interfaces = [
            cri.NetworkInterfaceUsage(
                name=c.name,
                rx_bytes=cri.UInt64Value(value=c.rx_bytes),
                rx_errors=cri.UInt64Value(value=c.rx_errors),
                tx_bytes=cri.UInt64Value(value=c.tx_bytes),
                tx_errors=cri.UInt64Value(value=c.tx_errors),
            )
            for c in counters
        ]
        default = next((i for i in interfaces if i.name == "eth0"), interfaces[0])
        return cri.NetworkUsage(timestamp=time.time_ns(), default_interface=default, interfaces=interfaces)

"""The node's pods and containers as NRI describes them to plugins."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shimhub.hooktypes import ContainerStatus
from shimhub.records import SANDBOX_READY, ContainerRecord, SandboxRecord
from shimhub_proto.nri import api_pb2 as nri

STATES = {
    ContainerStatus.CREATED: nri.CONTAINER_CREATED,
    ContainerStatus.RUNNING: nri.CONTAINER_RUNNING,
    ContainerStatus.EXITED: nri.CONTAINER_STOPPED,
}


def pod(sandbox: SandboxRecord) -> nri.PodSandbox:
    """A pod sandbox."""
    config = sandbox.pod_config()
    message = nri.PodSandbox(
        id=sandbox.id,
        name=config.metadata.name,
        uid=config.metadata.uid,
        namespace=config.metadata.namespace,
        labels=dict(config.labels),
        annotations=dict(config.annotations),
        runtime_handler=sandbox.handler,
        ips=list(sandbox.network.ips),
    )
    message.linux.cgroup_parent = config.linux.cgroup_parent
    return message


def container(record: ContainerRecord, spec: Mapping[str, Any] | None = None) -> nri.Container:
    """A container; with `spec`, as it is about to be created from that OCI spec."""
    config = record.container_config()
    state = record.state
    message = nri.Container(
        id=record.id,
        pod_sandbox_id=record.sandbox_id,
        name=config.metadata.name,
        state=STATES.get(state.status, nri.CONTAINER_UNKNOWN),
        labels=dict(config.labels),
        annotations=dict(config.annotations),
        pid=max(state.pid, 0),
        created_at=record.created_at,
        started_at=state.started_at,
        finished_at=state.finished_at,
        exit_code=state.exit_code,
        status_reason=state.reason,
        status_message=state.message,
    )
    if spec is None:
        message.args.extend(config.command)
        message.args.extend(config.args)
        message.env.extend(f"{pair.key}={pair.value}" for pair in config.envs)
        return message
    process = spec.get("process", {})
    message.args.extend(process.get("args", []))
    message.env.extend(process.get("env", []))
    message.annotations.update(spec.get("annotations", {}))
    for mount in spec.get("mounts", []):
        message.mounts.add(
            destination=mount["destination"],
            type=mount.get("type", ""),
            source=mount.get("source", ""),
            options=mount.get("options", []),
        )
    linux = spec.get("linux", {})
    message.linux.cgroups_path = linux.get("cgroupsPath", "")
    if "oomScoreAdj" in process:
        message.linux.oom_score_adj.value = process["oomScoreAdj"]
    resources = linux.get("resources", {})
    memory, cpu = resources.get("memory", {}), resources.get("cpu", {})
    if "limit" in memory:
        message.linux.resources.memory.limit.value = memory["limit"]
    for key in ("shares", "quota", "period"):
        if key in cpu:
            getattr(message.linux.resources.cpu, key).value = cpu[key]
    message.linux.resources.cpu.cpus = cpu.get("cpus", "")
    message.linux.resources.cpu.mems = cpu.get("mems", "")
    user = process.get("user", {})
    message.user.uid, message.user.gid = user.get("uid", 0), user.get("gid", 0)
    message.user.additional_gids.extend(user.get("additionalGids", []))
    return message


def ready(sandbox: SandboxRecord) -> bool:
    """Whether a pod is one plugins are told of at synchronization."""
    return sandbox.state == SANDBOX_READY

"""CRI messages made from records: summaries and statuses of pods and containers."""

from __future__ import annotations

from shimhub.hooktypes import ContainerState, ContainerStatus
from shimhub.records import SANDBOX_READY, ContainerRecord, SandboxRecord
from shimhub_proto.cri.v1 import api_pb2 as cri

CONTAINER_STATES = {
    ContainerStatus.CREATED: cri.CONTAINER_CREATED,
    ContainerStatus.RUNNING: cri.CONTAINER_RUNNING,
    ContainerStatus.EXITED: cri.CONTAINER_EXITED,
    ContainerStatus.UNKNOWN: cri.CONTAINER_UNKNOWN,
}


def sandbox_state(record: SandboxRecord) -> int:
    return cri.SANDBOX_READY if record.state == SANDBOX_READY else cri.SANDBOX_NOTREADY


def sandbox_summary(record: SandboxRecord) -> cri.PodSandbox:
    """The PodSandbox list entry of a sandbox."""
    config = record.pod_config()
    return cri.PodSandbox(
        id=record.id,
        metadata=config.metadata,
        state=sandbox_state(record),
        created_at=record.created_at,
        labels=config.labels,
        annotations=config.annotations,
        runtime_handler=record.handler,
    )


def sandbox_status(record: SandboxRecord) -> cri.PodSandboxStatus:
    """The PodSandboxStatus of a sandbox."""
    config = record.pod_config()
    ips = record.network.ips if not record.network_released else []
    return cri.PodSandboxStatus(
        id=record.id,
        metadata=config.metadata,
        state=sandbox_state(record),
        created_at=record.created_at,
        network=cri.PodSandboxNetworkStatus(
            ip=ips[0] if ips else "", additional_ips=[cri.PodIP(ip=ip) for ip in ips[1:]]
        ),
        linux=cri.LinuxPodSandboxStatus(
            namespaces=cri.Namespace(options=config.linux.security_context.namespace_options)
        ),
        labels=config.labels,
        annotations=config.annotations,
        runtime_handler=record.handler,
    )


def _image_spec(record: ContainerRecord, config: cri.ContainerConfig) -> cri.ImageSpec:
    """The image a container runs, named by the tag it was created from (as containerd does)."""
    if not record.image_name:
        return config.image
    return cri.ImageSpec(
        image=record.image_name,
        annotations=config.image.annotations,
        user_specified_image=config.image.user_specified_image,
        runtime_handler=config.image.runtime_handler,
    )


def container_summary(record: ContainerRecord, state: ContainerState) -> cri.Container:
    """The Container list entry of a container."""
    config = record.container_config()
    return cri.Container(
        id=record.id,
        pod_sandbox_id=record.sandbox_id,
        metadata=config.metadata,
        image=_image_spec(record, config),
        image_ref=record.image_repo_digest or record.image_ref,
        image_id=record.image_ref,
        state=CONTAINER_STATES[state.status],
        created_at=record.created_at,
        labels=config.labels,
        annotations=config.annotations,
    )


def _mounts(record: ContainerRecord, config: cri.ContainerConfig) -> list[cri.Mount]:
    """The container's mounts as requested, each image volume with the digest of the image mounted."""
    if not record.image_volumes:
        return list(config.mounts)
    volumes = iter(record.image_volumes)
    mounts = []
    for requested in config.mounts:
        mount = cri.Mount()
        mount.CopyFrom(requested)
        if mount.image.image:
            mount.image.image_ref = next(volumes).image_id
        mounts.append(mount)
    return mounts


def container_status(record: ContainerRecord, state: ContainerState) -> cri.ContainerStatus:
    """The ContainerStatus of a container."""
    config = record.container_config()
    return cri.ContainerStatus(
        id=record.id,
        metadata=config.metadata,
        state=CONTAINER_STATES[state.status],
        created_at=record.created_at,
        started_at=state.started_at,
        finished_at=state.finished_at,
        exit_code=state.exit_code,
        image=_image_spec(record, config),
        image_ref=record.image_repo_digest or record.image_ref,
        image_id=record.image_ref,
        reason=state.reason,
        message=state.message,
        labels=config.labels,
        annotations=config.annotations,
        mounts=_mounts(record, config),
        log_path=record.log_path,
        resources=cri.ContainerResources(linux=config.linux.resources),
        stop_signal=config.stop_signal,
        user=cri.ContainerUser(
            linux=cri.LinuxContainerUser(
                uid=record.user.uid,
                gid=record.user.gid,
                supplemental_groups=sorted({record.user.gid, *record.user.additional_gids}),
            )
        ),
    )


def current_status(record: ContainerRecord) -> cri.ContainerStatus:
    return container_status(record, record.state)


def status_key(record: ContainerRecord) -> tuple[object, ...]:
    """What a container's status is made of that can change: its state and its config (new resources)."""
    return (record.state, record.container_config())


#: PodSandboxStatusResponse.timestamp's tag (field 4, varint).
TIMESTAMP_TAG = bytes([4 << 3])

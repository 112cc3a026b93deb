"""The records shimhub keeps of every pod sandbox and container.

A record is what survives a restart: it is persisted as JSON by the state
store each time it changes. CRI configs are kept as protobuf JSON so that
status calls and plugins after a restart see exactly what the kubelet sent.
"""

from __future__ import annotations

from typing import Any

from attrs import define, field
from google.protobuf import json_format

from shimhub.hooktypes import ContainerState, ContainerStatus, Pod, PodNetwork
from shimhub.users import User
from shimhub_proto.cri.v1 import api_pb2 as cri

SANDBOX_READY = "ready"
SANDBOX_NOTREADY = "notready"


def proto_to_dict(message: Any) -> dict[str, Any]:
    """A protobuf message as JSON-ready data with the schema's field names."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


#: `pending` values: a creation or a removal that had not finished when the record was saved.
PENDING_CREATE, PENDING_REMOVE = "create", "remove"


@define
class SandboxRecord:
    """One pod sandbox."""

    id: str
    #: The unique CRI name: <pod>_<namespace>_<uid>_<attempt>.
    name: str
    handler: str
    created_at: int
    #: The PodSandboxConfig the kubelet sent, as protobuf JSON.
    config: dict[str, Any]
    #: Digest of the RunPodSandbox request, to recognise a kubelet's retry.
    request_digest: str = ""
    state: str = SANDBOX_NOTREADY
    network: PodNetwork = field(factory=PodNetwork)
    #: Whether the network backend's teardown has run since the last setup.
    network_released: bool = False
    #: Whatever the runtime plugin chose to keep (JSON-serialisable).
    runtime_data: dict[str, Any] = field(factory=dict)
    #: The change under way when the record was saved: PENDING_CREATE, PENDING_REMOVE or "".
    #: After a crash, shimhub rolls back an unfinished creation and finishes a removal.
    pending: str = ""
    #: The directory where the pod's own user, IPC and UTS namespaces are pinned ("": the node's user
    #: namespace). Runtimes join them; the network namespace is the backend's, owned by that user namespace.
    user_namespace: str = ""
    #: What the core set up for the pod: its namespaces and files (None: not yet, or a plugin of API 1.x).
    pod: Pod | None = None

    #: `config` parsed, kept for the list and status calls (not persisted).
    _parsed: cri.PodSandboxConfig | None = field(default=None, init=False, eq=False, repr=False)

    def pod_config(self) -> cri.PodSandboxConfig:
        """The sandbox's PodSandboxConfig, parsed once: treat it as read-only."""
        if self._parsed is None:
            self._parsed = json_format.ParseDict(self.config, cri.PodSandboxConfig())
        return self._parsed

    @property
    def host_network(self) -> bool:
        """Whether the pod uses the node's network namespace."""
        options = self.config.get("linux", {}).get("security_context", {}).get("namespace_options", {})
        return options.get("network") == "NODE"


@define
class ImageVolume:
    """An image mounted read-only into a container (a CRI Mount with `image` set)."""

    #: The image's id (kept in use, so RemoveImage cannot take its layers).
    image_id: str
    #: The storage driver's id of the volume's filesystem, and where it is mounted on the node.
    storage_id: str
    path: str = ""


@define
class ContainerRecord:
    """One container."""

    id: str
    sandbox_id: str
    #: The unique CRI name: <container>_<pod>_<namespace>_<uid>_<attempt>.
    name: str
    created_at: int
    #: The ContainerConfig the kubelet sent, as protobuf JSON.
    config: dict[str, Any]
    #: Absolute path of the container's CRI log ("" when the kubelet asked for none).
    log_path: str = ""
    #: Its pod's runtime handler, kept so that a pod whose record is lost can be removed ("" in older records).
    handler: str = ""
    request_digest: str = ""
    #: The image's id (config digest).
    image_ref: str = ""
    #: The image's tag the container was created from, and a repository digest of it (for the CRI's
    #: ContainerStatus.image and image_ref); empty for records written before they were kept.
    image_name: str = ""
    image_repo_digest: str = ""
    #: Who the container's process runs as, resolved from the CRI config and the image at creation.
    user: User = field(factory=User)
    #: The signal that asks it to stop: the CRI config's, else the image's, else SIGTERM ("" in records
    #: written before shimhub chose it; then SIGTERM).
    stop_signal: str = ""
    #: The CDI devices injected into its spec, as named in its config.
    cdi_devices: list[str] = field(factory=list)
    #: Images mounted into the container, in the order of their mounts.
    image_volumes: list[ImageVolume] = field(factory=list)
    #: Mount point of the root filesystem ("" for a container without an image).
    rootfs: str = ""
    #: The storage driver holding the root filesystem.
    storage_driver: str = ""
    state: ContainerState = field(factory=lambda: ContainerState(status=ContainerStatus.CREATED))
    runtime_data: dict[str, Any] = field(factory=dict)
    #: As for sandboxes: PENDING_CREATE, PENDING_REMOVE or "".
    pending: str = ""

    #: `config` parsed, kept for the list and status calls (not persisted).
    _parsed: cri.ContainerConfig | None = field(default=None, init=False, eq=False, repr=False)

    @property
    def removing(self) -> bool:
        """RemoveContainer was answered: the CRI no longer sees it, its removal finishes in the background."""
        return self.pending == PENDING_REMOVE

    def container_config(self) -> cri.ContainerConfig:
        """The container's ContainerConfig, parsed once: treat it as read-only."""
        if self._parsed is None:
            self._parsed = json_format.ParseDict(self.config, cri.ContainerConfig())
        return self._parsed

    def set_resources(self, resources: cri.LinuxContainerResources) -> None:
        """Record new resource limits in the config (UpdateContainerResources)."""
        self.config.setdefault("linux", {})["resources"] = proto_to_dict(resources)
        self._parsed = None

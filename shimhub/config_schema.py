"""The configuration's schema: what each table and key of shimhub's TOML files holds, with its default.

`shimhub.config` reads the files into these classes and checks the values.
"""

from __future__ import annotations

from typing import Any

from attrs import define, field


@define(frozen=True)
class HandlerConfig:
    """One runtime handler: the name a RuntimeClass refers to, bound to a runtime plugin."""

    plugin: str
    #: Options handed to the plugin as they are; the plugin validates them.
    options: dict[str, Any] = field(factory=dict)
    #: Storage driver for this handler's containers ("" = the global one).
    storage_driver: str = ""
    #: Whether a pod may pick this handler with the handler annotation.
    selectable: bool = False
    #: Annotation prefixes of pods that this handler's plugin may see.
    allowed_annotations: list[str] = field(factory=list)
    #: A privileged container of this handler does not get the host's device nodes (for VM or gVisor
    #: handlers, where "privileged" must not mean the node's devices; containerd's and CRI-O's name).
    privileged_without_host_devices: bool = False
    #: Device nodes are owned by the container's user and group instead of the host's owner (so that a
    #: non-root container can open a device it was given; containerd's and CRI-O's name).
    device_ownership_from_security_context: bool = False


@define(frozen=True)
class StorageConfig:
    """The storage driver that holds image layers and container root filesystems."""

    driver: str = "overlay"
    root: str = "/var/lib/shimhub/storage"
    options: dict[str, Any] = field(factory=dict)


@define(frozen=True)
class RegistryConfig:
    """How to reach one registry host."""

    #: Plain http instead of https (only ever where configured).
    insecure: bool = False
    #: Hosts tried in order before this one, each reached per its own [images.registries.<host>] table.
    mirrors: list[str] = field(factory=list)
    #: Reach this registry only through its mirrors, never itself (an air-gapped node).
    mirror_only: bool = False
    #: Refuse every pull from this registry (registries.conf's `blocked`).
    blocked: bool = False
    #: A PEM file of the CA certificates this host's TLS certificate is checked against ("" = the system's).
    ca_file: str = ""
    #: Do not check this host's TLS certificate (containerd's skip_verify; still TLS, unlike insecure).
    skip_verify: bool = False


@define(frozen=True)
class ImagesConfig:
    """Image pulls and the image store."""

    #: Registries that short names ("busybox") resolve through; more than one is refused as ambiguous.
    search_registries: list[str] = field(factory=lambda: ["docker.io"])
    #: A Docker-style credentials file ({"auths": {"host": {"auth": base64(user:password)}}}), "" for none.
    credentials_file: str = ""
    #: The node's global containers-auth.json(5) file, read when present, for hosts credentials_file does
    #: not name ("" = none).
    auth_file: str = "/etc/containers/auth.json"
    #: containers-registries.conf(5) v2 with its .d directory, read when present ("" = not read).
    registries_conf: str = "/etc/containers/registries.conf"
    #: containerd's hosts directory (<dir>/<registry host>/hosts.toml), read when present ("" = not read).
    hosts_dir: str = "/etc/containerd/certs.d"
    #: Layers downloaded at once per pull.
    max_concurrent_downloads: int = 3
    #: Platform to pick from multi-platform images ("" = this node's, e.g. linux/amd64).
    platform: str = ""
    #: Seconds to wait for a registry to answer (per request, not per whole download).
    timeout: float = 30.0
    #: Most bytes one layer may unpack to (0 = no limit): a small gzip of zeros must not fill the disk.
    max_layer_bytes: int = 32 << 30
    #: Most layers an image may have: one with more is refused before its blobs are fetched (an overlay
    #: mount cannot stack many more; moby refuses more than 127 too).
    max_layers: int = 128
    #: The image trust policy (containers-policy.json(5)); unset: CRI-O's /etc/containers/policy.json when
    #: present, else none; "" for none (every image may be pulled).
    signature_policy: str | None = None
    #: Signature storage by registry and repository (registries.d(5) YAML files), read at each verification.
    registries_d: str = "/etc/containers/registries.d"
    registries: dict[str, RegistryConfig] = field(factory=dict)


@define(frozen=True)
class NetworkConfig:
    """The network backend that gives pods their network."""

    backend: str = "cni"
    options: dict[str, Any] = field(factory=dict)


@define(frozen=True)
class StreamingConfig:
    """The streaming server that Exec, Attach and PortForward hand the kubelet to."""

    #: host:port to listen on (port 0 picks a free one). The kubelet proxies
    #: streams, so loopback is right unless clients must reach it directly.
    address: str = "127.0.0.1:0"
    #: Seconds a URL from Exec, Attach or PortForward stays valid.
    token_ttl: float = 60.0
    #: Seconds a SPDY client gets to open all the streams of a session.
    stream_creation_timeout: float = 30.0
    #: Seconds without data either way after which a session is closed (0: never), as the kubelet's 4 h.
    idle_timeout: float = 14400.0


@define(frozen=True)
class UserNamespacesConfig:
    """Pods with hostUsers: false, each in a user namespace of its own."""

    #: The first host uid/gid the kubelet's mappings may use, and how many from there. By default
    #: from 65536, where the kubelet's ranges start, to the last id: a CRI client cannot map a pod
    #: onto the node's own users (root, daemons, people). Lower it only for a client that needs to.
    first_host_id: int = 65536
    host_id_count: int = (1 << 32) - 65536
    #: Where such pods' root filesystems and volumes are bound for their runtime to reach: the
    #: directory and its parents must be searchable by others (the runtime is no one special on the
    #: host once in the pod's user namespace), so it is not under run_dir (0750).
    mount_dir: str = "/run/shimhub-idmapped"


@define(frozen=True)
class CheckpointsConfig:
    """CheckpointContainer and restores from its archives."""

    #: The container goes on running after its checkpoint (CRI-O's default); false stops it.
    leave_running: bool = True
    #: Seconds a checkpoint may take when the request gives no timeout.
    default_timeout: float = 300.0
    #: Most bytes an archive to restore from may unpack to (0: no limit of its own); never more than half
    #: of what is free on the state disk, where it is unpacked.
    max_archive_bytes: int = 4 << 30


#: What NRI plugins may adjust, by the names [nri] allowed_adjustments uses.
NRI_ADJUSTMENTS = (
    "annotations", "mounts", "env", "hooks", "devices", "cdi_devices", "resources", "rlimits", "args", "oom_score_adj",
    "sysctl",
)  # fmt: skip


@define(frozen=True)
class NriConfig:
    """NRI: the node's NRI plugins, connected over a socket or started by shimhub."""

    enable: bool = False
    #: Where plugins connect ("" for none: only the plugins shimhub starts).
    socket: str = "/var/run/nri/nri.sock"
    #: Plugins shimhub starts, executables named <index>-<name> (two digits, then the name).
    plugin_path: str = "/opt/nri/plugins"
    #: A plugin's configuration: <index>-<name>.conf or <name>.conf here.
    plugin_config_path: str = "/etc/nri/conf.d"
    #: Seconds a plugin has to register once connected and to synchronize (containerd's name), and to answer
    #: any other request.
    registration_timeout: float = 5.0
    request_timeout: float = 2.0
    #: A plugin that does not answer CreateContainer in time, or crashes, is disconnected; by default the
    #: container then fails (DEADLINE_EXCEEDED or UNAVAILABLE), with fail_open it is created without it.
    fail_open: bool = False
    #: What plugins may adjust in a container being created.
    allowed_adjustments: list[str] = field(
        factory=lambda: [
            "annotations",
            "mounts",
            "env",
            "hooks",
            "devices",
            "cdi_devices",
            "resources",
            "rlimits",
            "args",
            "oom_score_adj",
            "sysctl",
        ]
    )


@define(frozen=True)
class Config:
    """The effective configuration of one shimhub instance."""

    socket: str = "/run/shimhub/shimhub.sock"
    state_dir: str = "/var/lib/shimhub"
    run_dir: str = "/run/shimhub"
    log_level: str = "info"
    cgroup_driver: str = "cgroupfs"
    default_runtime: str = "runc"
    untrusted_runtime: str = ""
    handler_annotation: str = "shimhub.io/runtime-handler"
    runtimes: dict[str, HandlerConfig] = field(factory=dict)
    storage: StorageConfig = field(factory=StorageConfig)
    network: NetworkConfig = field(factory=NetworkConfig)
    images: ImagesConfig = field(factory=ImagesConfig)
    #: Names of extension plugins (entry point group ``shimhub.extension``) to load.
    extensions: list[str] = field(factory=list)
    #: Seconds in-flight RPCs get to finish on SIGTERM.
    shutdown_grace: float = 10.0
    #: host:port of the HTTP endpoint serving Prometheus metrics and inspect data ("" = off).
    metrics_address: str = ""
    streaming: StreamingConfig = field(factory=StreamingConfig)
    user_namespaces: UserNamespacesConfig = field(factory=UserNamespacesConfig)
    checkpoints: CheckpointsConfig = field(factory=CheckpointsConfig)
    nri: NriConfig = field(factory=NriConfig)
    #: Give containers that set no seccomp profile the runtime default one (the CRI says unconfined).
    seccomp_use_default_when_empty: bool = False
    #: The only directory Localhost seccomp profiles are read from (e.g. the kubelet's <root-dir>/seccomp);
    #: "": any absolute path, as containerd and CRI-O accept (the kubelet sends one under its --root-dir).
    seccomp_profile_root: str = ""
    #: Inject the CDI devices containers ask for (containerd's name); off: such a container is refused.
    enable_cdi: bool = True
    #: Where CDI spec files are read from; a later directory's device replaces an earlier one's.
    cdi_spec_dirs: list[str] = field(factory=lambda: ["/etc/cdi", "/var/run/cdi"])

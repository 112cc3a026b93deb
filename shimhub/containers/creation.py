"""CreateContainer: validation, root filesystem and image volumes, the finished spec, the runtime's create."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shimhub import cdi, checkpoints, logpaths, oci, profiles, resources, userns, users
from shimhub.containers.base import ContainerBase
from shimhub.errors import FailedPrecondition, InvalidArgument, NotFound
from shimhub.faults import crash_point
from shimhub.hooktypes import ContainerStatus
from shimhub.names import new_id
from shimhub.records import PENDING_CREATE, SANDBOX_READY, ContainerRecord, ImageVolume, SandboxRecord, proto_to_dict
from shimhub.unpack import APPLY, unpack
from shimhub.validation import check_identity, check_mounts
from shimhub_proto.cri.v1 import api_pb2 as cri

if TYPE_CHECKING:
    from shimhub.backends import Backend
    from shimhub.handlers import Handler
    from shimhub.images.store import ImageRecord
    from shimhub.plugins import LoadedPlugin


log = logging.getLogger(__name__)


def _hex(digest: str) -> str:
    return digest.removeprefix("sha256:")


def container_name(metadata: cri.ContainerMetadata, pod: cri.PodSandboxMetadata) -> str:
    """The unique CRI name of a container."""
    return f"{metadata.name}_{pod.name}_{pod.namespace}_{pod.uid}_{metadata.attempt}"


def _image_mounts_to_binds(config: cri.ContainerConfig, volumes: list[ImageVolume]) -> None:
    """Turn the image mounts of `config` into read-only binds of the volumes' filesystems (in mount order)."""
    mounted = iter(volumes)
    for mount in config.mounts:
        if not mount.image.image:
            continue
        root = next(mounted).path
        source = root
        if mount.image_sub_path:
            source = _inside(root, mount.image_sub_path, mount.container_path)
        mount.ClearField("image")
        mount.ClearField("image_sub_path")
        mount.host_path = source
        mount.readonly = True
        mount.propagation = cri.PROPAGATION_PRIVATE


def _inside(root: str, sub_path: str, container_path: str) -> str:
    """`sub_path` of an image volume: relative, no "..", no symlink on the way, and present."""
    where = f"image volume at {container_path[:256]!r}: image_sub_path {sub_path[:256]!r}"
    parts = [part for part in sub_path.split("/") if part and part != "."]
    if sub_path.startswith("/") or ".." in parts:
        raise InvalidArgument(f"{where} must be a relative path without '..'")
    current = root
    for part in parts:
        current = os.path.join(current, part)
        try:
            info = os.lstat(current)
        except OSError:
            raise InvalidArgument(f"{where} does not exist in the image") from None
        if stat.S_ISLNK(info.st_mode):
            raise InvalidArgument(f"{where} goes through a symbolic link")
    return current


class Creation(ContainerBase):
    """CreateContainer."""

    def create(self, sandbox_id: str, config: cri.ContainerConfig, digest: str, wait: float | None) -> str:
        """Create a container in a ready sandbox; return its id."""
        node = self.node
        sandbox = node.store.sandbox(sandbox_id)
        if sandbox.state != SANDBOX_READY:
            raise FailedPrecondition(f"pod sandbox {sandbox.id} is not ready")
        if not config.metadata.name:
            raise InvalidArgument("container metadata.name is empty")
        archive = ""
        if checkpoints.is_reference(config.image.image):
            archive = config.image.image
            if not node.handlers.get(sandbox.handler).installed().implements("runtime_container_restore"):
                raise FailedPrecondition(f"runtime handler {sandbox.handler!r} cannot restore checkpointed containers")
            config = checkpoints.restored_config(config, checkpoints.read_config(archive))
        check_identity(config.linux.security_context, "container")
        pod_options = sandbox.pod_config().linux.security_context.namespace_options
        userns.check_container(config, userns.requested(pod_options, "pod sandbox"))
        profiles.check_lsm(config.linux.security_context, config.metadata.name)
        handler = node.handlers.get(sandbox.handler)
        check_mounts(config, handler.backend.setup_readiness.features.recursive_read_only_mounts)
        pod_config = sandbox.pod_config()
        log_path = logpaths.resolve(pod_config.log_directory, config.log_path)
        name = container_name(config.metadata, pod_config.metadata)

        def create() -> str:
            return self._create(sandbox, config, name, log_path, digest, archive=archive)

        def reusable(container_id: str) -> bool:
            found = self.node.store.container(container_id, missing_ok=True)
            return found is not None and not found.removing and found.state.status == ContainerStatus.CREATED

        return node.container_names.create(name, digest, create, reusable, wait)

    def _create(
        self,
        sandbox: SandboxRecord,
        config: cri.ContainerConfig,
        name: str,
        log_path: str,
        digest: str,
        *,
        archive: str,
    ) -> str:
        """Create a container; from the checkpoint archive at `archive` when not ""."""
        node = self.node
        handler = node.handlers.get(sandbox.handler)
        plugin = handler.require()
        image = node.images.images.find(config.image.image) if config.image.image else None
        if config.image.image and image is None:
            raise NotFound(f"image {config.image.image!r} is not present on the node; pull it first")
        names = (
            node.images.images.names(image, config.image.user_specified_image, config.image.image)
            if image
            else ("", "")
        )
        volumes = self._volume_images(config)
        record = ContainerRecord(
            id=new_id(),
            sandbox_id=sandbox.id,
            name=name,
            handler=sandbox.handler,
            created_at=time.time_ns(),
            config=proto_to_dict(config),
            log_path=log_path,
            request_digest=digest,
            image_ref=image.id if image else "",
            image_name=names[0],
            image_repo_digest=names[1],
            stop_signal=oci.container.stop_signal(config, image.config if image else {}),
            pending=PENDING_CREATE,
        )
        plugin_config = cri.ContainerConfig()
        plugin_config.CopyFrom(config)
        plugin_config.annotations.clear()
        plugin_config.annotations.update(handler.allowed_annotations(config.annotations))
        resources.fit(plugin_config.linux.resources)
        profiles.settle_seccomp(
            plugin_config.linux.security_context,
            default_when_empty=node.config.seccomp_use_default_when_empty,
            profile_root=node.config.seccomp_profile_root or "/",
            copies=Path(node.config.run_dir, "seccomp"),
        )
        idmapped = userns.IdmappedBinds.of(node.config.user_namespaces.mount_dir, record.id, sandbox)
        with node.locks.hold(sandbox.id), node.locks.hold(record.id):
            if sandbox.state != SANDBOX_READY:
                raise FailedPrecondition(f"pod sandbox {sandbox.id} stopped while the container was being created")
            driver = None
            if image is not None or volumes:
                record.storage_driver, driver = node.storage_for(sandbox.handler)
            node.store.save_container(record)
            crash_point("create_container:saved")
            try:
                self._provide_filesystems(record, image, volumes, driver, idmapped)
                record.user = users.resolve(
                    record.rootfs, config.linux.security_context, image.user_spec() if image else ""
                )
                if idmapped is not None:
                    idmapped.map_volumes(plugin_config)
                _image_mounts_to_binds(plugin_config, record.image_volumes)
                node.store.save_container(record)
                arguments = self._runtime_arguments(sandbox, record, plugin_config, image, handler)
                if archive:
                    arguments["checkpoint"], arguments["checkpointed_spec"] = self._unpack_checkpoint(record, archive)
                plugin.call("runtime_container_restore" if archive else "runtime_container_create", **arguments)
                crash_point("create_container:runtime")
                record.pending = ""
                node.store.save_container(record)
            except BaseException:
                self._undo(sandbox, record)
                raise
        node.emit("container_created", sandbox, record)
        return record.id

    def _provide_filesystems(
        self,
        record: ContainerRecord,
        image: ImageRecord | None,
        volumes: list[ImageRecord],
        driver: Backend | None,
        idmapped: userns.IdmappedBinds | None,
    ) -> None:
        """Mount the container's root filesystem (when it has an image) and its image volumes."""
        if image is not None:
            assert driver is not None
            self.node.images.provide_layers(image, record.storage_driver, driver)
            storage = driver.require()
            storage.call("storage_rootfs_create", container_id=record.id, layer_id=_hex(image.top_layer))
            record.rootfs = self._mount_rootfs(storage, record.id, idmapped)
            crash_point("create_container:rootfs")
        for number, volume_image in enumerate(volumes):
            assert driver is not None
            self._mount_image_volume(record, volume_image, number, driver, idmapped)

    def _runtime_arguments(
        self,
        sandbox: SandboxRecord,
        record: ContainerRecord,
        config: cri.ContainerConfig,
        image: ImageRecord | None,
        handler: Handler,
    ) -> dict[str, Any]:
        """What the runtime's create hook is called with: the finished spec, or for a runtime of API 1.x,
        which builds its own, the root filesystem and the image's config."""
        arguments: dict[str, Any] = {"sandbox": sandbox, "container": record, "config": config}
        if record.log_path:
            logpaths.make_directory(record.log_path)
        if not handler.installed().builds_own_spec:
            arguments["spec"] = self._finished_spec(sandbox, record, config, image, handler)
            return arguments
        if cdi.requested(record.container_config()):
            raise FailedPrecondition(
                f"runtime handler {handler.name!r} (plugin API 1.x) builds its own specs: it cannot be handed CDI "
                "devices"
            )
        return {**arguments, "rootfs": record.rootfs, "image": image.config if image else {}}

    def _finished_spec(
        self,
        sandbox: SandboxRecord,
        record: ContainerRecord,
        config: cri.ContainerConfig,
        image: ImageRecord | None,
        handler: Handler,
    ) -> dict[str, Any]:
        """The container's OCI spec as its runtime gets it: built, its CDI devices injected, then adjusted by the
        extensions and NRI."""
        policy = oci.devices.Policy(
            host_devices=not handler.config.privileged_without_host_devices,
            owned_by_user=handler.config.device_ownership_from_security_context,
        )
        spec = oci.container.build(
            sandbox,
            record,
            config,
            image.config if image else {},
            self.node.config.cgroup_driver,
            handler.spec_options,
            policy,
        )
        devices = cdi.requested(record.container_config())
        if devices:
            self._check_cdi(handler, devices)
            self.node.cdi.inject(spec, devices)
            record.cdi_devices = devices
        self.node.extensions.adjust_oci_spec(sandbox, record, spec)
        return spec

    def _check_cdi(self, handler: Handler, devices: list[str]) -> None:
        """FailedPrecondition unless the handler's containers may get CDI devices."""
        named = ", ".join(devices)[:512]
        if not self.node.config.enable_cdi:
            raise FailedPrecondition(f"the container asks for CDI devices ({named}) but enable_cdi is false")
        if handler.spec_options.guest:
            raise FailedPrecondition(
                f"runtime handler {handler.name!r} runs containers in VMs, which cannot be handed CDI devices ({named})"
            )

    def roll_back(self, record: ContainerRecord) -> None:
        """Undo the creation of a container that a crash interrupted (after a restart)."""
        with self.node.locks.hold(record.id):
            self._undo(self._sandbox_of(record), record)
        self.node.container_names.release(record.name, record.id)
        log.warning("container %s (%s): creation interrupted by a crash, rolled back", record.id[:12], record.name)

    def _undo(self, sandbox: SandboxRecord, record: ContainerRecord) -> None:
        """Best-effort removal of a container whose creation failed."""
        try:
            self.node.handlers.get(sandbox.handler).installed().call(
                "runtime_container_remove", sandbox=sandbox, container=record
            )
        except Exception:
            log.exception("cleanup of failed container %s: runtime removal failed", record.id[:12])
        try:
            self._remove_files(record)
        except Exception:
            log.exception("cleanup of failed container %s: root filesystem removal failed", record.id[:12])
        if record.log_path:  # the kubelet counts attempts from the log files it finds
            with contextlib.suppress(FileNotFoundError):
                os.unlink(record.log_path)
        self.node.store.delete_container(record.id)

    def _volume_images(self, config: cri.ContainerConfig) -> list[ImageRecord]:
        """The images of the container's image volumes, each present on the node (else NotFound naming it)."""
        found = []
        for mount in config.mounts:
            if not mount.image.image:
                continue
            if mount.host_path:
                raise InvalidArgument(f"mount at {mount.container_path[:256]!r} sets both host_path and image")
            if not mount.readonly:
                raise InvalidArgument(
                    f"image volume at {mount.container_path[:256]!r} has readonly = false: image volumes are read-only"
                )
            volume_image = self.node.images.images.find(mount.image.image)
            if volume_image is None:
                raise NotFound(
                    f"image volume at {mount.container_path[:256]!r}: image {mount.image.image[:256]!r} is not "
                    "present on the node; pull it first"
                )
            found.append(volume_image)
        return found

    def _unpack_checkpoint(self, record: ContainerRecord, archive: str) -> tuple[str, dict[str, Any]]:
        """Unpack a checkpoint archive for a container created from it, its file changes onto its root
        filesystem; the directory of the process images, and the OCI spec the checkpointed container ran."""
        node = self.node
        work = checkpoints.working_directory(node.config.state_dir, record.id)
        limit = checkpoints.archive_limit(node.config.state_dir, node.config.checkpoints.max_archive_bytes)
        checkpoints.unpack_archive(archive, work, limit)
        diff = work / checkpoints.ROOTFS_DIFF
        if diff.exists() and record.rootfs:
            with diff.open("rb") as changes:
                unpack(changes, record.rootfs, APPLY)
        log.info("container %s restored from checkpoint %s", record.id[:12], archive[:256])
        return str(work / checkpoints.IMAGES), checkpoints.read_spec(work)

    @staticmethod
    def _mount_rootfs(storage: LoadedPlugin, storage_id: str, idmapped: userns.IdmappedBinds | None) -> str:
        """Mount a root filesystem of the storage driver; ID-mapped for a pod in its own user namespace."""
        if idmapped is None:
            return str(storage.call("storage_rootfs_mount", container_id=storage_id))
        if storage.implements("storage_rootfs_mount_idmapped"):
            mounted = storage.call(
                "storage_rootfs_mount_idmapped",
                container_id=storage_id,
                user_namespace=idmapped.user_namespace,
                root=idmapped.root,
            )
            return idmapped.bind(mounted, f"rootfs-{storage_id}", mapped=False)  # where the runtime reaches it
        mounted = storage.call("storage_rootfs_mount", container_id=storage_id)
        return idmapped.bind(mounted, f"rootfs-{storage_id}")

    def _mount_image_volume(
        self,
        record: ContainerRecord,
        image: ImageRecord,
        number: int,
        driver: Backend,
        idmapped: userns.IdmappedBinds | None,
    ) -> None:
        """Give the container a filesystem of `image`'s layers, to be bind-mounted read-only."""
        storage = driver.require()
        self.node.images.provide_layers(image, record.storage_driver, driver)
        volume = ImageVolume(image_id=image.id, storage_id=f"{record.id}-image-volume-{number}")
        record.image_volumes.append(volume)
        self.node.store.save_container(record)  # a crash from here on rolls the volume back too
        storage.call("storage_rootfs_create", container_id=volume.storage_id, layer_id=_hex(image.top_layer))
        volume.path = self._mount_rootfs(storage, volume.storage_id, idmapped)

"""Container lifecycle: create, start, stop, remove, status refresh and exec."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from shimhub import checkpoints, oci, profiles, resources, userns, users
from shimhub.background import Coalesced
from shimhub.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PluginFailed,
)
from shimhub.faults import crash_point
from shimhub.hooktypes import STDERR, STDOUT, ContainerState, ContainerStatus, ExecResult, StreamedProcess
from shimhub.names import new_id
from shimhub.records import (
    PENDING_CREATE,
    PENDING_REMOVE,
    SANDBOX_READY,
    ContainerRecord,
    ImageVolume,
    SandboxRecord,
    proto_to_dict,
)
from shimhub.streaming.requests import CommandRequest
from shimhub.unpack import APPLY, unpack
from shimhub.validation import check_identity, check_mounts
from shimhub_proto.cri.v1 import api_pb2 as cri

if TYPE_CHECKING:
    from shimhub.backends import Backend
    from shimhub.handlers import Handler
    from shimhub.images.store import ImageRecord
    from shimhub.node import Node
    from shimhub.plugins import LoadedPlugin

log = logging.getLogger(__name__)

#: Seconds ReopenContainerLog waits for the runtime to make the new log file.
REOPEN_WAIT = 5.0
#: Seconds a container has to exit after SIGKILL before StopContainer gives up.
KILL_WAIT = 10.0
#: Most output ExecSync returns per stream; the rest is dropped (as the CRI asks). Both streams together
#: stay under the 16 MiB message limit of the kubelet's CRI client.
EXEC_OUTPUT_LIMIT = 8 * 1024 * 1024 - 64 * 1024


def collect(process: StreamedProcess, timeout: float | None, limit: int) -> ExecResult:
    """Read an exec'd process's output until it ends, keeping at most `limit` bytes a stream; its exit code.

    Past `timeout` seconds the process is closed (killed, and gone when close returns) and the result
    says it timed out.
    """
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        process.close()

    timer = threading.Timer(timeout, expire) if timeout is not None else None
    if timer is not None:
        timer.daemon = True
    kept = {STDOUT: bytearray(), STDERR: bytearray()}
    code: int | None = None
    try:
        if timer is not None:
            timer.start()
        while True:
            stream, data = process.read_output()
            if not data:
                break
            room = limit - len(kept[stream])
            if room > 0:
                kept[stream] += data[:room]
        if not expired.is_set():
            code = process.wait()
    except Exception:
        if not expired.is_set():  # a process closed for its timeout may be gone, or half gone, already
            raise
    finally:
        if timer is not None:
            timer.cancel()
            if expired.is_set():
                timer.join()  # the kill under way on the timer's thread ends before the answer goes out
        process.close()
    if expired.is_set():
        return ExecResult(exit_code=-1, timed_out=True)
    return ExecResult(exit_code=code or 0, stdout=bytes(kept[STDOUT]), stderr=bytes(kept[STDERR]))


def _hex(digest: str) -> str:
    return digest.removeprefix("sha256:")


def container_name(metadata: cri.ContainerMetadata, pod: cri.PodSandboxMetadata) -> str:
    """The unique CRI name of a container."""
    return f"{metadata.name}_{pod.name}_{pod.namespace}_{pod.uid}_{metadata.attempt}"


def resolve_log_path(log_directory: str, log_path: str) -> str:
    """The absolute log file for `log_path` under the pod's `log_directory`.

    The directory must be absolute, neither may hold "..", no symlink may lead out of the
    directory, and the file itself may not be a symlink (the runtime opens it as root).
    """
    if not log_path:
        return ""
    if not log_directory:
        raise InvalidArgument("log_path is set but the pod sandbox has no log_directory")
    if not os.path.isabs(log_directory) or ".." in log_directory.split("/"):
        raise InvalidArgument(f"log_directory {log_directory[:256]!r} must be absolute, without '..'")
    if os.path.isabs(log_path) or ".." in log_path.split("/"):
        raise InvalidArgument(f"log_path {log_path[:256]!r} must be relative to the pod's log_directory, without '..'")
    base = os.path.normpath(log_directory)
    full = os.path.normpath(os.path.join(base, log_path))
    if full == base:
        raise InvalidArgument(f"log_path {log_path[:256]!r} names the log directory itself")
    real_base = os.path.realpath(base)
    real_parent = os.path.realpath(os.path.dirname(full))
    if os.path.commonpath([real_base, real_parent]) != real_base:
        raise InvalidArgument(f"log_path {log_path[:256]!r} leads out of the pod's log_directory through a symlink")
    if os.path.islink(full):
        raise InvalidArgument(f"log_path {log_path[:256]!r} is a symlink")
    return full


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


def _escalate(plugin: LoadedPlugin, sandbox: SandboxRecord, record: ContainerRecord, timeout: int) -> None:
    """Stop a running container as every runtime must: its stop signal and `timeout` seconds to exit (none
    when 0), then SIGKILL to all its processes and KILL_WAIT seconds; DeadlineExceeded if it outlives both."""
    stop_signal = record.stop_signal or record.runtime_data.get("stop_signal") or "SIGTERM"
    steps = [(stop_signal, float(timeout)), ("SIGKILL", KILL_WAIT)] if timeout > 0 else [("SIGKILL", KILL_WAIT)]
    for name, wait in steps:
        plugin.call("runtime_container_kill", sandbox=sandbox, container=record, signal=name)
        if plugin.call("runtime_container_wait", sandbox=sandbox, container=record, timeout=wait):
            return
    raise DeadlineExceeded(f"container {record.id} did not exit within {KILL_WAIT:g} s of SIGKILL")


def exit_reason(exit_code: int) -> str:
    """The CRI reason of an exit a runtime gave none for ("OOMKilled" is the runtime's to say)."""
    return "Completed" if exit_code == 0 else "Error"


class ContainerManager:
    """Creates, starts, stops and removes containers, and keeps their state current."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._state_guard = threading.Lock()
        #: Finishes removals after RemoveContainer has answered (see `remove`).
        self.removals = Coalesced(self.finish_removals, "container removal")

    def visible(self, container_id: str) -> ContainerRecord:
        """A container the CRI can see: NotFound for one whose removal was asked for."""
        record = self.node.store.container(container_id)
        if record.removing:
            raise NotFound(f"container {container_id!r} not found: it is being removed")
        return record

    def _sandbox_of(self, container: ContainerRecord) -> SandboxRecord:
        return self.node.store.sandbox(container.sandbox_id)

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
        log_path = resolve_log_path(pod_config.log_directory, config.log_path)
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
            profile_root=node.config.seccomp_profile_root,
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
                arguments: dict[str, Any] = {"sandbox": sandbox, "container": record, "config": plugin_config}
                if plugin.builds_own_spec:
                    arguments.update(rootfs=record.rootfs, image=image.config if image else {})
                else:
                    arguments["spec"] = self._finished_spec(sandbox, record, plugin_config, image, handler)
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

    def _finished_spec(
        self,
        sandbox: SandboxRecord,
        record: ContainerRecord,
        config: cri.ContainerConfig,
        image: ImageRecord | None,
        handler: Handler,
    ) -> dict[str, Any]:
        """The container's OCI spec as its runtime gets it: built, then adjusted by the extensions and NRI."""
        spec = oci.container.build(
            sandbox, record, config, image.config if image else {}, self.node.config.cgroup_driver, handler.spec_options
        )
        self.node.extensions.adjust_oci_spec(sandbox, record, spec)
        return spec

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

    def _remove_files(self, record: ContainerRecord) -> None:
        """What the container has on the node besides the runtime's: the binds of a pod in its own user
        namespace, an unpacked checkpoint, then its root filesystem and image volumes."""
        config = self.node.config
        userns.IdmappedBinds.release(config.user_namespaces.mount_dir, record.id)
        checkpoints.discard(config.state_dir, record.id)
        if not record.storage_driver:
            return
        storage = self.node.storage_drivers[record.storage_driver].installed()
        for storage_id in [volume.storage_id for volume in record.image_volumes] + [record.id]:
            storage.call("storage_rootfs_unmount", container_id=storage_id)
            storage.call("storage_rootfs_remove", container_id=storage_id)

    def _volume_images(self, config: cri.ContainerConfig) -> list[ImageRecord]:
        """The images of the container's image volumes, each present on the node (else NotFound naming it)."""
        found = []
        for mount in config.mounts:
            if not mount.image.image:
                continue
            if mount.host_path:
                raise InvalidArgument(f"mount at {mount.container_path[:256]!r} sets both host_path and image")
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
        checkpoints.unpack_archive(archive, work, node.config.checkpoints.max_archive_bytes)
        diff = work / checkpoints.ROOTFS_DIFF
        if diff.exists() and record.rootfs:
            with diff.open("rb") as changes:
                unpack(changes, record.rootfs, APPLY)
        log.info("container %s restored from checkpoint %s", record.id[:12], archive[:256])
        return str(work / checkpoints.IMAGES), checkpoints.read_spec(work)

    def checkpoint(self, container_id: str, location: str, timeout: float) -> None:
        """Write a checkpoint archive of a running container to `location` (CRI-O's layout)."""
        node = self.node
        record = self.visible(container_id)
        sandbox = self._sandbox_of(record)
        checkpoints.check_location(location)
        plugin = node.handlers.get(sandbox.handler).require()
        if not plugin.implements("runtime_container_checkpoint"):
            raise FailedPrecondition(f"runtime handler {sandbox.handler!r} cannot checkpoint containers")
        storage = node.storage_drivers[record.storage_driver].require() if record.storage_driver else None
        if storage is not None and not storage.implements("storage_rootfs_diff"):
            raise FailedPrecondition(
                f"storage driver {record.storage_driver!r} cannot export a container's file changes for a checkpoint"
            )
        settings = node.config.checkpoints
        work = checkpoints.working_directory(node.config.state_dir, record.id)
        started = time.monotonic()
        with node.locks.hold(record.id):
            if self._refresh(sandbox, record).status != ContainerStatus.RUNNING:
                raise FailedPrecondition(f"container {container_id} is not running: only a running one is checkpointed")
            shutil.rmtree(work, ignore_errors=True)
            (work / checkpoints.IMAGES).mkdir(parents=True, mode=0o700)
            try:
                spec = plugin.call(
                    "runtime_container_checkpoint",
                    sandbox=sandbox,
                    container=record,
                    directory=str(work / checkpoints.IMAGES),
                    leave_running=settings.leave_running,
                    timeout=float(timeout) if timeout > 0 else settings.default_timeout,
                )
                checkpoints.write_dumps(work, record.config, record.image_ref, spec)
                if storage is not None:
                    with (work / checkpoints.ROOTFS_DIFF).open("wb") as changes:
                        storage.call("storage_rootfs_diff", container_id=record.id, out=changes)
                size = checkpoints.write_archive(work, location)
            finally:
                checkpoints.discard(node.config.state_dir, record.id)
            if not settings.leave_running:
                self._refresh(sandbox, record)
        log.info(
            "container %s checkpointed to %s: %d bytes in %.2f s",
            record.id[:12],
            location[:256],
            size,
            time.monotonic() - started,
        )

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

    def start(self, container_id: str) -> None:
        """Start a created container."""
        record = self.visible(container_id)
        sandbox = self._sandbox_of(record)
        with self.node.locks.hold(record.id):
            if record.state.status != ContainerStatus.CREATED:
                raise FailedPrecondition(f"container {record.id} is {record.state.status.value}, not created")
            plugin = self.node.handlers.get(sandbox.handler).require()
            plugin.call("runtime_container_start", sandbox=sandbox, container=record)
            self.node.store.save_container(record)
            self._refresh(sandbox, record)
        self.node.emit("container_started", sandbox, record)

    def stop(self, container_id: str, timeout: int) -> None:
        """Stop a container, forcibly after `timeout` seconds. Idempotent."""
        record = self.node.store.container(container_id, missing_ok=True)
        if record is None or record.removing:
            return
        sandbox = self._sandbox_of(record)
        with self.node.locks.hold(record.id):
            if self._refresh(sandbox, record).status == ContainerStatus.EXITED:
                return
            plugin = self.node.handlers.get(sandbox.handler).installed()
            if plugin.implements("runtime_container_kill"):
                _escalate(plugin, sandbox, record, max(timeout, 0))
            else:  # a runtime of plugin API < 1.4
                plugin.call("runtime_container_stop", sandbox=sandbox, container=record, timeout=max(timeout, 0))
            self._refresh(sandbox, record)

    def remove(self, container_id: str) -> None:
        """Remove a container, stopping it first if it runs. Idempotent.

        As containerd's CRI does, the call answers once the container is stopped, its
        removal recorded and its name free: from then on the CRI does not see it. The
        runtime's and the storage's cleanup finish on the removal thread (`finish_removal`);
        a pod's removal, and a restart after a crash, finish them first.
        """
        record = self.node.store.container(container_id, missing_ok=True)
        if record is None or record.removing:
            return
        sandbox = self._sandbox_of(record)
        with self.node.locks.hold(record.id):
            if record.removing:
                return
            # Stopped first: a stop that fails leaves the container as it was, listed, for a retry.
            if self._refresh(sandbox, record).status == ContainerStatus.RUNNING:
                self.stop(record.id, timeout=0)
            record.pending = PENDING_REMOVE
            self.node.store.save_container(record)
            self.node.container_names.release(record.name, record.id)
        self.removals.request()

    def finish_removals(self) -> None:
        """Finish every removal asked for; one that fails is logged and tried again at the next request."""
        for record in self.node.store.containers():
            if record.removing:
                try:
                    self.finish_removal(record.id)
                except Exception as exc:  # noqa: BLE001 - one container must not hold up the others
                    log.error("container %s: removal failed, tried again later: %s", record.id[:12], exc)

    def finish_removal(self, container_id: str) -> None:
        """The runtime's and the storage's part of a container's removal; the record goes last."""
        record = self.node.store.container(container_id, missing_ok=True)
        if record is None:
            return
        sandbox = self._sandbox_of(record)
        with self.node.locks.hold(record.id):
            if self.node.store.container(container_id, missing_ok=True) is None:
                return  # another caller finished it
            plugin = self.node.handlers.get(sandbox.handler).installed()
            plugin.call("runtime_container_remove", sandbox=sandbox, container=record)
            self._remove_files(record)
            self.node.store.delete_container(record.id)
        self.node.locks.forget(record.id)
        if record.image_ref or record.image_volumes:
            self.node.collect_garbage_soon()
        self.node.emit("container_removed", sandbox, record)

    def remove_now(self, container_id: str) -> None:
        """Remove a container and finish its removal before returning (a pod's removal, recovery)."""
        self.remove(container_id)
        self.finish_removal(container_id)

    def state(self, container_id: str) -> tuple[ContainerRecord, ContainerState]:
        """A container's record with its current state."""
        record = self.visible(container_id)
        return record, self._refresh(self._sandbox_of(record), record)

    def _refresh(self, sandbox: SandboxRecord, record: ContainerRecord) -> ContainerState:
        """Ask the runtime for a non-final state and persist any change."""
        if record.state.status == ContainerStatus.EXITED:
            return record.state
        handler = self.node.handlers.get(sandbox.handler)
        if handler.backend.plugin is None:
            return record.state
        current = handler.backend.plugin.call("runtime_container_state", sandbox=sandbox, container=record)
        return self._record_state(sandbox, record, current)

    def _record_state(self, sandbox: SandboxRecord, record: ContainerRecord, current: ContainerState) -> ContainerState:
        """Persist a changed state; announce an exit once."""
        if current.status == ContainerStatus.EXITED and not current.reason:
            current = attrs.evolve(current, reason=exit_reason(current.exit_code))
        with self._state_guard:  # several callers may see the same change; one records and announces it
            changed = current != record.state and record.state.status != ContainerStatus.EXITED
            if changed:
                record.state = current
                self.node.store.save_container(record)
        if changed and current.status == ContainerStatus.EXITED:
            self.node.emit("container_stopped", sandbox, record)
        return record.state

    def refresh_running(self) -> None:
        """Bring every non-final container state up to date (before listing).

        A handler whose plugin implements runtime_container_states is asked
        once for all its containers; the others once per container.
        """
        by_handler: dict[str, list[tuple[SandboxRecord, ContainerRecord]]] = {}
        for record in self.node.store.visible_containers():
            if record.state.status in (ContainerStatus.CREATED, ContainerStatus.RUNNING):
                sandbox = self.node.store.sandbox(record.sandbox_id, missing_ok=True)
                if sandbox is not None:
                    by_handler.setdefault(sandbox.handler, []).append((sandbox, record))
        for name, pairs in by_handler.items():
            try:
                plugin = self.node.handlers.get(name).backend.plugin
                if plugin is not None and plugin.implements("runtime_container_states"):
                    states = plugin.call("runtime_container_states", containers=pairs)
                    for (sandbox, record), current in zip(pairs, states, strict=True):
                        self._record_state(sandbox, record, current)
                    continue
            except Exception:
                log.exception("cannot refresh the states of handler %s's containers", name)
                continue
            for sandbox, record in pairs:
                try:
                    self._refresh(sandbox, record)
                except Exception:
                    log.exception("cannot refresh the state of container %s", record.id[:12])

    def _running(self, container_id: str) -> tuple[SandboxRecord, ContainerRecord, LoadedPlugin]:
        """A running container, its sandbox and its handler's plugin; FailedPrecondition if not running."""
        record, state = self.state(container_id)
        if state.status != ContainerStatus.RUNNING:
            raise FailedPrecondition(f"container {record.id} is not running")
        sandbox = self._sandbox_of(record)
        return sandbox, record, self.node.handlers.get(sandbox.handler).require()

    def exec_sync(self, container_id: str, cmd: list[str], timeout: int) -> ExecResult:
        """Run `cmd` in a running container and wait for it; past `timeout` it is killed, with all it started,
        before DEADLINE_EXCEEDED is answered. Output past EXEC_OUTPUT_LIMIT per stream is read and dropped."""
        if not cmd:
            raise InvalidArgument("ExecSync needs a command")
        sandbox, record, plugin = self._running(container_id)
        seconds = float(timeout) if timeout > 0 else None
        if plugin.implements("runtime_exec"):
            process = plugin.call(
                "runtime_exec", sandbox=sandbox, container=record, cmd=list(cmd), tty=False, stdin=False
            )
            result = collect(process, seconds, EXEC_OUTPUT_LIMIT)
        else:
            result = plugin.call("runtime_exec_sync", sandbox=sandbox, container=record, cmd=list(cmd), timeout=seconds)
        if result.timed_out:
            raise DeadlineExceeded(f"command {cmd[0][:64]!r} in container {record.id} timed out after {timeout} s")
        return ExecResult(
            exit_code=result.exit_code,
            stdout=result.stdout[:EXEC_OUTPUT_LIMIT],
            stderr=result.stderr[:EXEC_OUTPUT_LIMIT],
        )

    def update_resources(self, container_id: str, limits: cri.LinuxContainerResources) -> None:
        """Apply new resource limits and remember them for ContainerStatus."""
        record = self.visible(container_id)
        sandbox = self._sandbox_of(record)
        with self.node.locks.hold(record.id):
            plugin = self.node.handlers.get(sandbox.handler).require()
            enforced = resources.fitted(limits)
            plugin.call("runtime_container_update", sandbox=sandbox, container=record, resources=enforced)
            record.set_resources(limits)
            self.node.store.save_container(record)

    def reopen_log(self, container_id: str) -> None:
        """Have the runtime reopen the container's log after rotation."""
        sandbox, record, plugin = self._running(container_id)
        plugin.call("runtime_container_reopen_log", sandbox=sandbox, container=record)
        if not record.log_path:
            return
        deadline = time.monotonic() + REOPEN_WAIT
        while not os.path.lexists(record.log_path):  # answered only once the new file is there
            if time.monotonic() > deadline:
                raise PluginFailed(
                    f"container {record.id}: the runtime did not reopen {record.log_path} within {REOPEN_WAIT} s"
                )
            time.sleep(0.005)

    def exec_request(self, request: cri.ExecRequest) -> CommandRequest:
        """Check an Exec and prepare what runs when its streaming client connects."""
        if not request.cmd:
            raise InvalidArgument("Exec needs a command")
        _check_streams(request)
        _, record, plugin = self._running(request.container_id)
        plugin.require_hook("runtime_exec")
        cmd = list(request.cmd)

        def open_process() -> StreamedProcess:
            sandbox, container, runtime = self._running(record.id)  # it may have exited since
            return runtime.call(
                "runtime_exec", sandbox=sandbox, container=container, cmd=cmd, tty=request.tty, stdin=request.stdin
            )

        return CommandRequest("exec", request.stdin, request.stdout, request.stderr, request.tty, open_process)

    def attach_request(self, request: cri.AttachRequest) -> CommandRequest:
        """Check an Attach and prepare the connection made when its streaming client connects."""
        _check_streams(request)
        _, record, plugin = self._running(request.container_id)
        plugin.require_hook("runtime_attach")
        if request.stdin and not record.container_config().stdin:
            raise FailedPrecondition(f"container {record.id} was created without stdin: there is no input to attach")

        def open_process() -> StreamedProcess:
            sandbox, container, runtime = self._running(record.id)
            return runtime.call("runtime_attach", sandbox=sandbox, container=container, stdin=request.stdin)

        return CommandRequest("attach", request.stdin, request.stdout, request.stderr, request.tty, open_process)


def _check_streams(request: cri.ExecRequest | cri.AttachRequest) -> None:
    if not (request.stdin or request.stdout or request.stderr):
        raise InvalidArgument("one of stdin, stdout and stderr must be requested")
    if request.tty and request.stderr:
        raise InvalidArgument("tty and stderr cannot both be requested: a terminal has a single output")

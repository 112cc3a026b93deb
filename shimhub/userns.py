"""Pods in a user namespace of their own (the kubelet's hostUsers: false).

The kubelet sends the pod's ID mappings in ``userns_options`` (mode POD).
Before the pod's network is set up, shimhub makes the pod's user namespace
and, owned by it, the pod's network, IPC and UTS namespaces, all in one
``unshare`` process: a process with threads may not create a user namespace,
and a network namespace made outside the user namespace would leave root in
the pod without rights over its own network (binding port 80, mounting
sysfs). shimhub writes the mappings, pins the namespaces to files, and lets
the process go; containers join them, and see their image and volumes
through ID-mapped mounts.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import select
import shutil
import subprocess
import tempfile
from pathlib import Path

from attrs import define

from shimhub import mounts, namespaces
from shimhub.errors import FailedPrecondition, InvalidArgument, PluginFailed
from shimhub.hooktypes import HandlerFeatures
from shimhub.records import SandboxRecord
from shimhub_proto.cri.v1 import api_pb2 as cri

log = logging.getLogger(__name__)
#: Namespaces pinned in the pod's directory (its network namespace goes where the network backend looks).
PINNED = ("user", "ipc", "uts")
#: The host id the probe of ID-mapped mounts maps root to.
PROBE_HOST_ID = 65536
SPAWN_TIMEOUT = 10.0


@define(frozen=True)
class IdMapping:
    """`length` ids from `container_id` inside the namespace are `host_id` onwards outside."""

    container_id: int
    host_id: int
    length: int

    def host_of(self, container_id: int) -> int | None:
        """The host id of `container_id`, None if this mapping does not cover it."""
        offset = container_id - self.container_id
        return self.host_id + offset if 0 <= offset < self.length else None


@define(frozen=True)
class Mappings:
    """A pod's uid and gid mappings."""

    uids: tuple[IdMapping, ...]
    gids: tuple[IdMapping, ...]

    @property
    def root(self) -> tuple[int, int]:
        """The host uid and gid of the namespace's root."""
        uid = next(found for m in self.uids if (found := m.host_of(0)) is not None)
        gid = next(found for m in self.gids if (found := m.host_of(0)) is not None)
        return uid, gid

    def oci(self) -> dict[str, list[dict[str, int]]]:
        """The OCI spec's linux.uidMappings and linux.gidMappings."""

        def entries(mappings: tuple[IdMapping, ...]) -> list[dict[str, int]]:
            return [{"containerID": m.container_id, "hostID": m.host_id, "size": m.length} for m in mappings]

        return {"uidMappings": entries(self.uids), "gidMappings": entries(self.gids)}

    @staticmethod
    def proc_text(mappings: tuple[IdMapping, ...]) -> str:
        """The text of /proc/<pid>/uid_map (or gid_map) for `mappings`."""
        return "".join(f"{m.container_id} {m.host_id} {m.length}\n" for m in mappings)


def _parse(entries: list[cri.IDMapping], what: str) -> tuple[IdMapping, ...]:
    mappings = tuple(IdMapping(e.container_id, e.host_id, e.length) for e in entries)
    if not mappings:
        raise InvalidArgument(f"userns_options mode POD needs {what} mappings; none were given")
    if len(mappings) > 340:  # the kernel's limit on lines of a map
        raise InvalidArgument(f"userns_options has {len(mappings)} {what} mappings; the kernel takes at most 340")
    return mappings


def _overlapping(ranges: list[tuple[int, int]]) -> bool:
    ordered = sorted(ranges)
    return any(start < first + length for (first, length), (start, _) in itertools.pairwise(ordered))


def requested(options: cri.NamespaceOption, where: str) -> Mappings | None:
    """The mappings a pod or container asks for (None: the node's user namespace); InvalidArgument if malformed."""
    if not options.HasField("userns_options"):
        return None  # a client that predates user namespaces (its mode would read POD, the enum's zero)
    userns = options.userns_options
    if userns.mode == cri.NODE:
        if userns.uids or userns.gids:
            raise InvalidArgument(f"{where}: userns_options mode NODE takes no uid or gid mappings")
        return None
    if userns.mode != cri.POD:
        mode = cri.NamespaceMode.Name(userns.mode)
        raise InvalidArgument(f"{where}: userns_options mode {mode} is not supported; use POD or NODE")
    mappings = Mappings(_parse(list(userns.uids), "uid"), _parse(list(userns.gids), "gid"))
    for what, entries in (("uid", mappings.uids), ("gid", mappings.gids)):
        if any(m.length == 0 for m in entries):
            raise InvalidArgument(f"{where}: a {what} mapping has length 0")
        if any(m.container_id + m.length > 1 << 32 or m.host_id + m.length > 1 << 32 for m in entries):
            raise InvalidArgument(f"{where}: a {what} mapping runs past the largest id")
        for side in ("container_id", "host_id"):
            if _overlapping([(getattr(m, side), m.length) for m in entries]):
                raise InvalidArgument(f"{where}: {what} mappings overlap on the {side.split('_')[0]} side")
        if all(m.host_of(0) is None for m in entries):
            raise InvalidArgument(f"{where}: the {what} mappings leave root (0) of the pod unmapped")
    return mappings


def check_pod(config: cri.PodSandboxConfig, allowed: tuple[int, int]) -> Mappings | None:
    """A pod's mappings, refused unless they lie in the host ids `allowed` (first, count) and the pod
    shares no namespace with the node."""
    options = config.linux.security_context.namespace_options
    mappings = requested(options, "pod sandbox")
    if mappings is None:
        return None
    first, count = allowed
    for what, entries in (("uid", mappings.uids), ("gid", mappings.gids)):
        for m in entries:
            if m.host_id < first or m.host_id + m.length > first + count:
                raise InvalidArgument(
                    f"pod sandbox: {what} mapping to host ids {m.host_id}-{m.host_id + m.length - 1} lies outside "
                    f"the ids this node gives pods ({first}-{first + count - 1}, [user_namespaces] host_ids)"
                )
    shared = [kind for kind in ("network", "pid", "ipc") if getattr(options, kind) == cri.NODE]
    if shared:
        raise InvalidArgument(
            f"pod sandbox: a pod in its own user namespace cannot share the node's {', '.join(shared)} namespace"
        )
    if config.linux.security_context.privileged:
        raise InvalidArgument("pod sandbox: a privileged pod cannot run in its own user namespace")
    return mappings


def check_container(config: cri.ContainerConfig, pod: Mappings | None) -> None:
    """Refuse a container whose user namespace is not its pod's (the kubelet sends the pod's again)."""
    mine = requested(config.linux.security_context.namespace_options, "container")
    if mine is not None and mine != pod:
        raise InvalidArgument("container: userns_options differ from its pod sandbox's; containers share the pod's")
    if pod is not None and config.linux.security_context.privileged:
        raise InvalidArgument("container: a privileged container cannot run in its pod's user namespace")
    for mount in config.mounts:
        for entries in (mount.uidMappings, mount.gidMappings):
            given = tuple(IdMapping(e.container_id, e.host_id, e.length) for e in entries)
            if given and (pod is None or given not in (pod.uids, pod.gids)):
                raise InvalidArgument(
                    f"mount at {mount.container_path[:256]!r}: ID mappings of a mount must be its pod's "
                    "(mounts are ID-mapped into the pod's user namespace)"
                )


def _spawn(kinds: list[str], mappings: Mappings) -> subprocess.Popen[bytes]:
    """An `unshare` process in new namespaces of `kinds`, waiting on stdin, its maps written."""
    process = subprocess.Popen(
        ["unshare", *(f"--{kind}" for kind in kinds), "--", "cat"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        # cat echoes a line once it runs, which is after unshare made the namespaces
        process.stdin.write(b"ready\n")
        process.stdin.flush()
        ready, _, _ = select.select([process.stdout], [], [], SPAWN_TIMEOUT)
        if not ready or process.stdout.readline() != b"ready\n":
            raise PluginFailed(f"unshare {' '.join(kinds)}: {_stderr(process)}")
        for name, entries in (("uid_map", mappings.uids), ("gid_map", mappings.gids)):
            with open(f"/proc/{process.pid}/{name}", "w") as map_file:
                map_file.write(Mappings.proc_text(entries))
    except BaseException:
        _end(process)
        raise
    return process


def _stderr(process: subprocess.Popen[bytes]) -> str:
    process.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        _, error = process.communicate(timeout=SPAWN_TIMEOUT)
        return error.decode(errors="replace").strip()[:512] or "no namespace was made"
    return "no namespace was made"


def _end(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(OSError):
        assert process.stdin is not None
        process.stdin.close()
    try:
        process.wait(SPAWN_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def create(directory: Path, mappings: Mappings, netns_path: str, hostname: str) -> None:
    """Make the pod's user namespace and, owned by it, its IPC, UTS and network namespaces; pin them.

    The user, IPC and UTS namespaces are pinned in `directory`, the network namespace at `netns_path`
    (where the network backend adopts it). Undone by `release` (and the backend's teardown).
    """
    directory.mkdir(parents=True, exist_ok=True, mode=0o711)
    pins = {kind: directory / kind for kind in PINNED}
    if netns_path:
        Path(netns_path).parent.mkdir(parents=True, exist_ok=True)
        pins["net"] = Path(netns_path)
    process = _spawn(list(pins), mappings)
    try:
        for kind, pin in pins.items():
            pin.touch()
            mounts.bind(f"/proc/{process.pid}/ns/{kind}", str(pin))  # pins the namespace
    finally:
        _end(process)
    if hostname:
        namespaces.set_hostname(str(pins["uts"]), hostname)


def release(directory: str) -> None:
    """Unpin the pod's user, IPC and UTS namespaces and remove their directory. Idempotent."""
    if not directory:
        return
    for kind in PINNED:
        mounts.unmount(os.path.join(directory, kind))
    shutil.rmtree(directory, ignore_errors=True)


def check_reachable(mount_dir: str) -> None:
    """FailedPrecondition unless every directory down to `mount_dir` is searchable by others: a runtime in
    a pod's user namespace is no one special on the host, and must reach the root filesystems there."""
    current = Path(mount_dir).resolve()
    for directory in [current, *current.parents]:
        mode = os.stat(directory).st_mode if directory.exists() else 0o001
        if not mode & 0o001:
            raise FailedPrecondition(
                f"pods in user namespaces need [user_namespaces] mount_dir {mount_dir} reachable from them, "
                f"but {directory} is not searchable by others (mode {mode & 0o777:o}): chmod o+x {directory}"
            )


def user_file(directory: str) -> str:
    """The pinned user namespace in a pod's namespace directory."""
    return os.path.join(directory, "user")


@functools.cache
def node_support() -> str:
    """Why this node cannot run pods in user namespaces ("" when it can): probed once, on a tmpfs."""
    if not os.path.exists("/proc/self/ns/user"):
        return "the kernel has no user namespaces"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    probe = Mappings((IdMapping(0, PROBE_HOST_ID, 1),), (IdMapping(0, PROBE_HOST_ID, 1),))
    with tempfile.TemporaryDirectory(prefix="shimhub-userns-") as scratch:
        base = Path(scratch)
        (base / "source").mkdir()
        (base / "target").mkdir()
        try:
            mounts.run("mount", "-t", "tmpfs", "-o", "size=64k", "probe", str(base / "source"))
            try:
                create(base / "ns", probe, "", "")
                try:
                    mounts.idmapped_bind(str(base / "source"), str(base / "target"), user_file(str(base / "ns")))
                    owner = os.stat(base / "target").st_uid
                    mounts.unmount(str(base / "target"))
                finally:
                    release(str(base / "ns"))
            finally:
                mounts.unmount(str(base / "source"))
        except (OSError, PluginFailed, FailedPrecondition) as exc:
            return f"ID-mapped mounts do not work here: {exc}"
    if owner != PROBE_HOST_ID:
        return "an ID-mapped mount did not map its owner"
    return ""


def unsupported(features: HandlerFeatures) -> str:
    """Why a runtime handler with `features` cannot run pods in user namespaces here ("" when it can); the node
    is probed only for a runtime that can."""
    return node_support() if features.user_namespaces else "its runtime does not support them"


class IdmappedBinds:
    """A container's root filesystem and volumes, bound for a runtime in the pod's user namespace
    (ID-mapped, but for a root filesystem its driver mapped), in `<mount_dir>/<container id>`, a
    directory only root and the pod's host root id may enter."""

    def __init__(self, mount_dir: str, container_id: str, namespace_directory: str, root: tuple[int, int]) -> None:
        self.directory = self.location(mount_dir, container_id)
        self.user_namespace = user_file(namespace_directory)
        #: The host uid and gid of the namespace's root.
        self.root = root

    @classmethod
    def of(cls, mount_dir: str, container_id: str, sandbox: SandboxRecord) -> IdmappedBinds | None:
        """The binds of a container of `sandbox`; None for a pod in the node's user namespace."""
        if not sandbox.user_namespace:
            return None
        mappings = requested(sandbox.pod_config().linux.security_context.namespace_options, "pod sandbox")
        assert mappings is not None  # the pod was made with them
        return cls(mount_dir, container_id, sandbox.user_namespace, mappings.root)

    @staticmethod
    def location(mount_dir: str, container_id: str) -> Path:
        """Where a container's binds are."""
        return Path(mount_dir, container_id)

    def bind(self, source: str, name: str, *, recursive: bool = False, mapped: bool = True) -> str:
        """`source` bound (ID-mapped unless `mapped` is False) at a new path in the directory; that path.

        The runtime, once in the pod's user namespace, is the pod's host root id and must reach what it
        mounts, so the parents are searchable by all; the directory itself is the pod's host root's alone
        (mode 0700), so that no other local user reaches the pod's files through the paths that
        /proc/self/mountinfo shows.
        """
        if not self.directory.parent.exists():
            self.directory.parent.mkdir(parents=True, mode=0o711)
        if not self.directory.exists():
            self.directory.mkdir(mode=0o700)
            os.chown(self.directory, *self.root)
        target = self.directory / name
        if os.path.isdir(source):
            target.mkdir(mode=0o755, exist_ok=True)
        else:
            target.touch(mode=0o644)
        if mapped:
            mounts.idmapped_bind(source, str(target), self.user_namespace, recursive=recursive)
        else:
            mounts.bind(source, str(target))
        return str(target)

    def map_volumes(self, config: cri.ContainerConfig) -> None:
        """Point every host-path mount of `config` at an ID-mapped bind of its source (image mounts aside).

        As containerd and CRI-O do: the container sees a volume's files with the ids they have on disk,
        so what the kubelet made for root of the pod is root's inside.
        """
        for number, mount in enumerate(config.mounts):
            if mount.image.image or not mount.host_path:
                continue
            source = os.path.realpath(mount.host_path)
            try:
                mount.host_path = self.bind(source, f"volume-{number}", recursive=True)
            except FailedPrecondition as exc:
                raise FailedPrecondition(
                    f"mount at {mount.container_path[:256]!r}: a pod in its own user namespace needs its volumes "
                    f"ID-mapped, and {exc}"
                ) from None

    @classmethod
    def release(cls, mount_dir: str, container_id: str) -> None:
        """Unmount and remove a container's binds. Idempotent."""
        directory = cls.location(mount_dir, container_id)
        if not directory.exists():
            return
        for entry in directory.iterdir():
            mounts.unmount(str(entry))
        shutil.rmtree(directory, ignore_errors=True)

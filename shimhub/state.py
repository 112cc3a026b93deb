"""Persistence and lookup of sandbox and container records.

Each record is one JSON file under ``<state_dir>/sandboxes`` or
``<state_dir>/containers``, replaced atomically (write to a temporary file,
fsync, rename, fsync the directory) so that a crash leaves either the old or
the new record, never half of one.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import threading
from pathlib import Path
from typing import Literal, TypeVar, overload

from shimhub.config import converter
from shimhub.errors import NO_SPACE, InvalidArgument, NotFound, ResourceExhausted
from shimhub.records import PENDING_CREATE, ContainerRecord, SandboxRecord

log = logging.getLogger(__name__)

R = TypeVar("R", SandboxRecord, ContainerRecord)
T = TypeVar("T")

#: Shortest id prefix accepted for lookups, as crictl and docker do.
MIN_PREFIX = 3


def write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a crash leaves either the old or the new content.

    Every byte is written and synced before the rename; a write that fails (a full
    disk: ResourceExhausted) removes the temporary file and leaves `path` as it was.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno in NO_SPACE:
            raise ResourceExhausted(f"no space left to write {path.name}: {exc.strerror}") from None
        raise
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
        written = os.fstat(fd).st_size
        if written != len(data):
            raise OSError(errno.EIO, f"{written} of {len(data)} bytes reached the disk")
    except OSError as exc:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        if exc.errno in NO_SPACE:
            raise ResourceExhausted(f"no space left to write {path.name}: {exc.strerror}") from None
        raise
    os.close(fd)
    os.rename(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class StateDirInUse(Exception):
    """Another shimhub holds the state directory."""


def lock_state_dir(state_dir: str) -> int:
    """Take the state directory for this process: an exclusive lock, held until the process ends.

    Taken before anything is read, so that a second `shimhub serve` on the same state never
    runs crash recovery against a live daemon. The descriptor is not inherited by children.
    """
    Path(state_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(Path(state_dir) / "shimhub.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateDirInUse(f"another shimhub serves the state directory {state_dir}") from None
    return fd


def load_record(path: Path, kind: type[T], label: str) -> T | None:
    """The record in file `path`; an unreadable one (truncated, not JSON, not of `kind`) is moved aside to
    `<name>.corrupt` with an error in the log, and None returned: it never stops the daemon."""
    try:
        return converter.structure(json.loads(path.read_bytes()), kind)
    except Exception as exc:  # noqa: BLE001 - any unreadable record is set aside, not fatal
        aside = path.with_suffix(".corrupt")
        path.rename(aside)
        log.error("%s record %s is unreadable (%s); moved to %s", label, path.stem, exc, aside)
        return None


class _Table:
    """The records of one kind, in memory and on disk."""

    def __init__(self, directory: Path, kind: type[R], label: str) -> None:
        self.directory = directory
        self.kind = kind
        self.label = label
        self.records: dict[str, R] = {}
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    def load(self) -> None:
        for path in sorted(self.directory.iterdir()):
            if path.name.startswith(".") and path.name.endswith(".tmp"):
                path.unlink()  # a write that a crash interrupted; the record before it stands
                continue
            if path.suffix != ".json":
                continue
            record = load_record(path, self.kind, self.label)
            if record is not None:
                self.records[record.id] = record

    def save(self, record: R) -> None:
        data = json.dumps(converter.unstructure(record), sort_keys=True).encode()
        write_atomically(self.directory / f"{record.id}.json", data)
        self.records[record.id] = record

    def delete(self, record_id: str) -> None:
        (self.directory / f"{record_id}.json").unlink(missing_ok=True)
        self.records.pop(record_id, None)

    def find(self, id_or_prefix: str, missing_ok: bool = False) -> R | None:
        if missing_ok:
            try:
                return self.find(id_or_prefix)
            except NotFound:
                return None
        if not id_or_prefix:
            raise InvalidArgument(f"no {self.label} id given")
        found = self.records.get(id_or_prefix)
        if found is not None:
            return found
        if len(id_or_prefix) >= MIN_PREFIX:
            matches = [r for key, r in self.records.items() if key.startswith(id_or_prefix)]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise InvalidArgument(
                    f"{self.label} id prefix {id_or_prefix!r} is ambiguous: it matches {len(matches)} ids"
                )
        raise NotFound(f"{self.label} {id_or_prefix!r} not found")


class StateStore:
    """All sandbox and container records of one shimhub instance."""

    def __init__(self, state_dir: Path) -> None:
        self.lock = threading.Lock()
        self._sandboxes = _Table(state_dir / "sandboxes", SandboxRecord, "pod sandbox")
        self._containers = _Table(state_dir / "containers", ContainerRecord, "container")
        #: Containers whose sandbox record is missing or unreadable, by sandbox id (filled by load).
        self.orphaned: dict[str, list[ContainerRecord]] = {}

    def load(self) -> None:
        """Read every record from disk (at startup)."""
        self._sandboxes.load()
        self._containers.load()
        for container in list(self._containers.records.values()):
            if container.sandbox_id not in self._sandboxes.records:
                # Its processes, mounts and cgroup may still be on the node: the record is what finds them.
                self.orphaned.setdefault(container.sandbox_id, []).append(self._containers.records.pop(container.id))

    def corrupt_sandbox(self, sandbox_id: str) -> bytes:
        """What is left of a sandbox record that could not be read (b"" when there is none)."""
        try:
            with (self._sandboxes.directory / f"{sandbox_id}.corrupt").open("rb") as damaged:
                return damaged.read(1 << 20)
        except OSError:
            return b""

    def restore_pod(self, record: SandboxRecord, containers: list[ContainerRecord]) -> None:
        """Put back a pod rebuilt for its orphaned containers (see `shimhub.orphans`)."""
        with self.lock:
            self._sandboxes.save(record)
            for container in containers:
                self._containers.records[container.id] = container
            self.orphaned.pop(record.id, None)

    def sandboxes(self) -> list[SandboxRecord]:
        """A snapshot of all sandbox records."""
        return list(self._sandboxes.records.values())

    def containers(self, sandbox_id: str = "") -> list[ContainerRecord]:
        """A snapshot of all container records, or of one sandbox's."""
        records = list(self._containers.records.values())
        return [c for c in records if c.sandbox_id == sandbox_id] if sandbox_id else records

    def visible_containers(self, sandbox_id: str = "") -> list[ContainerRecord]:
        """The containers the CRI sees (all, or one sandbox's): those created (NRI plugins had their say)
        whose removal was not asked for."""
        return [c for c in self.containers(sandbox_id) if not c.removing and c.pending != PENDING_CREATE]

    def visible_sandboxes(self) -> list[SandboxRecord]:
        """The sandboxes the list calls show: those whose creation finished."""
        return [s for s in self.sandboxes() if s.pending != PENDING_CREATE]

    @overload
    def sandbox(self, id_or_prefix: str, missing_ok: Literal[False] = False) -> SandboxRecord: ...
    @overload
    def sandbox(self, id_or_prefix: str, missing_ok: Literal[True]) -> SandboxRecord | None: ...

    def sandbox(self, id_or_prefix: str, missing_ok: bool = False) -> SandboxRecord | None:
        """The sandbox with this id or unique id prefix; NotFound (None if missing_ok) or InvalidArgument."""
        return self._sandboxes.find(id_or_prefix, missing_ok)

    @overload
    def container(self, id_or_prefix: str, missing_ok: Literal[False] = False) -> ContainerRecord: ...
    @overload
    def container(self, id_or_prefix: str, missing_ok: Literal[True]) -> ContainerRecord | None: ...

    def container(self, id_or_prefix: str, missing_ok: bool = False) -> ContainerRecord | None:
        """The container with this id or unique id prefix; NotFound (None if missing_ok) or InvalidArgument."""
        return self._containers.find(id_or_prefix, missing_ok)

    def save_sandbox(self, record: SandboxRecord) -> None:
        """Persist a new or changed sandbox record."""
        with self.lock:
            self._sandboxes.save(record)

    def save_container(self, record: ContainerRecord) -> None:
        """Persist a new or changed container record."""
        with self.lock:
            self._containers.save(record)

    def delete_sandbox(self, record_id: str) -> None:
        """Forget a sandbox record."""
        with self.lock:
            self._sandboxes.delete(record_id)

    def delete_container(self, record_id: str) -> None:
        """Forget a container record."""
        with self.lock:
            self._containers.delete(record_id)

"""Unpacking image layer tars safely, with whiteouts in a driver's own form.

Layers are read by `shimhub.tarstream` (every header bounded) in a child
process confined by `shimhub.confinement`: chrooted into the target, with
limits on memory, CPU, file size and time, so a hostile layer costs one failed
pull and never the daemon. No entry may write outside the target directory: names with ``..`` or
absolute paths are refused, and every path is resolved inside the target, so
a symlink (from this layer or an earlier one) can never lead a write outside
it. Hardlinks must point inside the target too. Ownership, modes, xattrs,
times, hardlinks, symlinks, FIFOs and device nodes are kept.

Whiteouts (OCI image layer spec) are applied by a `Whiteouts` object: the base
class, `APPLY`, deletes what they hide from a target that holds the parent's
content (vfs, btrfs, devicemapper); a storage driver whose layers are branches
of a union mount subclasses it to mark deletions in its filesystem's own form.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import json
import os
import shutil
import stat
from collections.abc import Callable, Mapping
from pathlib import PurePosixPath
from typing import IO, Any, ClassVar

from attrs import asdict, define, fields

from shimhub import confinement, tarstream
from shimhub.errors import NO_SPACE, InvalidArgument, ResourceExhausted

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
MAX_SYMLINK_HOPS = 40
COPY_CHUNK = 1 << 20


class Whiteouts:
    """How a driver represents deletions of lower-layer content; this base class deletes it."""

    #: Keep whiteout entries as the files they are (a union filesystem that reads them itself).
    keep_entries: ClassVar[bool] = False

    def opaque(self, directory: str, created: Callable[[str], bool]) -> None:
        """The lower layers' content of `directory` is hidden; `created(name)`: this layer made the entry."""
        for entry in os.listdir(directory):
            if not created(entry):
                remove_path(os.path.join(directory, entry))

    def hide(self, path: str) -> None:
        """The lower layers' entry at `path` is deleted."""
        remove_path(path)


#: Whiteouts applied by deleting.
APPLY = Whiteouts()


class UnsafeLayer(InvalidArgument):
    """A layer tries to write outside its directory or is otherwise malformed."""


@define(frozen=True)
class Limits:
    """What an archive may hold: file bytes and entries (0: no limit), only files and directories, one entry."""

    max_bytes: int = 0
    files_only: bool = False
    max_entries: int = 0
    only: str = ""


@define
class UnpackResult:
    """What a layer unpacked to."""

    bytes: int = 0
    inodes: int = 0


def _clean_name(name: str) -> str:
    """The entry's path relative to the layer root; refuses `..` and empty names."""
    parts = [p for p in PurePosixPath(name).parts if p not in ("/", ".", "")]
    if any(p == ".." for p in parts):
        raise UnsafeLayer(f"layer entry {name!r} points outside the layer")
    return "/".join(parts)


class ScopedRoot:
    """Path resolution confined to one directory: symlinks are followed as if it were `/`."""

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)

    def resolve_parent(self, relative: str) -> str:
        """The real path of `relative`'s parent directory, following symlinks inside the root only."""
        parent = os.path.dirname(relative)
        return self._resolve(parent) if parent else self.root

    def _resolve(self, relative: str) -> str:
        current: list[str] = []
        pending = [p for p in relative.split("/") if p]
        hops = 0
        while pending:
            part = pending.pop(0)
            if part == ".":
                continue
            if part == "..":
                if current:
                    current.pop()
                continue
            candidate = os.path.join(self.root, *current, part)
            try:
                info = os.lstat(candidate)
            except FileNotFoundError:
                current.append(part)
                continue
            if stat.S_ISLNK(info.st_mode):
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise UnsafeLayer(f"too many symlinks resolving {relative!r}")
                target = os.readlink(candidate)
                if target.startswith("/"):
                    current = []
                pending = [p for p in target.split("/") if p] + pending
                continue
            current.append(part)
        return os.path.join(self.root, *current)

    def resolve(self, relative: str) -> str:
        """The real path of `relative` inside the root; the last component is not followed."""
        return os.path.join(self.resolve_parent(relative), os.path.basename(relative))


def remove_path(path: str) -> None:
    """Remove a file or a directory tree at `path` if there is one (never following a symlink)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(info.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def make_directories(path: str) -> None:
    """Create missing parent directories (root-owned, 0755), as tar does for implicit parents."""
    os.makedirs(path, mode=0o755, exist_ok=True)


def unpack(
    stream: IO[bytes],
    target: str,
    whiteouts: Whiteouts,
    max_bytes: int = 0,
    *,
    files_only: bool = False,
    max_entries: int = 0,
    only: str = "",
    deadline: int = confinement.DEADLINE,
) -> UnpackResult:
    """Unpack the uncompressed tar in `stream` into the directory `target`, in a confined child process.

    Refuses more than `max_bytes` of file content and more than `max_entries` entries (0: no limit) and,
    with `files_only`, anything but regular files and directories; with `only`, unpacks just that entry;
    stops the child after `deadline` seconds.
    `whiteouts` is instantiated again in the child: its class must be importable by its module and name
    and take no arguments.
    """
    limits = {**asdict(Limits(max_bytes, files_only, max_entries, only)), "deadline": deadline}
    named = f"{type(whiteouts).__module__}:{type(whiteouts).__qualname__}"
    return _result(_HELPER.run({"target": target, "whiteouts": named, "limits": limits}, stream), target, limits)


_HELPER = confinement.Helper(__name__)
#: Start the unpacker's helper process ahead of the first layer (the daemon does at startup).
start_helper = _HELPER.start


def _result(answer: bytes, target: str, limits: Mapping[str, Any]) -> UnpackResult:
    """What the confined child answered, as a result or the error it stands for."""
    memory = confinement.MEMORY_ALLOWANCE >> 20
    if not answer:
        raise UnsafeLayer(
            f"unpacking was stopped at a limit of the confined unpacker ({limits['deadline']} s, {memory} MiB)"
        )
    result = json.loads(answer)
    error = result.get("error")
    message = str(result.get("message", ""))[:1024]
    if error is None:
        return UnpackResult(bytes=int(result["bytes"]), inodes=int(result["inodes"]))
    if error == "unsafe":
        raise UnsafeLayer(message)
    if error == "memory":
        raise UnsafeLayer(f"unpacking needs more than the {memory} MiB of memory the unpacker may use")
    if error == "os":
        code = int(result.get("errno", 0))
        if code in NO_SPACE:
            raise ResourceExhausted(f"no space left to unpack into {target}: {message}")
        if code == errno.EFBIG:
            raise UnsafeLayer(f"a file of the archive is larger than this node allows ({limits['max_bytes']} bytes)")
        raise OSError(code, message)
    raise RuntimeError(f"the confined unpacker failed: {message}")


def _prepare(request: dict[str, Any], cache: dict[str, Whiteouts] = {}) -> Whiteouts:  # noqa: B006 - the cache
    """In the helper: the request's Whiteouts, its class imported once."""
    name = request["whiteouts"]
    if name not in cache:
        module, _, qualname = name.partition(":")
        found: Any = importlib.import_module(module)
        for part in qualname.split("."):
            found = getattr(found, part)
        cache[name] = found()
    return cache[name]


def _work(request: dict[str, Any], whiteouts: Whiteouts) -> dict[str, Any]:
    """In the confined child, chrooted into the target: unpack standard input there."""
    limits = Limits(**{field.name: request["limits"][field.name] for field in fields(Limits)})
    try:
        with open(0, "rb", buffering=0, closefd=False) as stream:  # unbuffered: content is copied once
            done = unpack_here(stream, "/", whiteouts, limits)
    except UnsafeLayer as exc:
        return {"error": "unsafe", "message": str(exc)}
    except OSError as exc:
        return {"error": "os", "errno": exc.errno or 0, "message": str(exc)}
    return {"bytes": done.bytes, "inodes": done.inodes}


def unpack_here(stream: IO[bytes], target: str, whiteouts: Whiteouts, limits: Limits) -> UnpackResult:
    """`unpack` in this process: only for the confined child, which runs it chrooted into `target`."""
    unpacker = _Unpacker(ScopedRoot(target), whiteouts, limits)
    try:
        for entry in tarstream.TarReader(stream):
            try:
                unpacker.add(entry)
            except OSError as exc:
                if exc.errno not in (errno.ENAMETOOLONG, errno.ELOOP):
                    raise
                raise UnsafeLayer(f"layer entry {entry.name[:256]!r}...: {exc.strerror}") from None
    except tarstream.TarFormatError as exc:
        raise UnsafeLayer(f"layer is not a valid tar archive: {exc}") from None
    unpacker.finish()
    return unpacker.result


class _Unpacker:
    """The state of one layer being unpacked."""

    def __init__(self, root: ScopedRoot, whiteouts: Whiteouts, limits: Limits) -> None:
        self.root = root
        self.whiteouts = whiteouts
        self.limits = limits
        self.entries = 0
        self.result = UnpackResult()
        #: Entries this layer created (whiteouts never hide them).
        self.created: set[str] = set()
        self.directories: list[tuple[str, float]] = []

    def add(self, entry: tarstream.Entry) -> None:
        self.entries += 1
        if self.limits.max_entries and self.entries > self.limits.max_entries:
            raise UnsafeLayer(f"the archive holds more than {self.limits.max_entries} entries")
        if self.limits.files_only and entry.kind not in (tarstream.REGULAR, tarstream.DIRECTORY):
            link = entry.kind in (tarstream.SYMLINK, tarstream.HARDLINK)
            raise UnsafeLayer(f"{entry.name[:256]!r} is {'a link' if link else 'not a regular file or a directory'}")
        name = _clean_name(entry.name)
        if not name or (self.limits.only and name != self.limits.only):
            return  # the layer root itself, or an entry not asked for
        if os.path.basename(name).startswith(WHITEOUT_PREFIX) and not self.whiteouts.keep_entries:
            _whiteout(self.root, name, self.whiteouts, self.created)
            return
        path = self.root.resolve(name)
        make_directories(os.path.dirname(path))
        self.result.bytes += entry.size
        if self.limits.max_bytes and self.result.bytes > self.limits.max_bytes:
            raise UnsafeLayer(f"layer unpacks to more than {self.limits.max_bytes} bytes")
        _extract(entry, path, self.root)
        self.created.add(name)
        self.result.inodes += 1
        if entry.kind == tarstream.DIRECTORY:
            self.directories.append((path, entry.mtime))

    def finish(self) -> None:
        """Set directory times last: writing their children changed them."""
        for path, mtime in reversed(self.directories):
            os.utime(path, (mtime, mtime), follow_symlinks=False)


def _whiteout(root: ScopedRoot, name: str, mode: Whiteouts, created: set[str]) -> None:
    parent_rel = os.path.dirname(name)
    parent = root.resolve_parent(name)
    base = os.path.basename(name)
    if base == OPAQUE_MARKER:
        make_directories(parent)
        prefix = f"{parent_rel}/" if parent_rel else ""
        mode.opaque(parent, lambda entry: f"{prefix}{entry}" in created)
        return
    hidden = base[len(WHITEOUT_PREFIX) :]
    if not hidden or hidden in (".", ".."):
        raise UnsafeLayer(f"layer entry {name!r} is not a valid whiteout")
    if f"{parent_rel}/{hidden}".lstrip("/") in created:
        return  # whiteouts hide lower layers only, never this layer's own entries
    mode.hide(os.path.join(parent, hidden))


def _extract(entry: tarstream.Entry, path: str, root: ScopedRoot) -> None:
    existing = None
    with contextlib.suppress(FileNotFoundError):
        existing = os.lstat(path)
    kind = entry.kind
    if existing is not None and not (kind == tarstream.DIRECTORY and stat.S_ISDIR(existing.st_mode)):
        remove_path(path)
    if kind == tarstream.DIRECTORY:
        os.makedirs(path, mode=0o700, exist_ok=True)
    elif kind == tarstream.REGULAR:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            while chunk := entry.read(COPY_CHUNK):
                out.write(chunk)
    elif kind == tarstream.SYMLINK:
        os.symlink(entry.linkname, path)
    elif kind == tarstream.HARDLINK:
        link_name = _clean_name(entry.linkname)
        if not link_name:
            raise UnsafeLayer(f"layer entry {entry.name!r} is a hardlink to the layer root")
        source_path = root.resolve(link_name)
        if not os.path.lexists(source_path):
            raise UnsafeLayer(f"layer entry {entry.name!r} links to {entry.linkname!r}, which is not in the layer")
        os.link(source_path, path, follow_symlinks=False)
        return  # a hardlink shares its target's metadata
    elif kind == tarstream.CHARDEV and (entry.devmajor, entry.devminor) == (0, 0):
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(0, 0))  # an overlay-style whiteout: opens nothing
    elif kind in (tarstream.CHARDEV, tarstream.BLOCKDEV):
        # An image has no business creating device nodes on the node (the runtime makes /dev);
        # one for the node's disk would be a way out for a container given device access.
        described = "character" if kind == tarstream.CHARDEV else "block"
        raise UnsafeLayer(
            f"layer entry {entry.name!r} is a {described} device {entry.devmajor}:{entry.devminor}; "
            "images may not carry device nodes"
        )
    else:
        os.mkfifo(path, 0o600)
    _apply_metadata(entry, path)


def _apply_metadata(entry: tarstream.Entry, path: str) -> None:
    os.lchown(path, entry.uid, entry.gid)
    for key, value in entry.xattrs.items():
        try:
            os.setxattr(path, key, value, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.EPERM):
                raise
    if entry.kind != tarstream.SYMLINK:
        os.chmod(path, entry.mode & 0o7777)
        os.utime(path, (entry.mtime, entry.mtime))
    else:
        os.utime(path, (entry.mtime, entry.mtime), follow_symlinks=False)


if __name__ == "__main__":  # the confinement helper (see shimhub.confinement), with this module's own functions
    from shimhub import unpack as _module  # noqa: PLW0406 - the module, not this __main__ copy of it

    confinement.main(_module._prepare, _module._work)

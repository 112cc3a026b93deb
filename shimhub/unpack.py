"""Unpacking image layer tars safely, with whiteouts in a driver's own form.

No entry may write outside the target directory: names with ``..`` or
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
import os
import shutil
import stat
import tarfile
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import IO, ClassVar

from attrs import define

from shimhub.errors import InvalidArgument

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
MAX_SYMLINK_HOPS = 40


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


def unpack(stream: IO[bytes], target: str, whiteouts: Whiteouts, max_bytes: int = 0) -> UnpackResult:
    """Unpack the uncompressed layer tar in `stream` into `target`; refuse more than `max_bytes` (0: no limit)."""
    unpacker = _Unpacker(ScopedRoot(target), whiteouts, max_bytes)
    try:
        with tarfile.open(fileobj=stream, mode="r|") as archive:
            for member in archive:
                try:
                    unpacker.add(archive, member)
                except OSError as exc:
                    if exc.errno not in (errno.ENAMETOOLONG, errno.ELOOP):
                        raise
                    raise UnsafeLayer(f"layer entry {member.name[:256]!r}...: {exc.strerror}") from None
    except tarfile.TarError as exc:
        raise UnsafeLayer(f"layer is not a valid tar archive: {exc}") from exc
    unpacker.finish()
    return unpacker.result


class _Unpacker:
    """The state of one layer being unpacked."""

    def __init__(self, root: ScopedRoot, whiteouts: Whiteouts, max_bytes: int) -> None:
        self.root = root
        self.whiteouts = whiteouts
        self.max_bytes = max_bytes
        self.result = UnpackResult()
        #: Entries this layer created (whiteouts never hide them).
        self.created: set[str] = set()
        self.directories: list[tuple[str, tarfile.TarInfo]] = []

    def add(self, archive: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        name = _clean_name(member.name)
        if not name:
            return  # the layer root itself
        if os.path.basename(name).startswith(WHITEOUT_PREFIX) and not self.whiteouts.keep_entries:
            _whiteout(self.root, name, self.whiteouts, self.created)
            return
        path = self.root.resolve(name)
        make_directories(os.path.dirname(path))
        _extract(archive, member, path, self.root)
        self.created.add(name)
        self.result.inodes += 1
        self.result.bytes += member.size if member.isreg() else 0
        if self.max_bytes and self.result.bytes > self.max_bytes:
            raise UnsafeLayer(f"layer unpacks to more than {self.max_bytes} bytes")
        if member.isdir():
            self.directories.append((path, member))

    def finish(self) -> None:
        """Set directory times last: writing their children changed them."""
        for path, member in reversed(self.directories):
            os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)


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


def _extract(archive: tarfile.TarFile, member: tarfile.TarInfo, path: str, root: ScopedRoot) -> None:
    existing = None
    with contextlib.suppress(FileNotFoundError):
        existing = os.lstat(path)
    if existing is not None and not (member.isdir() and stat.S_ISDIR(existing.st_mode)):
        remove_path(path)
    if member.isdir():
        os.makedirs(path, mode=0o700, exist_ok=True)
    elif member.isreg():
        source = archive.extractfile(member)
        assert source is not None
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(source, out, 1 << 20)
    elif member.issym():
        os.symlink(member.linkname, path)
    elif member.islnk():
        link_name = _clean_name(member.linkname)
        if not link_name:
            raise UnsafeLayer(f"layer entry {member.name!r} is a hardlink to the layer root")
        source_path = root.resolve(link_name)
        if not os.path.lexists(source_path):
            raise UnsafeLayer(f"layer entry {member.name!r} links to {member.linkname!r}, which is not in the layer")
        os.link(source_path, path, follow_symlinks=False)
        return  # a hardlink shares its target's metadata
    elif member.ischr() and (member.devmajor, member.devminor) == (0, 0):
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(0, 0))  # an overlay-style whiteout: opens nothing
    elif member.ischr() or member.isblk():
        # An image has no business creating device nodes on the node (the runtime makes /dev);
        # one for the node's disk would be a way out for a container given device access.
        kind = "character" if member.ischr() else "block"
        raise UnsafeLayer(
            f"layer entry {member.name!r} is a {kind} device {member.devmajor}:{member.devminor}; "
            "images may not carry device nodes"
        )
    elif member.isfifo():
        os.mkfifo(path, 0o600)
    else:
        raise UnsafeLayer(f"layer entry {member.name!r} has an unsupported type {member.type!r}")
    _apply_metadata(member, path)


def _apply_metadata(member: tarfile.TarInfo, path: str) -> None:
    os.lchown(path, member.uid, member.gid)
    for key, value in member.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            try:
                os.setxattr(
                    path, key[len("SCHILY.xattr.") :], value.encode("utf-8", "surrogateescape"), follow_symlinks=False
                )
            except OSError as exc:
                if exc.errno not in (errno.ENOTSUP, errno.EPERM):
                    raise
    if not member.issym():
        os.chmod(path, member.mode & 0o7777)
        os.utime(path, (member.mtime, member.mtime))
    else:
        os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)

"""The overlay storage driver: layers are overlayfs lower directories, each container gets an upper one.

Every layer gets a short link name under ``l/`` so that the lowerdir option of an
image with many layers stays within the kernel's one-page limit for mount
options; the mount runs with the driver root as working directory so the
option can name the links relatively.
"""

from __future__ import annotations

import os
import secrets
import stat
import tarfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

from shimhub.sdk import (
    FilesystemUsage,
    InvalidArgument,
    PluginContext,
    Readiness,
    Whiteouts,
    hookimpl,
    make_directories,
    mounts,
    remove_path,
)
from shimhub_storage.driver import UnionDriverBase

#: The kernel copies mount options into one page.
MOUNT_OPTIONS_LIMIT = 4096
#: The ID-mapped bind of the driver root that a container in a user namespace takes its layers from.
IDMAPPED_LAYERS = "layers-idmapped"
#: Filesystems that cannot hold an overlay upper directory.
UNSUITABLE_BACKING = {"overlayfs", "aufs"}


def _opaque(directory: str) -> bool:
    try:
        return os.getxattr(directory, "trusted.overlay.opaque", follow_symlinks=False) == b"y"
    except OSError:
        return False


def _mount(options: str, target: Path, cwd: Path | None = None) -> None:
    mounts.run("mount", "-t", "overlay", "overlay", "-o", options, str(target), cwd=str(cwd) if cwd else None)


class OverlayWhiteouts(Whiteouts):
    """overlayfs's form: a deleted entry is a 0/0 character device, an opaque directory has an xattr."""

    def opaque(self, directory: str, created: Callable[[str], bool]) -> None:
        os.setxattr(directory, "trusted.overlay.opaque", b"y")

    def hide(self, path: str) -> None:
        make_directories(os.path.dirname(path))
        remove_path(path)
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(0, 0))


class OverlayDriver(UnionDriverBase):
    """Layers as overlayfs lower directories."""

    mount_dir = "merged"
    writable_dir = "upper"
    whiteouts = OverlayWhiteouts()

    @hookimpl
    def storage_setup(self, root: str, options: Mapping[str, Any], context: PluginContext) -> Readiness:
        self.configure(root, options, context)
        (self.root / "l").mkdir(exist_ok=True, mode=0o700)
        if not mounts.kernel_has_filesystem("overlay"):
            return self.ready("the kernel has no overlay filesystem (overlay module not loaded)")
        backing = mounts.filesystem_type(str(self.root))
        if backing in UNSUITABLE_BACKING:
            return self.ready(f"storage root {self.root} is on {backing}, which cannot hold overlay upper directories")
        return self.ready(self._probe())

    def _probe(self) -> str:
        """Mount a tiny overlay to prove the kernel and backing filesystem accept one; the problem or ""."""
        probe = self.scratch()
        for sub in ("lower", "upper", "work", "merged"):
            (probe / sub).mkdir()
        try:
            _mount(f"lowerdir={probe / 'lower'},upperdir={probe / 'upper'},workdir={probe / 'work'}", probe / "merged")
        except Exception as exc:  # noqa: BLE001 - any failure means overlay cannot be used here
            return f"a test overlay mount failed: {exc}"
        finally:
            mounts.unmount(str(probe / "merged"))
            mounts.remove_tree(probe)
        return ""

    def _link(self, layer_id: str) -> str:
        return (self.layer_dir(layer_id) / "link").read_text()

    def _chain(self, layer_id: str) -> list[str]:
        """Short links of `layer_id` and its ancestors, top first."""
        lower = self.layer_dir(layer_id) / "lower"
        parents = lower.read_text().split(":") if lower.exists() and lower.read_text() else []
        return [f"l/{self._link(layer_id)}", *parents]

    @hookimpl
    def storage_layer_apply(self, layer_id: str, parent_id: str, diff: IO[bytes]) -> FilesystemUsage:
        link = secrets.token_hex(13).upper()

        def describe(work: Path) -> None:
            (work / "link").write_text(link)
            (work / "lower").write_text(":".join(self._chain(parent_id)) if parent_id else "")

        if self.add_layer(layer_id, diff, describe):
            os.symlink(f"../layers/{layer_id}/diff", self.root / "l" / link)
        return mounts.tree_usage(str(self.layer_dir(layer_id) / "diff"))

    @hookimpl
    def storage_layer_remove(self, layer_id: str) -> None:
        target = self.layer_dir(layer_id)
        if target.exists():
            (self.root / "l" / self._link(layer_id)).unlink(missing_ok=True)
            mounts.remove_tree(target)

    @hookimpl
    def storage_rootfs_create(self, container_id: str, layer_id: str) -> None:
        directory = self.container_dir(container_id)
        directory.mkdir(mode=0o700)
        for sub in ("upper", "work", "merged", "empty"):
            (directory / sub).mkdir(mode=0o755)
        lowers = self._chain(layer_id) if layer_id else [os.path.relpath(directory / "empty", self.root)]
        (directory / "lower").write_text(":".join(lowers))

    def mount_options(self, container_id: str) -> str:
        """The overlay mount options of a container (lower dirs relative to the driver root)."""
        directory = self.container_dir(container_id)
        lowers = (directory / "lower").read_text()
        options = f"lowerdir={lowers},upperdir={directory / 'upper'},workdir={directory / 'work'}"
        if len(options) >= MOUNT_OPTIONS_LIMIT:
            raise InvalidArgument(f"the image has too many layers for an overlay mount ({lowers.count(':') + 1})")
        return options

    @hookimpl
    def storage_rootfs_mount(self, container_id: str) -> str:
        merged = self.container_dir(container_id) / "merged"
        if not os.path.ismount(merged):
            _mount(self.mount_options(container_id), merged, cwd=self.root)  # lower dirs are relative to the root
        return str(merged)

    @hookimpl
    def storage_rootfs_mount_idmapped(self, container_id: str, user_namespace: str, root: tuple[int, int]) -> str:
        """The overlay over ID-mapped layers: the driver root bound ID-mapped once for the container, the
        lower dirs named through it; the upper dir stays as it is, owned by the namespace's root, so what
        the container writes is stored with its host ids."""
        directory = self.container_dir(container_id)
        merged = directory / "merged"
        if os.path.ismount(merged):
            return str(merged)
        layers = directory / IDMAPPED_LAYERS
        layers.mkdir(exist_ok=True, mode=0o700)
        if not mounts.is_mounted(str(layers)):
            mounts.idmapped_bind(str(self.root), str(layers), user_namespace)
        os.chown(directory / "upper", *root)
        _mount(self.mount_options(container_id), merged, cwd=layers)
        return str(merged)

    @hookimpl
    def storage_rootfs_diff(self, container_id: str, out: IO[bytes]) -> None:
        """The upper directory as an OCI layer: overlay's 0/0 devices and opaque marks become .wh. entries."""
        upper = self.container_dir(container_id) / "upper"
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as archive:
            for directory, names, files in os.walk(upper):
                names.sort()
                relative = os.path.relpath(directory, upper)
                for name in sorted(names) + sorted(files):
                    path = os.path.join(directory, name)
                    entry = os.path.normpath(os.path.join(relative, name))
                    info = os.lstat(path)
                    if stat.S_ISCHR(info.st_mode) and info.st_rdev == 0:
                        archive.addfile(tarfile.TarInfo(os.path.join(os.path.dirname(entry), f".wh.{name}")))
                        continue
                    archive.add(path, arcname=entry, recursive=False)
                    if stat.S_ISDIR(info.st_mode) and _opaque(path):
                        archive.addfile(tarfile.TarInfo(os.path.join(entry, ".wh..wh..opq")))

    @hookimpl
    def storage_rootfs_unmount(self, container_id: str) -> None:
        directory = self.container_dir(container_id)
        mounts.unmount(str(directory / self.mount_dir))
        mounts.unmount(str(directory / IDMAPPED_LAYERS))

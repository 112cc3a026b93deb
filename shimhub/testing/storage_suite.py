"""The conformance suite for storage drivers, through their hooks as shimhub calls them.

Subclass `StorageConformance`, set `driver` (and `options`); override `root()` when
the driver needs its storage root on a particular filesystem. A driver that says
it is not ready on this node (`storage_setup` returning ``ready=False``) is skipped
with its reason, or fails where SHIMHUB_REQUIRE_READY names it (see `readiness`).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, ClassVar

import pytest

from shimhub import mountinfo, plugins
from shimhub.mounts import is_mounted
from shimhub.plugins import LoadedPlugin
from shimhub.testing.context import scratch_context
from shimhub.testing.layers import tar
from shimhub.testing.readiness import not_ready

#: A base layer with every kind of entry an image may hold (device nodes it may not: unpacking refuses them).
BASE = tar(
    ("etc", "dir", None),
    ("etc/hostname", "file", "base\n"),
    ("etc/gone.conf", "file", "delete me\n"),
    ("data", "dir", None),
    ("data/old-1", "file", "1"),
    ("data/old-2", "file", "2"),
    ("bin", "dir", None),
    ("bin/tool", "file", "#!/bin/sh\necho tool\n", {"mode": 0o4755, "uid": 1000, "gid": 1001}),
    ("bin/alias", "symlink", "tool"),
    ("bin/hard", "hardlink", "bin/tool"),
    ("pipe", "fifo", None),
    ("etc/capable", "file", "x", {"pax_headers": {"SCHILY.xattr.user.note": "kept"}}),
)
#: A layer on top: a whiteout, an opaque directory, a new file and a changed one.
TOP = tar(
    ("etc/.wh.gone.conf", "file", ""),
    ("data/.wh..wh..opq", "file", ""),
    ("data/new", "file", "fresh"),
    ("etc/hostname", "file", "top\n"),
)


class StorageConformance:
    """The storage driver contract. Subclass and set `driver`."""

    #: The driver's entry point name (group ``shimhub.storage``).
    driver: ClassVar[str] = ""
    #: The driver's options table.
    options: ClassVar[dict[str, Any]] = {}

    def root(self, request: pytest.FixtureRequest, tmp_path: Path) -> Path:
        """The storage root to give the driver (default: a directory under the test's tmp_path)."""
        return tmp_path / "storage"

    @pytest.fixture
    def storage(self, request: pytest.FixtureRequest, tmp_path: Path) -> LoadedPlugin:
        """The driver, set up on a fresh root (kept as `.root`)."""
        if not self.driver:
            pytest.fail(f"{type(self).__name__}: set `driver` to the storage driver's entry point name")
        root = self.root(request, tmp_path)
        root.mkdir(parents=True)
        loaded = plugins.load("storage", self.driver)
        context = scratch_context(self.driver, tmp_path)
        readiness = loaded.call("storage_setup", root=str(root), options=dict(self.options), context=context)
        if not readiness.ready:
            not_ready("storage", self.driver, readiness.reason)
        loaded.root = root  # type: ignore[attr-defined]
        return loaded

    def test_layers_whiteouts_rootfs_usage_and_cleanup(self, storage: LoadedPlugin) -> None:
        """storage_layer_apply, _rootfs_create/_mount/_unmount/_remove, _usage, _layer_remove."""
        base = storage.call("storage_layer_apply", layer_id="base", parent_id="", diff=io.BytesIO(BASE))
        assert base.inodes_used >= 10, f"storage_layer_apply: {base.inodes_used} inodes for a 13-entry layer"
        storage.call("storage_layer_apply", layer_id="top", parent_id="base", diff=io.BytesIO(TOP))
        storage.call("storage_rootfs_create", container_id="c1", layer_id="top")
        rootfs = Path(storage.call("storage_rootfs_mount", container_id="c1"))

        assert (rootfs / "etc/hostname").read_text() == "top\n", "storage_rootfs_mount: the upper layer must win"
        assert not (rootfs / "etc/gone.conf").exists(), "storage_layer_apply: a whiteout did not hide its file"
        assert sorted(os.listdir(rootfs / "data")) == ["new"], "storage_layer_apply: an opaque dir shows lower files"
        tool = (rootfs / "bin/tool").stat()
        assert (tool.st_mode & 0o7777, tool.st_uid, tool.st_gid) == (0o4755, 1000, 1001), (
            "storage_layer_apply: mode or owner not kept"
        )
        assert os.readlink(rootfs / "bin/alias") == "tool", "storage_layer_apply: symlink"
        assert (rootfs / "bin/hard").read_text() == "#!/bin/sh\necho tool\n", "storage_layer_apply: hard link"
        assert os.stat(rootfs / "bin/hard").st_nlink == 2, "storage_layer_apply: a hard link became a copy"
        assert os.getxattr(rootfs / "etc/capable", "user.note") == b"kept", "storage_layer_apply: xattr lost"
        assert not any(name.startswith(".wh.") for _d, dirs, files in os.walk(rootfs) for name in dirs + files), (
            "storage_rootfs_mount: whiteout files are visible in the root filesystem"
        )

        before = storage.call("storage_usage", container_id="c1").used_bytes
        (rootfs / "written").write_bytes(b"x" * 200_000)
        after = storage.call("storage_usage", container_id="c1").used_bytes
        assert after >= before + 200_000, f"storage_usage: {before} -> {after} bytes after writing 200000"

        storage.call("storage_rootfs_create", container_id="c2", layer_id="top")
        other = Path(storage.call("storage_rootfs_mount", container_id="c2"))
        assert not (other / "written").exists(), "storage_rootfs_create: two containers share a writable layer"

        for container_id in ("c1", "c2"):
            storage.call("storage_rootfs_unmount", container_id=container_id)
            storage.call("storage_rootfs_remove", container_id=container_id)
            storage.call("storage_rootfs_remove", container_id=container_id)  # idempotent
        assert not is_mounted(str(rootfs)), "storage_rootfs_unmount: still mounted"
        for layer in ("top", "base"):
            storage.call("storage_layer_remove", layer_id=layer)
        root: Path = storage.root  # type: ignore[attr-defined]
        mounted = mountinfo.under(str(root))
        assert mounted == [], f"storage_rootfs_remove / storage_layer_remove left mounts: {mounted}"
        # The driver's own directories and files (<root>/<driver>/*) may stay; nothing of a layer or container may.
        kept = [p for p in root.rglob("*") if len(p.relative_to(root).parts) > 2]
        assert kept == [], f"storage_layer_remove / storage_rootfs_remove left files: {kept[:10]}"

    def test_applying_a_layer_again_is_harmless(self, storage: LoadedPlugin) -> None:
        """storage_layer_apply for a layer that exists (an interrupted pull retried) keeps it as it was."""
        first = storage.call("storage_layer_apply", layer_id="base", parent_id="", diff=io.BytesIO(BASE))
        again = storage.call("storage_layer_apply", layer_id="base", parent_id="", diff=io.BytesIO(b""))
        assert again.inodes_used == first.inodes_used, "storage_layer_apply: applying again changed the layer"
        storage.call("storage_layer_remove", layer_id="base")

    def test_container_without_image_layers(self, storage: LoadedPlugin) -> None:
        """storage_rootfs_create with no layer: an empty writable root filesystem."""
        storage.call("storage_rootfs_create", container_id="scratch", layer_id="")
        rootfs = Path(storage.call("storage_rootfs_mount", container_id="scratch"))
        (rootfs / "f").write_text("ok")
        assert (rootfs / "f").read_text() == "ok"
        storage.call("storage_rootfs_remove", container_id="scratch")  # removal unmounts first
        assert not is_mounted(str(rootfs)), "storage_rootfs_remove: a mounted root filesystem stayed mounted"
        assert not rootfs.exists(), "storage_rootfs_remove: the root filesystem is still there"

"""Every storage driver passes the same suite, through the plugin contract."""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import pytest

from shimhub import plugins
from shimhub.hooktypes import PluginContext
from shimhub.storage.common import is_mounted, kernel_has_filesystem
from shimhub.storage.devicemapper import device_mapper_problem
from tests.conftest import NEEDS_ROOT
from tests.layers import tar

pytestmark = NEEDS_ROOT

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
    ("dev-null", "chardev", (1, 3)),
    ("pipe", "fifo", None),
    ("etc/capable", "file", "x", {"pax_headers": {"SCHILY.xattr.user.note": "kept"}}),
)
TOP = tar(
    ("etc/.wh.gone.conf", "file", ""),
    ("data/.wh..wh..opq", "file", ""),
    ("data/new", "file", "fresh"),
    ("etc/hostname", "file", "top\n"),
)


def skip_reason(driver: str) -> str:
    if driver == "devicemapper":
        return device_mapper_problem()
    if driver == "aufs" and not kernel_has_filesystem("aufs"):
        return "the kernel has no aufs filesystem (aufs is an out-of-tree module)"
    return ""


@pytest.fixture(params=["vfs", "overlay", "btrfs", "devicemapper", "aufs"])
def driver(request: pytest.FixtureRequest, tmp_path: Path):
    name = request.param
    reason = skip_reason(name)
    if reason:
        pytest.skip(reason)
    root = request.getfixturevalue("btrfs_root") / tmp_path.name if name == "btrfs" else tmp_path / "storage"
    root.mkdir(parents=True)
    loaded = plugins.load("storage", name)
    context = PluginContext(
        name=name,
        state_dir=tmp_path / "state",
        run_dir=tmp_path / "run",
        log=logging.getLogger("test"),
        cgroup_driver="cgroupfs",
        extensions=None,
    )
    readiness = loaded.call("storage_setup", root=str(root), options={}, context=context)
    assert readiness.ready, readiness.reason
    loaded.root = root
    return loaded


def test_layers_whiteouts_rootfs_usage_and_cleanup(driver) -> None:
    base = driver.call("storage_layer_apply", layer_id="base", parent_id="", diff=io.BytesIO(BASE))
    assert base.inodes_used >= 10
    driver.call("storage_layer_apply", layer_id="top", parent_id="base", diff=io.BytesIO(TOP))
    driver.call("storage_rootfs_create", container_id="c1", layer_id="top")
    rootfs = Path(driver.call("storage_rootfs_mount", container_id="c1"))

    assert (rootfs / "etc/hostname").read_text() == "top\n"
    assert not (rootfs / "etc/gone.conf").exists()
    assert sorted(os.listdir(rootfs / "data")) == ["new"]
    tool = (rootfs / "bin/tool").stat()
    assert (tool.st_mode & 0o7777, tool.st_uid, tool.st_gid) == (0o4755, 1000, 1001)
    assert os.readlink(rootfs / "bin/alias") == "tool"
    assert (rootfs / "bin/hard").read_text() == "#!/bin/sh\necho tool\n"
    assert os.stat(rootfs / "bin/hard").st_nlink == 2
    assert os.stat(rootfs / "dev-null").st_rdev == os.makedev(1, 3)
    assert os.getxattr(rootfs / "etc/capable", "user.note") == b"kept"
    assert not any(name.startswith(".wh.") for _d, dirs, files in os.walk(rootfs) for name in dirs + files)

    before = driver.call("storage_usage", container_id="c1").used_bytes
    (rootfs / "written").write_bytes(b"x" * 200_000)
    assert driver.call("storage_usage", container_id="c1").used_bytes >= before + 200_000

    # A second container from the same layers does not see the first one's writes.
    driver.call("storage_rootfs_create", container_id="c2", layer_id="top")
    other = Path(driver.call("storage_rootfs_mount", container_id="c2"))
    assert not (other / "written").exists()

    for container_id in ("c1", "c2"):
        driver.call("storage_rootfs_unmount", container_id=container_id)
        driver.call("storage_rootfs_remove", container_id=container_id)
        driver.call("storage_rootfs_remove", container_id=container_id)  # idempotent
    assert not is_mounted(str(rootfs))
    for layer in ("top", "base"):
        driver.call("storage_layer_remove", layer_id=layer)
    leftovers = [
        p for p in (driver.root / driver.name).rglob("*") if p.name not in ("layers", "containers", "tmp", "l")
    ]
    assert leftovers == []
    with open("/proc/self/mountinfo") as mountinfo:
        assert str(driver.root) not in mountinfo.read()


def test_applying_a_layer_again_is_harmless(driver) -> None:
    first = driver.call("storage_layer_apply", layer_id="base", parent_id="", diff=io.BytesIO(BASE))
    again = driver.call("storage_layer_apply", layer_id="base", parent_id="", diff=io.BytesIO(b""))
    assert again.inodes_used == first.inodes_used
    driver.call("storage_layer_remove", layer_id="base")


def test_container_without_image_layers(driver) -> None:
    driver.call("storage_rootfs_create", container_id="scratch", layer_id="")
    rootfs = Path(driver.call("storage_rootfs_mount", container_id="scratch"))
    (rootfs / "f").write_text("ok")
    assert (rootfs / "f").read_text() == "ok"
    driver.call("storage_rootfs_remove", container_id="scratch")
    assert not rootfs.exists()

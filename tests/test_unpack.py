"""Layer unpacking: hostile tars are refused or confined, whiteouts take each driver's form."""

from __future__ import annotations

import io
import logging
import os
import stat
from pathlib import Path

import pytest

from shimhub import plugins
from shimhub.hooktypes import PluginContext
from shimhub.testing.layers import tar
from shimhub.unpack import APPLY, UnsafeLayer, unpack
from shimhub_storage.overlay import OverlayWhiteouts
from tests.conftest import NEEDS_ROOT

pytestmark = NEEDS_ROOT


@pytest.fixture
def target(tmp_path: Path) -> Path:
    layer = tmp_path / "jail" / "layer"
    layer.mkdir(parents=True)
    return layer


def outside(target: Path) -> list[str]:
    """Everything next to the layer directory: a write outside the layer would show up here."""
    return sorted(p.name for p in target.parent.parent.rglob("*") if target not in (p, *p.parents))


def test_dot_dot_is_refused(target: Path) -> None:
    with pytest.raises(UnsafeLayer, match=r"layer entry '\.\./escaped' points outside the layer"):
        unpack(io.BytesIO(tar(("../escaped", "file", "x"))), str(target), APPLY)
    assert outside(target) == ["jail"]


def test_absolute_names_stay_inside(target: Path) -> None:
    unpack(io.BytesIO(tar(("/etc/escaped", "file", "x"))), str(target), APPLY)
    assert (target / "etc/escaped").read_text() == "x"
    assert outside(target) == ["jail"]


@pytest.mark.parametrize("link_target", ["/", "..", "../..", "/tmp/../..", "a/../../.."])
def test_symlink_cannot_lead_a_write_outside(target: Path, link_target: str) -> None:
    layer = tar(("exit", "symlink", link_target), ("exit/escaped", "file", "x"))
    unpack(io.BytesIO(layer), str(target), APPLY)
    assert os.readlink(target / "exit") == link_target
    assert outside(target) == ["jail"]
    assert (target / "escaped").read_text() == "x"  # resolved as if the layer were the root


def test_symlink_from_an_earlier_layer_is_confined_too(target: Path) -> None:
    unpack(io.BytesIO(tar(("usr", "symlink", "/"))), str(target), APPLY)
    unpack(io.BytesIO(tar(("usr/escaped", "file", "x"))), str(target), APPLY)
    assert outside(target) == ["jail"]


@pytest.mark.parametrize("link_name", ["../../outside", "/../../outside", "sym/outside"])
def test_hardlinks_outside_the_layer_are_refused(target: Path, link_name: str) -> None:
    (target.parent.parent / "outside").write_text("secret")
    layer = tar(("sym", "symlink", "/.."), ("stolen", "hardlink", link_name))
    with pytest.raises(UnsafeLayer):
        unpack(io.BytesIO(layer), str(target), APPLY)
    assert not (target / "stolen").exists()


@pytest.mark.parametrize(("kind", "numbers"), [("chardev", (1, 1)), ("blockdev", (8, 0))])
def test_device_nodes_are_refused(target: Path, kind: str, numbers: tuple[int, int]) -> None:
    """/dev/mem (1:1) or the node's first disk (8:0) in an image would be a way out of a container."""
    with pytest.raises(UnsafeLayer, match=f"{numbers[0]}:{numbers[1]}; images may not carry device nodes"):
        unpack(io.BytesIO(tar(("dev/disk", kind, numbers))), str(target), APPLY)
    assert not (target / "dev" / "disk").exists()


def test_inert_overlay_whiteout_device_is_kept(target: Path) -> None:
    unpack(io.BytesIO(tar(("gone", "chardev", (0, 0)))), str(target), APPLY)
    assert os.stat(target / "gone").st_rdev == os.makedev(0, 0)


def test_garbage_and_size_limit(target: Path) -> None:
    with pytest.raises(UnsafeLayer, match="not a valid tar archive"):
        unpack(io.BytesIO(b"\x00not a tar" * 100), str(target), APPLY)
    with pytest.raises(UnsafeLayer, match="layer unpacks to more than 10 bytes"):
        unpack(io.BytesIO(tar(("big", "file", "x" * 11))), str(target), APPLY, max_bytes=10)


LOWER = tar(("d", "dir", None), ("d/a", "file", "a"), ("f", "file", "f"))
UPPER = tar(("d/.wh..wh..opq", "file", ""), ("d/b", "file", "b"), (".wh.f", "file", ""))


def test_apply_mode_deletes(target: Path) -> None:
    unpack(io.BytesIO(LOWER), str(target), APPLY)
    unpack(io.BytesIO(UPPER), str(target), APPLY)
    assert sorted(os.listdir(target)) == ["d"]
    assert os.listdir(target / "d") == ["b"]


def test_whiteout_does_not_hide_the_layers_own_entries(target: Path) -> None:
    unpack(
        io.BytesIO(
            tar(
                ("d", "dir", None),
                ("d/mine", "file", "m"),
                ("d/.wh..wh..opq", "file", ""),
                ("x", "file", "x"),
                (".wh.x", "file", ""),
            )
        ),
        str(target),
        APPLY,
    )
    assert (target / "d/mine").read_text() == "m"
    assert (target / "x").read_text() == "x"


def test_overlay_mode_marks(target: Path) -> None:
    unpack(io.BytesIO(UPPER), str(target), OverlayWhiteouts())
    assert stat.S_ISCHR(os.lstat(target / "f").st_mode)
    assert os.lstat(target / "f").st_rdev == os.makedev(0, 0)
    assert os.getxattr(target / "d", "trusted.overlay.opaque") == b"y"
    assert os.listdir(target / "d") == ["b"]


def test_aufs_mode_keeps_aufs_whiteouts_and_builds_branches(tmp_path: Path) -> None:
    driver = plugins.load("storage", "aufs")
    context = PluginContext(
        name="aufs",
        state_dir=tmp_path,
        run_dir=tmp_path,
        log=logging.getLogger("t"),
        cgroup_driver="cgroupfs",
        extensions=None,
    )
    readiness = driver.call("storage_setup", root=str(tmp_path / "storage"), options={}, context=context)
    assert readiness.reason in ("", "the kernel has no aufs filesystem (aufs is an out-of-tree module)")
    driver.call("storage_layer_apply", layer_id="low", parent_id="", diff=io.BytesIO(LOWER))
    driver.call("storage_layer_apply", layer_id="up", parent_id="low", diff=io.BytesIO(UPPER))
    diff = tmp_path / "storage/aufs/layers/up/diff"
    assert sorted(os.listdir(diff)) == [".wh.f", "d"]
    assert sorted(os.listdir(diff / "d")) == [".wh..wh..opq", "b"]
    driver.call("storage_rootfs_create", container_id="c", layer_id="up")
    layers = tmp_path / "storage/aufs/layers"
    assert driver.instance.branches("c") == (
        f"br={tmp_path}/storage/aufs/containers/c/rw=rw:{layers}/up/diff=ro+wh:{layers}/low/diff=ro+wh"
    )

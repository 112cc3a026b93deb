"""Layer unpacking: hostile tars are refused or confined, whiteouts take each driver's form."""

from __future__ import annotations

import io
import logging
import os
import stat
import threading
import time
from pathlib import Path

import psutil
import pytest

from shimhub import plugins
from shimhub.hooktypes import PluginContext
from shimhub.testing.layers import tar
from shimhub.unpack import APPLY, UnsafeLayer, Whiteouts, unpack
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


# -- hostile headers: refused by the bounded reader, in a confined child ------------------------


def raw_header(name: bytes, size: int, kind: bytes) -> bytes:
    """One ustar header block with a declared `size`, whatever follows it."""
    block = bytearray(512)
    block[0 : len(name)] = name
    block[100:108] = b"0000644\0"
    block[108:116] = block[116:124] = b"0000000\0"
    block[124:136] = f"{size:011o}\0".encode()
    block[136:148] = b"00000000000\0"
    block[156:157] = kind
    block[257:265] = b"ustar\x0000"
    block[148:156] = b" " * 8
    block[148:156] = f"{sum(block):06o}\0 ".encode()
    return bytes(block)


class Endless(io.RawIOBase):
    """`head`, then zeros without end; counts what was read."""

    def __init__(self, head: bytes) -> None:
        self.head = head
        self.consumed = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray) -> int:  # type: ignore[override]
        count = len(buffer)
        chunk = self.head[self.consumed : self.consumed + count]
        chunk += bytes(count - len(chunk))
        buffer[:count] = chunk
        self.consumed += count
        return count


@pytest.mark.parametrize("kind", [b"x", b"g", b"L", b"K"])
def test_huge_extended_headers_are_refused_before_they_are_read(target: Path, kind: bytes) -> None:
    """A header declaring 2.5 GiB: tarfile reads it whole (the daemon was OOM-killed); this reads none of it."""
    stream = Endless(raw_header(b"././@PaxHeader", 5 << 29, kind))
    with pytest.raises(UnsafeLayer, match=r"declares 2684354560 bytes; at most 1048576 are read"):
        unpack(stream, str(target), APPLY)  # type: ignore[arg-type]
    assert stream.consumed < 4 << 20


def test_quadratic_pax_header_holds_no_lock_of_the_daemon(target: Path) -> None:
    """CVE-2024-6232: 60 KB of digits in a PAX header take tarfile's regex seconds under the GIL on Pythons
    before 3.11.10; parsed in the child, the calling process goes on running."""
    digits = b"1" * 60_000
    layer = raw_header(b"x", len(digits), b"x") + digits + bytes(-len(digits) % 512) + bytes(1024)
    gaps: list[float] = []
    done = threading.Event()

    def tick() -> None:
        last = time.monotonic()
        while not done.is_set():
            time.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    ticker = threading.Thread(target=tick)
    ticker.start()
    started = time.monotonic()
    try:
        with pytest.raises(UnsafeLayer, match="malformed PAX record"):
            unpack(io.BytesIO(layer), str(target), APPLY)
    finally:
        done.set()
        ticker.join()
    assert time.monotonic() - started < 5
    assert max(gaps) < 1.0


class ListRoot(Whiteouts):
    """Writes what the child sees as "/" into the layer when asked to hide something."""

    def hide(self, path: str) -> None:
        with open(os.path.join(os.path.dirname(path), "seen"), "w") as seen:
            seen.write("\n".join(sorted(os.listdir("/"))))


class Sleeps(Whiteouts):
    def hide(self, path: str) -> None:
        time.sleep(30)


class Hoards(Whiteouts):
    def hide(self, path: str) -> None:
        self.hoard = bytearray(4 << 30)


def test_child_is_chrooted_into_the_target(target: Path) -> None:
    (target / "mine").mkdir()
    unpack(io.BytesIO(tar((".wh.x", "file", ""))), str(target), ListRoot())
    assert (target / "seen").read_text().split() == ["mine", "seen"]  # nothing of the node


def test_child_past_its_deadline_is_stopped(target: Path) -> None:
    started = time.monotonic()
    with pytest.raises(UnsafeLayer, match=r"stopped at a limit of the confined unpacker \(1 s"):
        unpack(io.BytesIO(tar((".wh.x", "file", ""))), str(target), Sleeps(), deadline=1)
    assert time.monotonic() - started < 10


def test_child_past_its_memory_is_stopped(target: Path) -> None:
    before = psutil.Process().memory_info().rss
    with pytest.raises(UnsafeLayer, match="more than the 512 MiB of memory the unpacker may use"):
        unpack(io.BytesIO(tar((".wh.x", "file", ""))), str(target), Hoards())
    assert psutil.Process().memory_info().rss - before < 32 << 20


def test_pax_names_xattrs_and_long_names_survive(target: Path) -> None:
    long_name = "d/" + "n" * 200
    layer = tar(
        ("d", "dir", None),
        (long_name, "file", "long"),
        ("ü-name", "file", "pax", {"pax_headers": {"SCHILY.xattr.user.k": "v", "mtime": "1700000000.5"}}),
        ("big-uid", "file", "u", {"uid": 3_000_000, "gid": 7}),
    )
    unpack(io.BytesIO(layer), str(target), APPLY)
    assert (target / long_name).read_text() == "long"
    assert os.getxattr(target / "ü-name", "user.k") == b"v"
    assert os.stat(target / "ü-name").st_mtime == 1700000000.5
    assert (os.stat(target / "big-uid").st_uid, os.stat(target / "big-uid").st_gid) == (3_000_000, 7)


def test_files_only_and_entry_limits(target: Path) -> None:
    with pytest.raises(UnsafeLayer, match="'s' is a link"):
        unpack(io.BytesIO(tar(("s", "symlink", "x"))), str(target), APPLY, files_only=True)
    with pytest.raises(UnsafeLayer, match="more than 2 entries"):
        unpack(
            io.BytesIO(tar(("a", "file", ""), ("b", "file", ""), ("c", "file", ""))), str(target), APPLY, max_entries=2
        )

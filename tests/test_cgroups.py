"""shimhub.cgroups on the node's real cgroup trees (v1 and, where mounted, v2)."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from shimhub import cgroups
from shimhub.testing.daemon import wait_for
from shimhub.testing.leaks import exited
from tests.conftest import NEEDS_ROOT

pytestmark = NEEDS_ROOT


def test_expand_cgroupfs_and_systemd_paths() -> None:
    assert cgroups.expand("/kubepods/burstable/pod1/abc") == "kubepods/burstable/pod1/abc"
    assert cgroups.expand("kubepods-burstable-pod1.slice") == (
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice"
    )
    assert cgroups.expand("kubepods-pod2.slice:shimhub:abc") == "kubepods.slice/kubepods-pod2.slice/shimhub-abc.scope"
    assert cgroups.expand(":shimhub:abc") == "system.slice/shimhub-abc.scope"


def _busy_in(procs_files: list[Path]) -> subprocess.Popen[bytes]:
    """A busy copy with a 4 MiB buffer, started once it is in every cgroup of `procs_files`.

    It allocates only after the move, because cgroup v1 leaves earlier memory charged where it was.
    """
    busy = subprocess.Popen(
        ["sh", "-c", "read go; exec dd if=/dev/zero of=/dev/null bs=4M"],
        stdin=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    for procs in procs_files:
        procs.write_text(str(busy.pid))
    assert busy.stdin is not None
    busy.stdin.write(b"go\n")
    busy.stdin.flush()
    return busy


def _stop(busy: subprocess.Popen[bytes], directories: list[Path]) -> None:
    busy.kill()
    busy.wait(5)
    for directory in directories:
        for _ in range(50):
            try:
                directory.rmdir()
                break
            except OSError:
                time.sleep(0.02)


@pytest.mark.skipif(cgroups.mode() != "unified" and not Path("/sys/fs/cgroup/unified").is_dir(), reason="no cgroup v2")
def test_usage_from_a_real_cgroup_v2_tree() -> None:
    root = cgroups.ROOT if cgroups.mode() == "unified" else cgroups.ROOT / "unified"
    name = f"shimhub-test-{secrets.token_hex(4)}"
    group = root / name
    group.mkdir()
    busy = _busy_in([group / "cgroup.procs"])
    try:
        time.sleep(0.6)
        usage = cgroups.usage(f"/{name}", root=root)
    finally:
        _stop(busy, [group])
    assert cgroups.mode(root) == "unified"
    assert usage.cpu_usage_core_nanoseconds is not None and usage.cpu_usage_core_nanoseconds > 2 * 10**8
    if "memory" in cgroups.v2_controllers(root):
        assert usage.memory_usage_bytes is not None and usage.memory_usage_bytes >= 4 * 2**20
    else:
        assert usage.memory_usage_bytes is None  # the memory controller is bound to the v1 tree here
    assert cgroups.usage(f"/{name}", root=root).cpu_usage_core_nanoseconds is None  # gone with the cgroup


@pytest.mark.skipif(cgroups.mode() == "unified", reason="no cgroup v1 controllers on this node")
def test_usage_from_real_cgroup_v1_controllers() -> None:
    name = f"shimhub-test-{secrets.token_hex(4)}"
    directories = [cgroups.ROOT / controller / name for controller in ("cpuacct", "memory", "pids")]
    for directory in directories:
        directory.mkdir()
    busy = _busy_in([d / "cgroup.procs" for d in directories])
    try:
        time.sleep(0.6)
        usage = cgroups.usage(f"/{name}")
    finally:
        _stop(busy, directories)
    assert usage.cpu_usage_core_nanoseconds is not None and usage.cpu_usage_core_nanoseconds > 2 * 10**8
    assert usage.memory_usage_bytes is not None and usage.memory_usage_bytes >= 4 * 2**20
    assert usage.memory_rss_bytes is not None and usage.memory_rss_bytes >= 4 * 2**20
    assert usage.process_count == 1
    assert usage.memory_limit_bytes is None  # no limit set
    assert not any(d.exists() for d in directories)
    assert os.path.basename(cgroups.expand(f"/{name}")) == name


def test_destroy_kills_every_process_and_removes_the_cgroup() -> None:
    name = f"shimhub-test-{secrets.token_hex(4)}"
    directory = cgroups.ROOT / name if cgroups.mode() == "unified" else cgroups.ROOT / "pids" / name
    directory.mkdir()
    parent = subprocess.Popen(["sh", "-c", "read go; sleep 300 & sleep 300 & wait"], stdin=subprocess.PIPE)
    family = psutil.Process(parent.pid)
    try:
        (directory / "cgroup.procs").write_text(str(parent.pid))
        assert parent.stdin is not None
        parent.stdin.write(b"go\n")
        parent.stdin.flush()  # the children start inside the cgroup
        members = wait_for(lambda: len(found := cgroups.processes(f"/{name}")) == 3 and found, timeout=10)
        children = [psutil.Process(pid) for pid in members - {parent.pid}]
        assert cgroups.destroy(f"/{name}", timeout=5) == 3
        assert parent.wait(5) == -9
        assert all(exited(child) for child in children)
        assert not directory.exists()
        assert cgroups.destroy(f"/{name}", timeout=5) == 0, "a cgroup that is gone has nothing to kill"
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in family.children():
                child.kill()
        parent.kill()
        parent.wait(5)
        if directory.exists():
            directory.rmdir()

"""The node's cgroup layout: which hierarchy is mounted where, and what it offers."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from shimhub.hooktypes import ContainerUsage, DeviceIo, Pressure, PressureLine

ROOT = Path("/sys/fs/cgroup")
#: cgroup v1 reports "no memory limit" as this page-rounded maximum, or above.
V1_UNLIMITED = 2**62


def mode(root: Path = ROOT) -> str:
    """ "unified" (cgroup v2 only), "hybrid" (v1 controllers plus a v2 tree) or "legacy" (v1 only)."""
    if (root / "cgroup.controllers").exists():
        return "unified"
    if (root / "unified" / "cgroup.controllers").exists():
        return "hybrid"
    return "legacy"


def v2_controllers(root: Path = ROOT) -> list[str]:
    """The controllers enabled in the node's cgroup v2 tree (wherever it is mounted)."""
    for tree in (root, root / "unified"):
        listing = tree / "cgroup.controllers"
        if listing.exists():
            return listing.read_text().split()
    return []


def _slice_directories(slice_name: str) -> list[str]:
    """The nested directories of a systemd slice: "a-b.slice" is "a.slice/a-b.slice"."""
    if slice_name in ("", "-.slice"):
        return []
    words = slice_name.removesuffix(".slice").split("-")
    return ["-".join(words[: i + 1]) + ".slice" for i in range(len(words))]


def expand(cgroups_path: str) -> str:
    """The directory (relative to a hierarchy's root) of an OCI `cgroupsPath` or a pod's cgroup parent.

    cgroupfs paths are used as given; a systemd slice becomes its nested
    directories, and the form "slice:prefix:name" adds "prefix-name.scope"
    below the slice (where runc places it).
    """
    if ":" not in cgroups_path:
        if cgroups_path.endswith(".slice") and "/" not in cgroups_path:
            return "/".join(_slice_directories(cgroups_path))
        return cgroups_path.strip("/")
    slice_name, prefix, name = cgroups_path.split(":", 2)
    scope = f"{prefix}-{name}.scope" if prefix else name
    return "/".join([*_slice_directories(slice_name or "system.slice"), scope])


#: Most bytes read of one cgroup file.
MAX_FILE = 1 << 20


def _read(path: Path | str) -> str | None:
    """A cgroup file's text (None when it cannot be read): plain system calls, as stats read hundreds."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        chunks = []
        size = 0
        while size < MAX_FILE:
            chunk = os.read(descriptor, 65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks).decode(errors="replace")
    except OSError:
        return None
    finally:
        os.close(descriptor)


def _number(path: Path) -> int | None:
    text = _read(path)
    if text is None or not text.strip():
        return None
    value = text.split()[0]
    return None if value == "max" else int(value)


def _flat_keyed(path: Path) -> dict[str, int]:
    text = _read(path) or ""
    return {key: int(value) for key, value in (line.split()[:2] for line in text.splitlines() if line.strip())}


def _directories(cgroups_path: str, root: Path) -> list[Path]:
    """A cgroup's directories, in every hierarchy that has it (v2, or each v1 controller's)."""
    relative = expand(cgroups_path)
    return [d for d in [root / relative, *root.glob(f"*/{relative}")] if (d / "cgroup.procs").exists()]


def _process_directories(cgroups_path: str, root: Path) -> list[Path]:
    """Where a cgroup's processes are listed: under cgroup v1 one controller's directory is enough (a
    container's processes are in every controller's), which spares a walk of all hierarchies."""
    if mode(root) != "unified":
        relative = expand(cgroups_path)
        for controller in ("pids", "memory", "cpuacct"):
            if os.path.exists(root / controller / relative / "cgroup.procs"):
                return [root / controller / relative]
    return _directories(cgroups_path, root)


def processes(cgroups_path: str, root: Path = ROOT) -> set[int]:
    """The pids in a cgroup."""
    found: set[int] = set()
    for directory in _directories(cgroups_path, root):
        found.update(int(pid) for pid in (_read(directory / "cgroup.procs") or "").split())
    return found


def destroy(cgroups_path: str, timeout: float, root: Path = ROOT) -> int:
    """SIGKILL every process in a cgroup, wait (at most `timeout` seconds) until none is left and remove the
    cgroup; return how many processes there were (0: the cgroup was empty or gone). Never the root cgroup."""
    if not expand(cgroups_path):
        return 0
    found = processes(cgroups_path, root)
    deadline = time.monotonic() + timeout
    left = found
    while left and time.monotonic() < deadline:
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)
        left = processes(cgroups_path, root)
    for directory in _directories(cgroups_path, root):
        with contextlib.suppress(OSError):  # still busy, or it has child cgroups: left for its owner to report
            directory.rmdir()
    return len(found)


def move(pid: int, cgroups_path: str, root: Path = ROOT) -> None:
    """Move process `pid` (all its threads) into an existing cgroup, in every hierarchy that has it."""
    for directory in _directories(cgroups_path, root):
        (directory / "cgroup.procs").write_text(f"{pid}\n")


def remove_if_empty(cgroups_path: str, root: Path = ROOT) -> None:
    """Remove a cgroup's directories that hold no process and no child cgroup (never the root cgroup)."""
    if not expand(cgroups_path):
        return
    for directory in _directories(cgroups_path, root):
        with contextlib.suppress(OSError):  # busy: in use by its owner
            directory.rmdir()


#: The leaf of a systemd scope in which crun runs a container's process, with its limits.
DELEGATED_LEAF = "container"


def usage(cgroups_path: str, root: Path = ROOT) -> ContainerUsage:
    """CPU, memory, process and block I/O usage of a cgroup, from cgroup v2 or v1 alike.

    Fields are None when the cgroup (or that controller) is gone, e.g. once the
    container has exited.
    """
    relative = expand(cgroups_path)
    now = time.time_ns()
    if mode(root) == "unified":
        group = root / relative
        memory = _flat_keyed(group / "memory.stat")
        current = _number(group / "memory.current")
        cpu = _flat_keyed(group / "cpu.stat")
        events = _flat_keyed(group / "memory.events")
        found = ContainerUsage(
            timestamp=now,
            cpu_usage_core_nanoseconds=_times(cpu.get("usage_usec"), 1000),
            memory_usage_bytes=current,
            memory_working_set_bytes=_working_set(current, memory.get("inactive_file")),
            memory_rss_bytes=memory.get("anon"),
            memory_page_faults=memory.get("pgfault"),
            memory_major_page_faults=memory.get("pgmajfault"),
            memory_limit_bytes=_number(group / "memory.max") or _number(group / DELEGATED_LEAF / "memory.max"),
            process_count=_number(group / "pids.current"),
            cpu_user_nanoseconds=_times(cpu.get("user_usec"), 1000),
            cpu_system_nanoseconds=_times(cpu.get("system_usec"), 1000),
            cpu_cfs_periods=cpu.get("nr_periods"),
            cpu_cfs_throttled_periods=cpu.get("nr_throttled"),
            cpu_cfs_throttled_nanoseconds=_times(cpu.get("throttled_usec"), 1000),
            memory_cache_bytes=memory.get("file"),
            memory_mapped_file_bytes=memory.get("file_mapped"),
            memory_kernel_bytes=memory.get("kernel"),
            memory_swap_bytes=_number(group / "memory.swap.current"),
            memory_max_usage_bytes=_number(group / "memory.peak"),
            memory_failcnt=events.get("max"),
            oom_events=events.get("oom_kill"),
            threads_max=_limit(group / "pids.max"),
            io=_io_v2(group / "io.stat"),
            cpu_pressure=_pressure(group / "cpu.pressure"),
            memory_pressure=_pressure(group / "memory.pressure"),
            io_pressure=_pressure(group / "io.pressure"),
            swap_limit_bytes=_number(group / "memory.swap.max"),
        )
        return _with_processes(found, [group])
    memory = _flat_keyed(root / "memory" / relative / "memory.stat")
    current = _number(root / "memory" / relative / "memory.usage_in_bytes")
    limit = _number(root / "memory" / relative / "memory.limit_in_bytes")
    with_swap = _number(root / "memory" / relative / "memory.memsw.usage_in_bytes")
    cpu = _flat_keyed(root / "cpu" / relative / "cpu.stat")
    oom = _flat_keyed(root / "memory" / relative / "memory.oom_control")
    found = ContainerUsage(
        timestamp=now,
        cpu_usage_core_nanoseconds=_number(root / "cpuacct" / relative / "cpuacct.usage"),
        memory_usage_bytes=current,
        memory_working_set_bytes=_working_set(current, memory.get("total_inactive_file")),
        memory_rss_bytes=memory.get("total_rss"),
        memory_page_faults=memory.get("total_pgfault"),
        memory_major_page_faults=memory.get("total_pgmajfault"),
        memory_limit_bytes=limit if limit is None or limit < V1_UNLIMITED else None,
        process_count=_number(root / "pids" / relative / "pids.current"),
        cpu_user_nanoseconds=_number(root / "cpuacct" / relative / "cpuacct.usage_user"),
        cpu_system_nanoseconds=_number(root / "cpuacct" / relative / "cpuacct.usage_sys"),
        cpu_cfs_periods=cpu.get("nr_periods"),
        cpu_cfs_throttled_periods=cpu.get("nr_throttled"),
        cpu_cfs_throttled_nanoseconds=cpu.get("throttled_time"),
        memory_cache_bytes=memory.get("total_cache"),
        memory_mapped_file_bytes=memory.get("total_mapped_file"),
        memory_kernel_bytes=_number(root / "memory" / relative / "memory.kmem.usage_in_bytes"),
        memory_swap_bytes=None if with_swap is None or current is None else max(with_swap - current, 0),
        memory_max_usage_bytes=_number(root / "memory" / relative / "memory.max_usage_in_bytes"),
        memory_failcnt=_number(root / "memory" / relative / "memory.failcnt"),
        oom_events=oom.get("oom_kill"),
        threads_max=_limit(root / "pids" / relative / "pids.max"),
        io=_io_v1(root / "blkio" / relative),
    )
    return _with_processes(found, _process_directories(cgroups_path, root))


#: Most processes of one cgroup whose threads and descriptors are counted.
PROCESS_SCAN_LIMIT = 256


def _with_processes(usage: ContainerUsage, directories: list[Path]) -> ContainerUsage:
    """Add the threads, file descriptors and sockets of the cgroup's processes (the first PROCESS_SCAN_LIMIT)."""
    pids = sorted({int(p) for d in directories for p in (_read(d / "cgroup.procs") or "").split()})
    if not pids:
        return usage
    threads = descriptors = sockets = 0
    for pid in pids[:PROCESS_SCAN_LIMIT]:
        try:
            threads += len(os.listdir(f"/proc/{pid}/task"))
            with os.scandir(f"/proc/{pid}/fd") as entries:
                for entry in entries:
                    descriptors += 1
                    with contextlib.suppress(OSError):
                        sockets += os.readlink(entry.path).startswith("socket:")
        except OSError:
            continue  # it exited meanwhile
    usage.threads, usage.file_descriptors, usage.sockets = threads, descriptors, sockets
    return usage


def _limit(path: Path) -> int | None:
    """A limit file's value, 0 for "max" (no limit), as cAdvisor reports it; None when absent."""
    text = _read(path)
    if text is None or not text.strip():
        return None
    return 0 if text.split()[0] == "max" else int(text.split()[0])


def _times(value: int | None, factor: int) -> int | None:
    return None if value is None else value * factor


def _pressure(path: Path) -> Pressure | None:
    """A cgroup v2 pressure file ("some avg10=0.12 avg60=0.05 avg300=0.01 total=1234", and "full ...")."""
    text = _read(path)
    if text is None:
        return None
    lines: dict[str, PressureLine] = {}
    for line in text.splitlines():
        kind, *pairs = line.split()
        values = dict(pair.split("=", 1) for pair in pairs if "=" in pair)
        try:
            lines[kind] = PressureLine(
                total_ns=int(values["total"]) * 1000,
                avg10=float(values["avg10"]),
                avg60=float(values["avg60"]),
                avg300=float(values["avg300"]),
            )
        except (KeyError, ValueError):
            continue
    return Pressure(some=lines["some"], full=lines.get("full")) if "some" in lines else None


def _io_v2(path: Path) -> list[DeviceIo]:
    """Per-device I/O from io.stat ("MAJ:MIN rbytes=.. wbytes=.. rios=.. wios=..")."""
    found = []
    for line in (_read(path) or "").splitlines():
        device, *pairs = line.split()
        major, _, minor = device.partition(":")
        values = dict(pair.split("=", 1) for pair in pairs if "=" in pair)
        found.append(
            DeviceIo(
                int(major),
                int(minor),
                read_bytes=int(values.get("rbytes", 0)),
                write_bytes=int(values.get("wbytes", 0)),
                reads=int(values.get("rios", 0)),
                writes=int(values.get("wios", 0)),
            )
        )
    return found


def _io_v1(group: Path) -> list[DeviceIo]:
    """Per-device I/O from blkio's recursive throttle counters ("MAJ:MIN Read N" lines)."""
    devices: dict[tuple[int, int], DeviceIo] = {}
    for name, read_field, write_field in (
        ("blkio.throttle.io_service_bytes_recursive", "read_bytes", "write_bytes"),
        ("blkio.throttle.io_serviced_recursive", "reads", "writes"),
    ):
        for line in (_read(group / name) or "").splitlines():
            parts = line.split()
            if len(parts) != 3 or parts[1] not in ("Read", "Write"):
                continue
            major, _, minor = parts[0].partition(":")
            entry = devices.setdefault((int(major), int(minor)), DeviceIo(int(major), int(minor)))
            setattr(entry, read_field if parts[1] == "Read" else write_field, int(parts[2]))
    return list(devices.values())


def _working_set(usage_bytes: int | None, inactive_file: int | None) -> int | None:
    """What the kubelet evicts on: usage minus the page cache the kernel can drop at once."""
    if usage_bytes is None:
        return None
    return max(usage_bytes - (inactive_file or 0), 0)

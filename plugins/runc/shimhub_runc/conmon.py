"""Starting containers under conmon, and reading what conmon records about them.

conmon creates the container with the OCI runtime, holds its stdio, writes
the kubelet's CRI log format, writes the exit code to ``<exit dir>/<id>`` and
an ``oom`` file in the persist dir when the kernel's OOM killer struck. It
daemonizes, so containers outlive shimhub.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from attrs import define

from shimhub.sdk import PluginFailed

LAUNCH_TIMEOUT = 60.0
#: conmon's control-FIFO messages: "<type> <height> <width>"; type 1 resizes the terminal, 2 reopens the log.
RESIZE, REOPEN_LOGS = 1, 2
#: Largest terminal conmon accepts.
MAX_TERMINAL = 1000


@define
class Monitor:
    """Where conmon keeps a container's files."""

    bundle: Path
    exit_dir: Path
    #: Where conmon makes each container's attach socket (must exist).
    socket_dir: Path

    @property
    def exit_file(self) -> Path:
        return self.exit_dir / self.bundle.name

    @property
    def oom_file(self) -> Path:
        return self.bundle / "oom"

    def exited(self) -> tuple[int, int] | None:
        """(exit code, finish time in ns) once conmon recorded the exit."""
        try:
            text = self.exit_file.read_text().strip()
            finished = self.exit_file.stat().st_mtime_ns
        except (FileNotFoundError, ValueError):
            return None
        return (int(text), finished) if text.lstrip("-").isdigit() else None

    def reopen_log(self) -> None:
        """Ask conmon to reopen the container's log file."""
        self._control(REOPEN_LOGS)

    def resize(self, width: int, height: int) -> None:
        """Resize the container's terminal (sizes conmon refuses are ignored)."""
        if 0 < width <= MAX_TERMINAL and 0 < height <= MAX_TERMINAL:
            self._control(RESIZE, height, width)

    def _control(self, kind: int, height: int = 0, width: int = 0) -> None:
        fd = os.open(self.bundle / "ctl", os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(fd, f"{kind} {height} {width}\n".encode())
        finally:
            os.close(fd)


def launch(
    conmon: str,
    runtime: str,
    runtime_args: list[str],
    container_id: str,
    monitor: Monitor,
    *,
    log_path: str,
    cgroup_driver: str,
    terminal: bool,
    stdin: bool,
    stdin_once: bool,
    conmon_slice: str = "",
    restore: str = "",
) -> int:
    """Create a container under conmon; return the container's pid once it exists.

    With `conmon_slice` (systemd driver), conmon runs in a scope of its own, shimhub-conmon-<id>.scope,
    in that slice; otherwise in shimhub's own cgroup. With `restore`, a directory of CRIU images, the
    container is restored from them instead, and runs at once.
    """
    sync_read, sync_write = os.pipe()
    start_read, start_write = os.pipe()
    scope = (
        [
            "systemd-run",
            "--scope",
            "--quiet",
            "--collect",
            f"--unit=shimhub-conmon-{container_id}",
            f"--slice={conmon_slice}",
        ]
        if conmon_slice
        else []
    )
    argv = [
        *scope,
        conmon,
        "--api-version",
        "1",
        "--cid",
        container_id,
        "--cuuid",
        container_id,
        "--name",
        container_id,
        "--runtime",
        runtime,
        "--bundle",
        str(monitor.bundle),
        "--container-pidfile",
        str(monitor.bundle / "pid"),
        "--conmon-pidfile",
        str(monitor.bundle / "conmon.pid"),
        "--exit-dir",
        str(monitor.exit_dir),
        "--persist-dir",
        str(monitor.bundle),
        "--socket-dir-path",
        str(monitor.socket_dir),
        "--log-path",
        f"k8s-file:{log_path or os.devnull}",
        "--log-level",
        "error",
        "--syslog",
    ]
    if cgroup_driver == "systemd":
        argv.append("--systemd-cgroup")
    argv += [arg for runtime_arg in runtime_args for arg in ("--runtime-arg", runtime_arg)]
    if terminal:
        argv.append("--terminal")
    if stdin:
        argv += ["--stdin"] if stdin_once else ["--stdin", "--leave-stdin-open"]
    if restore:
        argv += ["--restore", restore, "--runtime-opt", f"--work-path={monitor.bundle / 'restore-work'}"]
    env = {**os.environ, "_OCI_SYNCPIPE": str(sync_write), "_OCI_STARTPIPE": str(start_read)}
    try:
        process = subprocess.Popen(
            argv,
            pass_fds=(sync_write, start_read),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            cwd=monitor.bundle,  # conmon writes files (its oom marker) into its working directory
        )
    except OSError as exc:
        for fd in (sync_read, sync_write, start_read, start_write):
            os.close(fd)
        raise PluginFailed(f"cannot run {conmon}: {exc.strerror}") from exc
    os.close(sync_write)
    os.close(start_read)
    os.write(start_write, b"0")
    os.close(start_write)
    with os.fdopen(sync_read, "rb") as sync:
        answer = sync.readline()  # conmon keeps the pipe open after reporting the pid
    _out, err = process.communicate(timeout=LAUNCH_TIMEOUT)
    try:
        reply = json.loads(answer.splitlines()[0]) if answer else {}
    except ValueError:
        reply = {}
    pid = int(reply.get("data", -1))
    if pid <= 0:
        detail = (
            reply.get("message")
            or err.decode(errors="replace").strip()
            or f"conmon exited {process.returncode} and reported {answer.decode(errors='replace')!r}"
        )
        raise PluginFailed(f"creating container {container_id[:12]} failed: {detail}")
    return pid

"""Checkpoints of runc containers with CRIU: `runc checkpoint`, and conmon's restore."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path

from shimhub.sdk import DeadlineExceeded, FailedPrecondition, PluginFailed

CHECK_TIMEOUT = 30.0
#: Lines of CRIU's log quoted in an error.
LOG_LINES = 5


@functools.cache
def node_problem() -> str:
    """Why CRIU cannot run on this node ("" when `criu check` passes); asked once."""
    if shutil.which("criu") is None:
        return "criu is not installed (Debian package criu)"
    try:
        done = subprocess.run(["criu", "check"], capture_output=True, text=True, timeout=CHECK_TIMEOUT, check=False)
        version = subprocess.run(["criu", "--version"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"criu check could not run: {exc}"
    if done.returncode == 0:
        return ""
    errors = [line for line in done.stderr.splitlines() if "Error" in line] or done.stderr.splitlines()[-1:]
    release = version.stdout.split("\n", 1)[0].removeprefix("Version: ").strip() or "unknown"
    reason = errors[0].split("): ", 1)[-1] if errors else f"exit status {done.returncode}"
    return f"criu check fails on kernel {os.uname().release} with CRIU {release}: {reason}"


def _log_tail(work: Path, name: str) -> str:
    log = work / name
    if not log.exists():
        return ""
    lines = [line for line in log.read_text(errors="replace").splitlines() if "Error" in line]
    return "; ".join(lines[-LOG_LINES:])


def checkpoint(
    runtime_argv: list[str], container_id: str, images: str, work: Path, *, leave_running: bool, timeout: float
) -> None:
    """Dump the container's processes into `images` (CRIU's log in `work`)."""
    work.mkdir(parents=True, exist_ok=True)
    argv = [*runtime_argv, "checkpoint", f"--image-path={images}", f"--work-path={work}"]
    argv += ["--leave-running"] if leave_running else []
    try:
        done = subprocess.run([*argv, container_id], capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise DeadlineExceeded(f"checkpoint of container {container_id[:12]} took over {timeout:g} s") from None
    if done.returncode != 0:
        detail = _log_tail(work, "dump.log") or done.stderr.strip()[-512:]
        raise PluginFailed(f"checkpoint of container {container_id[:12]} failed: {detail}")


def require() -> None:
    """FailedPrecondition saying why, where CRIU cannot run."""
    problem = node_problem()
    if problem:
        raise FailedPrecondition(f"containers cannot be checkpointed on this node: {problem}")

"""Killing a process together with everything it started."""

from __future__ import annotations

import contextlib
import time

import psutil


def kill_tree(pid: int, timeout: float) -> None:
    """SIGKILL process `pid` and all its descendants, the deepest first, waiting (at most `timeout` seconds in
    all) until each level is gone: each process is reaped by its still living parent rather than left to an
    init that may never reap it."""
    deadline = time.monotonic() + timeout
    try:
        levels = [[psutil.Process(pid)]]
    except psutil.Error:
        return
    while levels[-1]:
        levels.append([child for parent in levels[-1] for child in _children(parent)])
    for level in reversed(levels):
        for process in level:
            with contextlib.suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(level, timeout=max(deadline - time.monotonic(), 0))


def _children(process: psutil.Process) -> list[psutil.Process]:
    try:
        return process.children()
    except psutil.Error:
        return []

"""The supervisor of one container: ``python -m shimhub_procrun.supervise DIR LOG_PATH -- ARGV...``.

It starts the container's command in a session of its own, writes what it prints
to LOG_PATH in the CRI format, and records in DIR the command's pid (``pid``) and,
when it ends, its exit code and time (``exit``). It runs detached from shimhub, so
a container keeps its output and its exit code while shimhub restarts. SIGUSR1
reopens the log (the kubelet rotated it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

from shimhub.sdk import crilog


def write_atomically(path: Path, text: str) -> None:
    """Whole or absent: the plugin may read the file at any moment."""
    partial = path.with_suffix(".tmp")
    partial.write_text(text)
    partial.rename(path)


def relay(pipe: IO[bytes], stream: str, log: crilog.LogFile) -> None:
    """Copy one output pipe of the command into the log until it closes."""
    while chunk := pipe.read1(65536):  # type: ignore[attr-defined]
        log.write(stream, chunk)


def main(argv: list[str]) -> int:
    directory, log_path, separator, *command = argv
    assert separator == "--", "usage: supervise DIR LOG_PATH -- ARGV..."
    state = Path(directory)
    log = crilog.LogFile(log_path)
    signal.signal(signal.SIGUSR1, lambda *_: log.reopen())
    env = dict(line.split("=", 1) for line in (state / "env").read_text().splitlines() if "=" in line)
    try:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
    except OSError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)  # the plugin reports this line
        return 127
    write_atomically(state / "pid", f"{process.pid} {time.time_ns()}")
    relays = [
        threading.Thread(target=relay, args=(pipe, name, log), daemon=True)
        for pipe, name in ((process.stdout, "stdout"), (process.stderr, "stderr"))
    ]
    for thread in relays:
        thread.start()
    code = process.wait()
    finished = time.time_ns()
    for thread in relays:
        thread.join(2)  # a background child may hold the pipes open: do not wait for it forever
    log.close()
    write_atomically(state / "exit", f"{code if code >= 0 else 128 - code} {finished}")
    return 0


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main(sys.argv[1:]))

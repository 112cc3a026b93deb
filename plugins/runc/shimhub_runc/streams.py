"""Processes the streaming server relays: `runc exec` for Exec, conmon's attach socket for Attach."""

from __future__ import annotations

import contextlib
import fcntl
import os
import selectors
import signal
import socket
import struct
import subprocess
import termios
import threading
import time
from pathlib import Path

from shimhub.sdk import STDERR, STDOUT, PluginFailed, fifos, processes
from shimhub_runc.conmon import Monitor

CHUNK = 32 * 1024
#: Seconds to wait for an exec's process to be killed and for runc to exit.
KILL_WAIT = 5.0
#: conmon's attach socket: packets of one type byte then data (2 stdout, 3 stderr); input of up to 8192 bytes.
ATTACH_STDERR = 3
ATTACH_PACKET = 8192 + 1
POLL = 0.1
#: Seconds of silence on the pipes after `runc exec` exited before they count as ended.
DRAIN_GRACE = 1.0


def _proc_path(directory: Path, name: str) -> tuple[int, str]:
    """A short path to `directory`/`name` through /proc, for unix sockets in deep directories.

    Returns the O_PATH descriptor that keeps the path valid (close it after use) and the path.
    """
    fd = os.open(directory, os.O_PATH)
    return fd, f"/proc/self/fd/{fd}/{name}"


def kill_command(pid_file: Path, runtime: subprocess.Popen[bytes], runtime_argv: list[str], container_id: str) -> None:
    """SIGKILL the command `runtime` (runc exec) runs and every process it started, and wait until they are gone.

    runc names the command in the pid file a moment after starting it. The
    deepest processes go first, so that each is reaped by its still living
    parent rather than left to a container init that may never reap it. In a
    gVisor sandbox the processes are not the host's: they are found with
    `runsc ps` and killed with `runsc kill --pid`.
    """
    deadline = time.monotonic() + KILL_WAIT
    internal = _internal_pid_file(pid_file)
    while runtime.poll() is None and time.monotonic() < deadline:
        try:
            if _is_runsc(runtime_argv):
                _kill_in_sandbox(runtime_argv, container_id, int(internal.read_text()), deadline)
            else:
                processes.kill_tree(int(pid_file.read_text()), max(deadline - time.monotonic(), 0))
            return
        except (OSError, ValueError, KeyError, TypeError, subprocess.SubprocessError):
            time.sleep(0.01)


def _is_runsc(runtime_argv: list[str]) -> bool:
    return os.path.basename(runtime_argv[0]) == "runsc"


def _internal_pid_file(pid_file: Path) -> Path:
    return pid_file.with_name(pid_file.name + ".internal")


def _kill_in_sandbox(runtime_argv: list[str], container_id: str, root: int, deadline: float) -> None:
    def sandbox_processes() -> dict[int, int]:
        """pid -> parent pid of the container's processes, from `runsc ps`'s table (its JSON has pids only)."""
        done = subprocess.run([*runtime_argv, "ps", container_id], capture_output=True, timeout=KILL_WAIT, check=False)
        lines = done.stdout.decode(errors="replace").splitlines()
        if not lines:
            return {}
        header = lines[0].split()
        pid, ppid = header.index("PID"), header.index("PPID")
        return {int(row.split()[pid]): int(row.split()[ppid]) for row in lines[1:] if row.strip()}

    parents = sandbox_processes()
    levels = [[root]]
    while levels[-1]:
        levels.append([pid for pid, parent in parents.items() if parent in levels[-1]])
    for level in reversed(levels):
        for pid in level:
            subprocess.run(
                [*runtime_argv, "kill", "--pid", str(pid), container_id, "KILL"],
                capture_output=True,
                timeout=KILL_WAIT,
                check=False,
            )
        while level and time.monotonic() < deadline and set(level) & set(sandbox_processes()):
            time.sleep(0.02)


def exec_argv(runtime: list[str], container_id: str, cmd: list[str], pid_file: Path, *, tty: bool = False) -> list[str]:
    """`runtime` (the OCI runtime and its global arguments) exec-ing `cmd` in the container."""
    internal = ["--internal-pid-file", str(_internal_pid_file(pid_file))] if _is_runsc(runtime) else []
    return [*runtime, "exec", "--pid-file", str(pid_file), *internal, *(["--tty"] if tty else []), container_id, *cmd]


class ExecProcess:
    """`runc exec` in the foreground: its exit code is the command's.

    Without a TTY the command's stdio are our pipes. With one, runc runs on a
    terminal of ours and relays it to the terminal it makes in the container
    (a foreground runc only takes a terminal that way); a resize is applied to
    ours and runc, told by SIGWINCH, copies it inward.
    """

    def __init__(
        self, runtime: list[str], container_id: str, cmd: list[str], pid_file: Path, *, tty: bool, stdin: bool
    ) -> None:
        self.pid_file = pid_file
        self.tty = tty
        self.master = -1
        self.closed = False
        self._silent_since = 0.0
        self._closing = threading.Lock()
        self.selector = selectors.DefaultSelector()
        self.runtime_argv, self.container_id = runtime, container_id
        argv = exec_argv(runtime, container_id, cmd, pid_file, tty=tty)
        if tty:
            self.master, terminal = os.openpty()
            try:
                self.process = subprocess.Popen(argv, stdin=terminal, stdout=terminal, stderr=terminal)
            except BaseException:
                os.close(self.master)
                raise
            finally:
                os.close(terminal)
            self.selector.register(self.master, selectors.EVENT_READ, STDOUT)
        else:
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            self.selector.register(self.process.stdout.fileno(), selectors.EVENT_READ, STDOUT)  # type: ignore[union-attr]
            self.selector.register(self.process.stderr.fileno(), selectors.EVENT_READ, STDERR)  # type: ignore[union-attr]

    def read_output(self) -> tuple[int, bytes]:
        """The next output, until both pipes end.

        The command's output can still arrive after `runc exec` has exited (the runtime relays it), so
        its exit is no reason to stop; only DRAIN_GRACE seconds of silence after it are: whatever still
        holds the pipes open then (a background process the command left) is not the command.
        """
        while self.selector.get_map():
            try:
                ready = self.selector.select(POLL)
            except (OSError, ValueError):
                break
            if not ready:
                if self.closed:
                    break
                if self.process.poll() is not None:
                    self._silent_since = self._silent_since or time.monotonic()
                    if time.monotonic() - self._silent_since > DRAIN_GRACE:
                        break
                continue
            for key, _ in ready:
                if self.closed:  # closed meanwhile (a timeout): its descriptors are gone
                    return STDOUT, b""
                try:
                    data = os.read(key.fd, CHUNK)
                except OSError:  # EIO: the terminal's last user is gone
                    data = b""
                if data:
                    self._silent_since = 0.0
                    return key.data, data
                with contextlib.suppress(KeyError, ValueError):  # a close under way cleared the selector
                    self.selector.unregister(key.fd)
        return STDOUT, b""

    def write_input(self, data: bytes) -> None:
        with contextlib.suppress(OSError, ValueError):
            if self.tty:
                fifos.write_all(self.master, data)
            elif self.process.stdin is not None:
                self.process.stdin.write(data)
                self.process.stdin.flush()

    def close_input(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            if self.tty:
                os.write(self.master, b"\x04")  # end of input, as a terminal's user would type it
            elif self.process.stdin is not None:
                self.process.stdin.close()

    def resize(self, width: int, height: int) -> None:
        if self.tty and self.master >= 0 and width > 0 and height > 0:
            fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))
            with contextlib.suppress(OSError):
                os.kill(self.process.pid, signal.SIGWINCH)

    def wait(self) -> int | None:
        return self.process.wait()

    def close(self) -> None:
        with self._closing:  # a client that leaves and the session's own end may close at once
            if self.closed:
                return
            self.closed = True
        if self.process.poll() is None:
            kill_command(self.pid_file, self.process, self.runtime_argv, self.container_id)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=KILL_WAIT)
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        self.pid_file.unlink(missing_ok=True)
        _internal_pid_file(self.pid_file).unlink(missing_ok=True)
        self.selector.close()
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        if self.master >= 0:
            os.close(self.master)
            self.master = -1


class AttachedContainer:
    """A connection to conmon's attach socket: the container's output from now on, and its stdin."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        dir_fd, path = _proc_path(monitor.bundle, "attach")
        try:
            self.socket.connect(path)
        except OSError as exc:
            self.socket.close()
            raise PluginFailed(f"cannot attach: the container's monitor does not answer ({exc.strerror})") from None
        finally:
            os.close(dir_fd)

    def read_output(self) -> tuple[int, bytes]:
        while True:
            try:
                packet = self.socket.recv(ATTACH_PACKET)
            except OSError:
                packet = b""
            if not packet:
                return STDOUT, b""
            if len(packet) > 1:
                return (STDERR if packet[0] == ATTACH_STDERR else STDOUT), packet[1:]

    def write_input(self, data: bytes) -> None:
        with contextlib.suppress(OSError):
            for start in range(0, len(data), ATTACH_PACKET - 1):
                self.socket.send(data[start : start + ATTACH_PACKET - 1])

    def close_input(self) -> None:
        with contextlib.suppress(OSError):
            self.socket.shutdown(socket.SHUT_WR)

    def resize(self, width: int, height: int) -> None:
        self.monitor.resize(width, height)

    def wait(self) -> int | None:
        return None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.socket.shutdown(socket.SHUT_RDWR)
        self.socket.close()

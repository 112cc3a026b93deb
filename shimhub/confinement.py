"""Hostile archives parsed outside the daemon: a helper process forks one confined child per archive.

The daemon never parses a layer or checkpoint tar itself. It starts a helper
process (``python3 -I -m shimhub.unpack``, which serves with `main`) once, on
first use, and hands it, for each archive, a pipe carrying the archive's bytes
and a pipe for the answer. The helper is single-threaded, so it may fork: the
child gets the two pipes as its standard input and output and nothing else,
and before it reads a byte it is

* chrooted into the target directory (no path can reach the node),
* limited in address space, CPU time, file size and open files,
* stopped by the kernel (SIGALRM) at a wall-clock deadline,
* killed when the helper dies, which is killed when the daemon dies,
* unable to gain privileges (no_new_privs).

The daemon then sees only the child's bounded JSON answer, or its silence: a
hostile archive costs one failed call, never the daemon's memory or its GIL.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import fcntl
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from typing import IO, Any

import psutil

#: Address space a child may take beyond the helper's own.
MEMORY_ALLOWANCE = 512 << 20
#: Wall-clock (and CPU) seconds one archive may take.
DEADLINE = 1800
OPEN_FILES = 64
ANSWER_LIMIT = 64 << 10
CHUNK = 1 << 20
_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38
_MESSAGE_LIMIT = 1 << 20
#: What a confined child does: the request and what `prepare` made of it, to a JSON-able answer.
Work = Callable[[dict[str, Any], Any], dict[str, Any]]


class Helper:
    """The daemon's side: the helper process running `module`, started on first use and again if it died."""

    def __init__(self, module: str) -> None:
        self.module = module
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._socket: socket.socket | None = None

    def _start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            self._process = subprocess.Popen(
                [sys.executable, "-I", "-m", self.module], stdin=theirs, stdout=subprocess.DEVNULL, close_fds=True
            )
        self._socket = ours

    def _ensure(self) -> socket.socket:
        if self._socket is None or self._process is None or self._process.poll() is not None:
            self._stop()
            self._start()
        assert self._socket is not None
        return self._socket

    def _stop(self) -> None:
        """Close the channel and reap the helper (which exits when its channel closes)."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def start(self) -> None:
        """Start the helper now (it imports what its children need), so that the first archive does not wait."""
        with self._lock:
            self._ensure()

    def _ask(self, request: bytes, fds: list[int]) -> dict[str, Any]:
        self._ensure()
        assert self._socket is not None
        self._socket.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        answer = self._socket.recv(_MESSAGE_LIMIT)
        if not answer:
            raise ConnectionError("the confinement helper exited")
        return json.loads(answer)

    def _fork(self, request: Mapping[str, Any], fds: list[int]) -> dict[str, Any]:
        encoded = json.dumps({**request, "sys_path": sys.path}).encode()
        with self._lock:
            try:
                return self._ask(encoded, fds)
            except (OSError, ConnectionError):
                self._stop()  # it died under us: once more with a new helper
                return self._ask(encoded, fds)

    def run(self, request: Mapping[str, Any], stream: IO[bytes]) -> bytes:
        """Have a confined child work on `stream` as `request` says (its "target" the root it is chrooted
        into, its "limits" the child's); the child's answer, b"" when a limit stopped it."""
        archive_read, archive_write = os.pipe()
        with contextlib.suppress(OSError):  # fewer, larger hand-overs: a pipe holds 64 KiB by default
            fcntl.fcntl(archive_write, fcntl.F_SETPIPE_SZ, CHUNK)
        answer_read, answer_write = os.pipe()
        try:
            reply = self._fork(request, [archive_read, answer_write])
        finally:
            os.close(archive_read)
            os.close(answer_write)
        try:
            if "error" in reply:
                os.close(archive_write)
                raise RuntimeError(f"the confinement helper refused: {reply['error']}")
            _pump(stream, archive_write)
        finally:
            answer = _read_all(answer_read)
        return answer


def _pump(stream: IO[bytes], descriptor: int) -> None:
    """Copy `stream` into the pipe until it ends or the child stops reading; the pipe is closed after."""
    try:
        while chunk := stream.read(CHUNK):
            view = memoryview(chunk)
            while view:
                view = view[os.write(descriptor, view) :]
    except BrokenPipeError:
        pass  # the child is done (end of the archive) or stopped: its answer says which
    finally:
        os.close(descriptor)


def _read_all(descriptor: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    try:
        while size <= ANSWER_LIMIT and (chunk := os.read(descriptor, ANSWER_LIMIT)):
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(descriptor)
    return b"".join(chunks)[:ANSWER_LIMIT]


# -- the helper process ------------------------------------------------------------------------


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option})")


def _confine(target: str, limits: Mapping[str, Any]) -> None:
    """Everything a child does before it reads the archive."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    os.closerange(3, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the file size limit fails with EFBIG instead
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    size = psutil.Process().memory_info().vms + MEMORY_ALLOWANCE
    deadline = max(1, int(limits["deadline"]))
    resource.setrlimit(resource.RLIMIT_AS, (size, size))
    resource.setrlimit(resource.RLIMIT_CPU, (deadline, deadline))
    resource.setrlimit(resource.RLIMIT_NOFILE, (OPEN_FILES, OPEN_FILES))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    largest = int(limits.get("max_bytes") or 0)
    if largest:
        resource.setrlimit(resource.RLIMIT_FSIZE, (largest, largest))
    os.chroot(target)
    os.chdir("/")
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)
    signal.alarm(deadline)


def _serve(channel: socket.socket, prepare: Callable[[dict[str, Any]], Any], work: Work) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    while True:
        message, ancillary, _flags, _address = channel.recvmsg(_MESSAGE_LIMIT, socket.CMSG_SPACE(2 * 4))
        if not message:
            return  # the daemon has gone
        fds = array.array("i")
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
        try:
            request = json.loads(message)
            for entry in request.get("sys_path", []):
                if entry not in sys.path:
                    sys.path.append(entry)
            prepared = prepare(request)
            if len(fds) != 2:
                raise ValueError("expected two descriptors")
        except Exception as exc:  # noqa: BLE001 - the daemon reports it
            for fd in fds:
                os.close(fd)
            channel.send(json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode())
            continue
        pid = os.fork()
        if pid == 0:
            _child(fds, request, prepared, work)
        for fd in fds:
            os.close(fd)
        channel.send(json.dumps({"pid": pid}).encode())


def _child(fds: array.array, request: dict[str, Any], prepared: Any, work: Work) -> None:
    """The forked child: confined, then `work` on standard input, its answer on standard output; never returns."""
    os.dup2(fds[0], 0)
    os.dup2(fds[1], 1)
    try:
        _confine(request["target"], request["limits"])
        answer = work(request, prepared)
    except MemoryError:
        answer = {"error": "memory"}
    except Exception as exc:  # noqa: BLE001 - told to the daemon
        answer = {"error": "internal", "message": f"{type(exc).__name__}: {exc}"}
    with contextlib.suppress(OSError):
        os.write(1, json.dumps(answer).encode())
    os._exit(0)


def main(prepare: Callable[[dict[str, Any]], Any], work: Work) -> None:
    """The helper: serve fork requests on the socket that is standard input until the daemon goes.

    `prepare(request)` runs in the helper (e.g. imports what the child needs, cached there);
    `work(request, prepared)` in the confined child, reading standard input: its JSON answer.
    """
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    with socket.socket(fileno=os.dup(0)) as channel:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)  # 0 and 1 stay taken, so that descriptors received are never 0 or 1
        os.close(null)
        _serve(channel, prepare, work)

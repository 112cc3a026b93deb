"""The gRPC server on the CRI unix socket, and the process's signal handling.

SIGTERM and SIGINT stop the server gracefully: new calls are refused, calls
in flight get ``shutdown_grace`` seconds to finish, and the socket is removed.
SIGHUP reloads the configuration (runtime handlers and log level).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import stat
import threading
from concurrent import futures
from pathlib import Path
from types import FrameType

import grpc

from shimhub.daemon import Daemon
from shimhub.rpc import WORKERS, lanes, service_handler
from shimhub.services.image import ImageService
from shimhub.services.runtime import RuntimeService
from shimhub.streaming.server import StreamingServer
from shimhub.telemetry import MetricsEndpoint
from shimhub_proto.cri.v1 import api_pb2 as cri

log = logging.getLogger(__name__)

SOCKET_MODE = 0o660
SOCKET_DIR_MODE = 0o750
#: Largest message accepted or sent; ListContainers on a busy node can be large.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class SocketInUse(Exception):
    """Another process serves on the socket path, or the path is not a socket."""


def prepare_socket_path(path: Path, run_dir: Path) -> None:
    """Create the socket's directory and remove a stale socket, refusing to take over a live one.

    Only a directory of shimhub's own (one it makes here, or its `run_dir`) gets the mode 0750:
    `--socket /run/x.sock` must leave /run as it is.
    """
    if not path.parent.exists() or path.parent == run_dir:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(path.parent, SOCKET_DIR_MODE)
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SocketInUse(f"{path} exists and is not a socket; remove it or choose another socket path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("removing stale socket %s", path)
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise SocketInUse(f"another process is serving on {path}")


class Server:
    """shimhub's gRPC server for one Daemon."""

    def __init__(self, daemon: Daemon, socket_path: Path) -> None:
        self.daemon = daemon
        self.socket_path = socket_path
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
        self.grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=WORKERS), options=options)
        self.streaming = StreamingServer(daemon.config.streaming)
        self.runtime_service = RuntimeService(daemon, self.streaming)
        self.metrics = (
            MetricsEndpoint(daemon.store, daemon.status_info, daemon.config.metrics_address)
            if daemon.config.metrics_address
            else None
        )
        shared = lanes()
        self.grpc.add_generic_rpc_handlers(
            [
                service_handler(cri.DESCRIPTOR.services_by_name["RuntimeService"], self.runtime_service, shared),
                service_handler(cri.DESCRIPTOR.services_by_name["ImageService"], ImageService(daemon), shared),
            ]
        )

    def start(self) -> None:
        """Bind the socket (0660, in a 0750 directory) and start serving: the streaming server and the metrics
        endpoint first, so that all is up once the socket answers (a client's sign that shimhub is ready)."""
        prepare_socket_path(self.socket_path, Path(self.daemon.config.run_dir))
        self.streaming.start()
        if self.metrics is not None:
            self.metrics.start()
        old_umask = os.umask(0o117)  # the socket is born 0660: no window with wider access
        try:
            self.grpc.add_insecure_port(f"unix:{self.socket_path}")
            self.grpc.start()
        finally:
            os.umask(old_umask)
        os.chmod(self.socket_path, SOCKET_MODE)
        log.info("serving CRI on %s", self.socket_path)

    def stop(self, grace: float) -> None:
        """Refuse new calls, let calls in flight finish for up to `grace` seconds, remove the socket."""
        self.runtime_service.events.close()
        if self.metrics is not None:
            self.metrics.stop()
        self.grpc.stop(grace).wait()
        self.streaming.stop()
        self.socket_path.unlink(missing_ok=True)
        log.info("stopped")


def run_until_signalled(server: Server, reload: callable) -> None:  # type: ignore[valid-type]
    """Serve until SIGTERM or SIGINT; call `reload` on SIGHUP. Must run on the main thread."""
    wake = threading.Event()
    pending: list[int] = []

    def note(signum: int, _frame: FrameType | None) -> None:
        pending.append(signum)
        wake.set()

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, note)
    server.start()
    while True:
        wake.wait()
        wake.clear()
        while pending:
            signum = pending.pop(0)
            if signum == signal.SIGHUP:
                reload()
            else:
                log.info("received %s: shutting down", signal.Signals(signum).name)
                server.stop(server.daemon.config.shutdown_grace)
                return

"""One connected NRI plugin: its registration, configuration, and the calls made to it."""

from __future__ import annotations

import logging
import re
import socket
import subprocess
import threading
from collections.abc import Callable
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from shimhub import errors, ttrpc
from shimhub.nri.mux import Trunk
from shimhub_proto.nri import api_pb2 as nri
from shimhub_proto.ttrpc import ttrpc_pb2

log = logging.getLogger(__name__)
PLUGIN_SERVICE = "nri.pkg.api.v1alpha1.Plugin"
RUNTIME_SERVICE = "nri.pkg.api.v1alpha1.Runtime"
#: The multiplexed connections: the plugin serves on the first, the runtime on the second.
PLUGIN_CONNECTION, RUNTIME_CONNECTION = 1, 2
NAME = re.compile(r"[A-Za-z0-9_.+-]{1,128}")
INDEX = re.compile(r"[0-9]{2}")
#: Every event a plugin may subscribe to (a plugin that names none gets them all).
ALL_EVENTS = (1 << (nri.LAST - 1)) - 1
M = TypeVar("M", bound=Message)
#: What the runtime does with a plugin's unsolicited UpdateContainers: the updates that failed.
UpdateHandler = Callable[["Plugin", nri.UpdateContainersRequest], list[nri.ContainerUpdate]]


class Plugin:
    """An NRI plugin on the other end of `stream`: registered, then configured by `configure`."""

    def __init__(self, stream: socket.socket, on_update: UpdateHandler, process: subprocess.Popen | None) -> None:
        self.trunk = Trunk(stream, "plugin")
        self.process = process
        self.name = ""
        self.index = ""
        self.events = 0
        self._on_update = on_update
        self._registered = threading.Event()
        self.client = ttrpc.Client("nri plugin", connection=self.trunk.open(PLUGIN_CONNECTION))
        runtime_side = self.trunk.open(RUNTIME_CONNECTION)
        self.trunk.start()
        threading.Thread(target=ttrpc.serve, args=(runtime_side, self._answer), name="nri runtime", daemon=True).start()

    def __repr__(self) -> str:
        return f"{self.index}-{self.name}" if self.name else "an unregistered NRI plugin"

    @property
    def connected(self) -> bool:
        return not self.trunk.closed and self.client.connected

    def _answer(self, request: ttrpc_pb2.Request) -> ttrpc_pb2.Response:
        if request.service != RUNTIME_SERVICE or request.method not in ("RegisterPlugin", "UpdateContainers"):
            return ttrpc.failure(grpc.StatusCode.UNIMPLEMENTED, f"{request.service}/{request.method} is not served")
        if request.method == "RegisterPlugin":
            registration = nri.RegisterPluginRequest.FromString(request.payload)
            if not NAME.fullmatch(registration.plugin_name) or not INDEX.fullmatch(registration.plugin_idx):
                return ttrpc.failure(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"plugin name {registration.plugin_name[:128]!r} and index {registration.plugin_idx[:8]!r}: "
                    "the name is of [A-Za-z0-9_.+-], the index two digits",
                )
            self.name, self.index = registration.plugin_name, registration.plugin_idx
            self._registered.set()
            return ttrpc_pb2.Response(payload=nri.Empty().SerializeToString())
        if not self._registered.is_set():
            return ttrpc.failure(grpc.StatusCode.FAILED_PRECONDITION, "the plugin has not registered")
        failed = self._on_update(self, nri.UpdateContainersRequest.FromString(request.payload))
        return ttrpc_pb2.Response(payload=nri.UpdateContainersResponse(failed=failed).SerializeToString())

    def configure(
        self, config: Callable[[str, str], str], runtime_version: str, registration_timeout: float, timeout: float
    ) -> None:
        """Wait for the plugin's registration, then configure it with its configuration text (from
        `config(index, name)`); its subscription is in `events` after."""
        if not self._registered.wait(registration_timeout):
            raise errors.DeadlineExceeded(f"the NRI plugin did not register within {registration_timeout:g} s")
        request = nri.ConfigureRequest(
            config=config(self.index, self.name),
            runtime_name="shimhub",
            runtime_version=runtime_version,
            registration_timeout=int(registration_timeout * 1000),
            request_timeout=int(timeout * 1000),
        )
        answer = self.call("Configure", request, nri.ConfigureResponse, timeout)
        self.events = answer.events & ALL_EVENTS or ALL_EVENTS

    def subscribed(self, event: int) -> bool:
        return bool(self.events & (1 << (event - 1)))

    def call(self, method: str, request: Message, response: type[M], timeout: float) -> M:
        """Call the plugin's `method`; DeadlineExceeded past `timeout`, Unavailable once it is gone."""
        return self.client.call(PLUGIN_SERVICE, method, request, response, timeout)

    def close(self) -> None:
        """Disconnect, and end the plugin's process if shimhub started it. Idempotent."""
        self.client.close()
        self.trunk.close()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

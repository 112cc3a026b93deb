"""A small NRI plugin for tests and benchmarks, speaking NRI's protocol on its own.

    python3 -m shimhub.testing.nri_plugin SOCKET NAME INDEX   # connects to a runtime's NRI socket
    python3 -m shimhub.testing.nri_plugin                     # started by a runtime (NRI_PLUGIN_SOCKET)

Its framing is written here from NRI's wire format, not taken from shimhub's
runtime side, so that the two check each other: 8-byte multiplexing headers
(connection id, length), ttrpc frames inside (length, stream id, type,
flags), the Plugin service served on connection 1 and the Runtime service
called on connection 2. Its configuration (JSON, from the runtime) says what
it does on CreateContainer (``mode``): ``adjust`` (an environment variable, an
annotation, a mount of ``mount_source``, the device /dev/nri-null and a 64 MiB
memory limit), ``evict`` (the container named ``victim`` when one named
``trigger`` is created), ``hang`` (never answers), ``crash`` (exits), or
``none``. On RunPodSandbox it waits ``pod_delay`` seconds, then answers the
error ``pod_error`` if that is set. Every call it gets is appended to
``events_file`` as a JSON line.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import threading
import time
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from shimhub_proto.nri import api_pb2 as nri
from shimhub_proto.ttrpc import ttrpc_pb2


class Refusal(Exception):
    """An error the plugin answers a call with."""


MUX = struct.Struct(">II")
TTRPC = struct.Struct(">IIBB")
REQUEST, RESPONSE = 1, 2
PLUGIN, RUNTIME = 1, 2
MEMORY_LIMIT = 64 << 20
REQUESTS = {
    "Configure": nri.ConfigureRequest,
    "Synchronize": nri.SynchronizeRequest,
    "Shutdown": nri.Empty,
    "RunPodSandbox": nri.RunPodSandboxRequest,
    "StopPodSandbox": nri.StopPodSandboxRequest,
    "RemovePodSandbox": nri.RemovePodSandboxRequest,
    "CreateContainer": nri.CreateContainerRequest,
    "PostCreateContainer": nri.PostCreateContainerRequest,
    "StartContainer": nri.StartContainerRequest,
    "PostStartContainer": nri.PostStartContainerRequest,
    "StopContainer": nri.StopContainerRequest,
    "RemoveContainer": nri.RemoveContainerRequest,
}


class TestPlugin:
    """One connection to the runtime."""

    def __init__(self, stream: socket.socket, name: str, index: str) -> None:
        self.stream = stream
        self.name, self.index = name, index
        self.settings: dict[str, Any] = {}
        self.names: dict[str, str] = {}  # container name -> id, from what the runtime told
        self._buffers = {PLUGIN: bytearray(), RUNTIME: bytearray()}
        self._answers: dict[int, bytes] = {}
        self._answered = threading.Condition()
        self._write = threading.Lock()

    def send(self, connection: int, stream_id: int, kind: int, data: bytes) -> None:
        frame = TTRPC.pack(len(data), stream_id, kind, 0) + data
        with self._write:
            self.stream.sendall(MUX.pack(connection, len(frame)) + frame)

    def register(self) -> None:
        request = ttrpc_pb2.Request(
            service="nri.pkg.api.v1alpha1.Runtime",
            method="RegisterPlugin",
            payload=nri.RegisterPluginRequest(plugin_name=self.name, plugin_idx=self.index).SerializeToString(),
        )
        self.send(RUNTIME, 1, REQUEST, request.SerializeToString())
        with self._answered:
            self._answered.wait_for(lambda: 1 in self._answers, 10)
        answer = ttrpc_pb2.Response.FromString(self._answers.pop(1))
        if answer.status.code:
            sys.exit(f"registration refused: {answer.status.message}")

    def run(self) -> None:
        """Read frames until the runtime closes the connection."""
        reader = self.stream.makefile("rb")
        while len(header := reader.read(MUX.size)) == MUX.size:
            connection, length = MUX.unpack(header)
            buffer = self._buffers.get(connection)
            data = reader.read(length)
            if buffer is None:
                continue
            buffer += data
            while len(buffer) >= TTRPC.size and len(buffer) >= TTRPC.size + TTRPC.unpack_from(buffer)[0]:
                size, stream_id, kind, _ = TTRPC.unpack_from(buffer)
                payload = bytes(buffer[TTRPC.size : TTRPC.size + size])
                del buffer[: TTRPC.size + size]
                if connection == PLUGIN and kind == REQUEST:
                    threading.Thread(target=self.serve, args=(stream_id, payload), daemon=True).start()
                elif connection == RUNTIME and kind == RESPONSE:
                    with self._answered:
                        self._answers[stream_id] = payload
                        self._answered.notify_all()

    def serve(self, stream_id: int, payload: bytes) -> None:
        request = ttrpc_pb2.Request.FromString(payload)
        kind = REQUESTS.get(request.method)
        if request.service != "nri.pkg.api.v1alpha1.Plugin" or kind is None:
            answer = ttrpc_pb2.Response()
            answer.status.code, answer.status.message = 12, f"{request.method} is not implemented"  # UNIMPLEMENTED
            self.send(PLUGIN, stream_id, RESPONSE, answer.SerializeToString())
            return
        message = kind.FromString(request.payload)
        self.record(request.method, message)
        try:
            result = getattr(self, request.method, lambda _message: nri.Empty())(message)
        except Refusal as refusal:
            answer = ttrpc_pb2.Response()
            answer.status.code, answer.status.message = 2, str(refusal)  # UNKNOWN, as a Go plugin's error
            self.send(PLUGIN, stream_id, RESPONSE, answer.SerializeToString())
            return
        if result is None:
            return
        self.send(
            PLUGIN, stream_id, RESPONSE, ttrpc_pb2.Response(payload=result.SerializeToString()).SerializeToString()
        )
        if request.method == "Shutdown":
            os._exit(0)

    def record(self, method: str, message: Message) -> None:
        for found in [getattr(message, "container", None), *getattr(message, "containers", [])]:
            if found is not None and found.name:
                self.names[found.name] = found.id
        path = self.settings.get("events_file")
        if path:
            with open(path, "a") as events:
                events.write(json.dumps({"method": method, "request": json_format.MessageToDict(message)}) + "\n")

    def Configure(self, request: nri.ConfigureRequest) -> nri.ConfigureResponse:
        self.settings = json.loads(request.config or "{}")
        self.record("Configure", request)
        return nri.ConfigureResponse(events=0)  # all events

    def Synchronize(self, request: nri.SynchronizeRequest) -> nri.SynchronizeResponse:
        return nri.SynchronizeResponse()

    def RunPodSandbox(self, request: nri.RunPodSandboxRequest) -> nri.Empty:
        time.sleep(float(self.settings.get("pod_delay", 0)))
        if self.settings.get("pod_error"):
            raise Refusal(self.settings["pod_error"])
        return nri.Empty()

    def StopContainer(self, request: nri.StopContainerRequest) -> nri.StopContainerResponse:
        return nri.StopContainerResponse()

    def CreateContainer(self, request: nri.CreateContainerRequest) -> nri.CreateContainerResponse | None:
        mode = self.settings.get("mode", "none")
        answer = nri.CreateContainerResponse()
        if mode == "hang":
            time.sleep(3600)
            return None
        if mode == "crash":
            os._exit(3)
        if mode == "adjust":
            adjust = answer.adjust
            adjust.env.add(key="NRI_ADDED", value=f"by-{self.name}")
            adjust.annotations["nri.test/added"] = self.name
            adjust.mounts.add(
                destination="/nri-mount", type="bind", source=self.settings["mount_source"], options=["rbind", "ro"]
            )
            adjust.linux.devices.add(path="/dev/nri-null", type="c", major=1, minor=3)
            adjust.linux.devices[0].file_mode.value = 0o666
            adjust.linux.resources.memory.limit.value = MEMORY_LIMIT
        if mode == "evict" and request.container.name == "trigger" and "victim" in self.names:
            answer.evict.add(container_id=self.names["victim"], reason="the trigger came")
        return answer


def main() -> None:
    if "NRI_PLUGIN_SOCKET" in os.environ:
        stream = socket.socket(fileno=int(os.environ["NRI_PLUGIN_SOCKET"]))
        name, index = os.environ["NRI_PLUGIN_NAME"], os.environ["NRI_PLUGIN_IDX"]
    else:
        path, name, index = sys.argv[1:4]
        stream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stream.connect(path)
    plugin = TestPlugin(stream, name, index)
    reader = threading.Thread(target=plugin.run, daemon=True)
    reader.start()
    plugin.register()
    reader.join()


if __name__ == "__main__":
    main()

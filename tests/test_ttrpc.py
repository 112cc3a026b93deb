"""The ttrpc client and receiver, frame by frame, against a server socket the test drives by hand."""

from __future__ import annotations

import socket
import struct
import threading
from pathlib import Path

import pytest

from shimhub import errors, ttrpc
from shimhub_proto.containerd.task.v2 import shim_pb2 as task
from shimhub_proto.ttrpc import ttrpc_pb2

SERVICE = "containerd.task.v2.Task"


class HandServer:
    """A listening unix socket whose one connection the test reads and writes frame by frame."""

    def __init__(self, path: Path) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.address = f"unix://{path}"
        self.connection: socket.socket | None = None

    def accept(self) -> socket.socket:
        self.connection, _ = self.listener.accept()
        return self.connection

    def read_frame(self) -> tuple[bytes, int, int, int, bytes]:
        assert self.connection is not None
        header = self.connection.recv(10, socket.MSG_WAITALL)
        length, stream_id, kind, flags = struct.unpack(">IIBB", header)
        return header, stream_id, kind, flags, self.connection.recv(length, socket.MSG_WAITALL) if length else b""

    def respond(self, stream_id: int, response: ttrpc_pb2.Response) -> None:
        assert self.connection is not None
        self.connection.sendall(ttrpc.encode_frame(stream_id, ttrpc.RESPONSE, response.SerializeToString()))


@pytest.fixture
def server(tmp_path: Path):
    hand = HandServer(tmp_path / "s.sock")
    yield hand
    hand.listener.close()


def call_in_thread(client: ttrpc.Client, method: str, request, response_type, timeout: float = 5.0) -> dict:
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = client.call(SERVICE, method, request, response_type, timeout)
        except errors.ShimhubError as exc:
            outcome["error"] = exc

    outcome["thread"] = threading.Thread(target=run)
    outcome["thread"].start()
    return outcome


def test_a_call_is_one_request_frame_and_one_response_frame(server: HandServer) -> None:
    client = ttrpc.Client(server.address)
    server.accept()
    pending = call_in_thread(client, "State", task.StateRequest(id="abc"), task.StateResponse, timeout=2.5)
    header, stream_id, kind, flags, data = server.read_frame()
    assert (stream_id, kind, flags) == (1, 1, 0)
    assert header[:4] == struct.pack(">I", len(data)) and header[4:8] == b"\0\0\0\x01" and header[8:] == b"\x01\x00"
    request = ttrpc_pb2.Request.FromString(data)
    assert (request.service, request.method, request.timeout_nano) == (SERVICE, "State", 2_500_000_000)
    assert task.StateRequest.FromString(request.payload).id == "abc"
    server.respond(1, ttrpc_pb2.Response(payload=task.StateResponse(id="abc", pid=42).SerializeToString()))
    pending["thread"].join(5)
    assert pending["value"].pid == 42
    client.close()


def test_calls_are_multiplexed_and_answered_out_of_order(server: HandServer) -> None:
    client = ttrpc.Client(server.address)
    server.accept()
    first = call_in_thread(client, "Wait", task.WaitRequest(id="slow"), task.WaitResponse)
    _, first_id, _, _, _ = server.read_frame()
    second = call_in_thread(client, "State", task.StateRequest(id="fast"), task.StateResponse)
    _, second_id, _, _, _ = server.read_frame()
    assert (first_id, second_id) == (1, 3), "client streams use odd ids, counting up by two"
    server.respond(second_id, ttrpc_pb2.Response(payload=task.StateResponse(pid=3).SerializeToString()))
    second["thread"].join(5)
    assert second["value"].pid == 3 and first["thread"].is_alive(), "a long call does not hold up a short one"
    server.respond(first_id, ttrpc_pb2.Response(payload=task.WaitResponse(exit_status=7).SerializeToString()))
    first["thread"].join(5)
    assert first["value"].exit_status == 7
    client.close()


def test_status_codes_become_shimhub_errors(server: HandServer) -> None:
    client = ttrpc.Client(server.address)
    server.accept()
    for code, expected in ((5, errors.NotFound), (9, errors.FailedPrecondition), (2, errors.PluginFailed)):
        pending = call_in_thread(client, "Kill", task.KillRequest(id="x"), task.StateResponse)
        _, stream_id, _, _, _ = server.read_frame()
        server.respond(stream_id, ttrpc_pb2.Response(status=ttrpc_pb2.Status(code=code, message="no such task")))
        pending["thread"].join(5)
        assert type(pending["error"]) is expected and pending["error"].message == "Kill: no such task"
    client.close()


def test_a_silent_server_times_out_and_a_lost_one_fails_every_call(server: HandServer) -> None:
    client = ttrpc.Client(server.address)
    connection = server.accept()
    with pytest.raises(errors.DeadlineExceeded):
        client.call(SERVICE, "State", task.StateRequest(id="x"), task.StateResponse, 0.3)
    pending = call_in_thread(client, "Wait", task.WaitRequest(id="x"), task.WaitResponse, timeout=30)
    server.read_frame()
    server.read_frame()
    connection.close()
    pending["thread"].join(5)
    assert isinstance(pending["error"], errors.Unavailable) and not client.connected
    with pytest.raises(errors.Unavailable):
        client.call(SERVICE, "State", task.StateRequest(id="x"), task.StateResponse, 1)


def test_an_oversized_frame_ends_the_connection(server: HandServer) -> None:
    client = ttrpc.Client(server.address)
    connection = server.accept()
    pending = call_in_thread(client, "State", task.StateRequest(id="x"), task.StateResponse)
    server.read_frame()
    connection.sendall(struct.pack(">IIBB", ttrpc.MAX_DATA + 1, 1, ttrpc.RESPONSE, 0))
    pending["thread"].join(5)
    assert "limit" in pending["error"].message
    with pytest.raises(errors.InvalidArgument):
        ttrpc.encode_frame(1, ttrpc.REQUEST, b"x" * (ttrpc.MAX_DATA + 1))


def test_nobody_listening_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(errors.Unavailable, match="cannot connect"):
        ttrpc.Client(f"unix://{tmp_path}/nothing.sock")


def test_the_receiver_answers_every_call_and_hands_it_over(tmp_path: Path) -> None:
    received: list[ttrpc_pb2.Request] = []
    receiver = ttrpc.Receiver(f"@shimhub-test-{tmp_path.name}", received.append)
    client = ttrpc.Client(f"unix://@shimhub-test-{tmp_path.name}")
    answer = client.call("containerd.services.events.ttrpc.v1.Events", "Forward", task.StateRequest(id="e"),
                         task.StateResponse, 5)  # fmt: skip
    assert answer == task.StateResponse()
    assert [(r.method, task.StateRequest.FromString(r.payload).id) for r in received] == [("Forward", "e")]
    client.close()
    receiver.close()

"""SPDY/3.1 framing, frame by frame, and the server session over a socket pair."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import zlib

import pytest

from shimhub.errors import ResourceExhausted
from shimhub.streaming import spdy
from shimhub.streaming.requests import PortForwardRequest, RequestCache
from shimhub.testing.daemon import wait_for

pytestmark = pytest.mark.unit


def test_the_header_dictionary_is_the_drafts() -> None:
    # Length and zlib dictionary id of the SPDY/3 draft's dictionary (section 2.6.10.1).
    assert len(spdy.DICTIONARY) == 1423
    assert zlib.adler32(spdy.DICTIONARY) == 0xE3C6A7C2
    assert spdy.DICTIONARY.startswith(b"\x00\x00\x00\x07options\x00\x00\x00\x04head")
    assert spdy.DICTIONARY.endswith(b"utf-,*,enq=0.")


def test_control_and_data_frames_byte_for_byte() -> None:
    assert spdy.control_frame(spdy.PING, 0, struct.pack(">I", 5)) == bytes.fromhex("8003 0006 00000004 00000005")
    assert spdy.data_frame(3, spdy.FLAG_FIN, b"hi") == bytes.fromhex("00000003 01000002 6869")
    goaway = spdy.control_frame(spdy.GOAWAY, 0, struct.pack(">II", 7, 0))
    assert goaway == bytes.fromhex("8003 0007 00000008 00000007 00000000")


def test_header_blocks() -> None:
    block = spdy.encode_headers({"streamType": ["error"]})
    assert block == bytes.fromhex("00000001 0000000a") + b"streamtype" + bytes.fromhex("00000005") + b"error"
    assert spdy.decode_headers(spdy.encode_headers({"a": ["1", "2"], "b": [""]})) == {"a": ["1", "2"], "b": [""]}
    for broken in (block[:-1], block + b"x", b"\x00\x00"):
        with pytest.raises(spdy.ProtocolError):
            spdy.decode_headers(broken)


def test_header_compression_shares_one_zlib_stream_seeded_with_the_dictionary() -> None:
    compressor, decompressor = spdy.HeaderCompressor(), spdy.HeaderDecompressor()
    first = compressor.compress({"streamtype": ["stdout"], "port": ["80"]})
    assert first[0] & 0x0F == 8 and first[1] & 0x20  # deflate, with a preset dictionary...
    assert struct.unpack(">I", first[2:6])[0] == zlib.adler32(spdy.DICTIONARY)  # ...this one
    second = compressor.compress({"streamtype": ["stdout"], "port": ["81"]})
    assert len(second) < len(first)  # the second block refers back to the first
    assert decompressor.decompress(first) == {"streamtype": ["stdout"], "port": ["80"]}
    assert decompressor.decompress(second) == {"streamtype": ["stdout"], "port": ["81"]}
    with pytest.raises(spdy.ProtocolError):
        spdy.HeaderDecompressor().decompress(second)  # not decodable without the stream's history


def test_frames_that_are_refused() -> None:
    left, right = socket.socketpair()
    with left, right:
        left.sendall(struct.pack(">HHI", 0x8000 | 2, spdy.PING, 4) + b"\0\0\0\1")
        with pytest.raises(spdy.ProtocolError, match="version 2"):
            spdy.read_frame(right)
        left.sendall(struct.pack(">II", 1, spdy.MAX_FRAME + 1))
        with pytest.raises(spdy.ProtocolError, match="larger"):
            spdy.read_frame(right)
        left.sendall(spdy.data_frame(1, 0, b"abc")[:-1])
        left.shutdown(socket.SHUT_WR)
        with pytest.raises(spdy.ProtocolError, match="inside a frame"):
            spdy.read_frame(right)


class Peer:
    """The client end of a socket pair, speaking raw frames to a server Session."""

    def __init__(self) -> None:
        self.sock, server_end = socket.socketpair()
        self.sock.settimeout(5)
        self.opened: list[spdy.Stream] = []
        self.session = spdy.Session(server_end)
        self.session.on_stream = self.opened.append
        self.thread = threading.Thread(target=self.session.serve, daemon=True)
        self.thread.start()
        self.compressor = spdy.HeaderCompressor()

    def syn_stream(self, stream_id: int, headers: dict[str, list[str]], flags: int = 0) -> None:
        payload = struct.pack(">IIBB", stream_id, 0, 0, 0) + self.compressor.compress(headers)
        self.sock.sendall(spdy.control_frame(spdy.SYN_STREAM, flags, payload))


def test_session_opens_streams_relays_data_and_answers_pings() -> None:
    peer = Peer()
    peer.syn_stream(1, {"streamtype": ["stdin"]})
    reply = spdy.read_frame(peer.sock)
    assert (reply.kind, struct.unpack_from(">I", reply.payload)[0]) == (spdy.SYN_REPLY, 1)
    assert spdy.HeaderDecompressor().decompress(reply.payload[4:]) == {}
    stream = wait_for(lambda: peer.opened and peer.opened[0], timeout=5)  # handed over right after the reply
    assert stream.header("streamType") == "stdin"
    peer.sock.sendall(spdy.data_frame(1, 0, b"hello ") + spdy.data_frame(1, spdy.FLAG_FIN, b"world"))
    assert stream.inbox.read(5) + stream.inbox.read(5) == b"hello world"
    assert stream.inbox.read(5) == b"" and stream.inbox.read(5) == b""  # ended, and stays so
    stream.write(b"x" * (spdy.MAX_DATA + 1))
    stream.close()
    frames = [spdy.read_frame(peer.sock) for _ in range(3)]
    assert [(f.kind, f.stream_id, len(f.payload), f.flags) for f in frames] == [
        (0, 1, spdy.MAX_DATA, 0),
        (0, 1, 1, 0),
        (0, 1, 0, spdy.FLAG_FIN),
    ]
    peer.sock.sendall(spdy.control_frame(spdy.PING, 0, struct.pack(">I", 9)))
    pong = spdy.read_frame(peer.sock)
    assert (pong.kind, pong.payload) == (spdy.PING, struct.pack(">I", 9))
    peer.sock.sendall(spdy.control_frame(spdy.WINDOW_UPDATE, 0, struct.pack(">II", 1, 100)))  # ignored
    peer.syn_stream(2, {"streamtype": ["error"]})  # even ids belong to servers
    refused = spdy.read_frame(peer.sock)
    assert (refused.kind, refused.payload) == (spdy.RST_STREAM, struct.pack(">II", 2, spdy.PROTOCOL_ERROR))
    peer.syn_stream(3, {"streamtype": ["stdout"]})
    spdy.read_frame(peer.sock)
    peer.sock.sendall(spdy.control_frame(spdy.RST_STREAM, 0, struct.pack(">II", 3, spdy.CANCEL)))
    assert wait_for(lambda: len(peer.opened) == 2, timeout=5) and peer.opened[1].inbox.read(5) == b""
    peer.sock.close()
    peer.thread.join(5)
    assert peer.session.closed.is_set()


def test_closing_a_session_says_goaway_and_waits_for_the_peer() -> None:
    peer = Peer()
    peer.syn_stream(1, {"streamtype": ["error"]})
    spdy.read_frame(peer.sock)
    wait_for(lambda: peer.opened, timeout=5)
    closer = threading.Thread(target=peer.session.close, kwargs={"grace": 5})
    closer.start()
    goaway = spdy.read_frame(peer.sock)
    assert (goaway.kind, goaway.payload) == (spdy.GOAWAY, struct.pack(">II", 1, 0))
    assert peer.sock.recv(1) == b""  # the server's end is closed for writing
    assert closer.is_alive()  # ...and waits for ours
    peer.sock.close()
    closer.join(5)
    assert not closer.is_alive() and peer.opened[0].inbox.read(1) == b""


def test_request_tokens_are_single_use_expire_and_are_bounded() -> None:
    now = [100.0]
    cache = RequestCache(ttl=30, limit=2, clock=lambda: now[0])
    request = PortForwardRequest(ports=[80], connect=socket.create_connection)
    token = cache.put("portforward", request)
    assert len(token) >= 32 and token != cache.put("portforward", request)
    assert cache.take("exec", token) is None, "a token works only under its own kind of path"
    assert cache.take("portforward", token) is request and cache.take("portforward", token) is None
    assert cache.take("portforward", "made-up") is None
    cache.put("portforward", request)
    with pytest.raises(ResourceExhausted):
        cache.put("portforward", request)
    now[0] += 31  # everything pending has expired: room again, and old tokens are dead
    stale = cache.put("portforward", request)
    now[0] += 31
    assert cache.take("portforward", stale) is None


def test_an_inbox_holds_at_most_its_limit_and_pushes_back_on_the_feeder() -> None:
    inbox = spdy.Inbox(limit=10)
    inbox.feed(b"12345678")
    inbox.feed(b"9abcdefg")  # over the limit now: the next feed waits for the reader
    blocked = threading.Thread(target=inbox.feed, args=(b"more",))
    blocked.start()
    blocked.join(0.2)
    assert blocked.is_alive()
    assert inbox.read(1) == b"12345678"
    blocked.join(5)
    assert not blocked.is_alive()
    inbox.end()
    assert [inbox.read(1), inbox.read(1), inbox.read(1)] == [b"9abcdefg", b"more", b""]  # data fed before the end
    with pytest.raises(TimeoutError):
        spdy.Inbox().read(0.05)


def test_an_abandoned_inbox_never_blocks_its_feeder() -> None:
    inbox = spdy.Inbox(limit=4)
    inbox.feed(b"full")
    blocked = threading.Thread(target=inbox.feed, args=(b"waiting",))
    blocked.start()
    blocked.join(0.2)
    assert blocked.is_alive()
    inbox.abandon()
    blocked.join(5)
    assert not blocked.is_alive()
    inbox.feed(b"x" * 100)  # dropped at once
    assert inbox.read(1) == b""


def test_a_header_decompression_bomb_ends_the_session_and_costs_little() -> None:
    """A kilobyte of compressed zeros per stream on the wire: the session ends, nothing large is kept."""
    import tracemalloc

    peer = Peer()
    bomb = zlib.compressobj(zdict=spdy.DICTIONARY)
    value = 900 << 10  # under the frame limit: each stream's headers alone would be ~1 MB kept
    tracemalloc.start()
    for number in range(20):
        header = struct.pack(">I", 1) + struct.pack(">I", 4) + b"name" + struct.pack(">I", value)
        block = bomb.compress(header) + bomb.compress(b"\0" * value) + bomb.flush(zlib.Z_SYNC_FLUSH)
        assert len(block) < 4 << 10
        with contextlib.suppress(OSError):  # the session may have hung up already
            peer.sock.sendall(
                spdy.control_frame(spdy.SYN_STREAM, 0, struct.pack(">IIBB", 2 * number + 1, 0, 0, 0) + block)
            )
    peer.thread.join(5)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peer.session.closed.is_set() and peer.opened == []
    assert peak < 4 << 20, f"decoding the bomb peaked at {peak} bytes"


def test_streams_past_the_limit_are_refused_and_reset_ones_forgotten() -> None:
    peer = Peer()
    for number in range(spdy.MAX_STREAMS + 2):
        peer.syn_stream(2 * number + 1, {"streamtype": ["data"]})
    frames = [spdy.read_frame(peer.sock) for _ in range(spdy.MAX_STREAMS + 2)]
    refused = [f for f in frames if f.kind == spdy.RST_STREAM]
    assert [struct.unpack(">II", f.payload)[1] for f in refused] == [spdy.REFUSED_STREAM] * 2
    assert len(peer.session.streams) == spdy.MAX_STREAMS
    peer.sock.sendall(spdy.control_frame(spdy.RST_STREAM, 0, struct.pack(">II", 1, spdy.CANCEL)))
    wait_for(lambda: len(peer.session.streams) == spdy.MAX_STREAMS - 1, timeout=5)
    peer.sock.close()
    peer.thread.join(5)


def test_an_empty_rst_stream_ends_the_session_without_an_error_in_its_thread() -> None:
    failures: list[BaseException] = []
    previous = threading.excepthook
    threading.excepthook = lambda args: failures.append(args.exc_value)
    try:
        peer = Peer()
        peer.sock.sendall(spdy.control_frame(spdy.RST_STREAM, 0, b""))
        peer.thread.join(5)
    finally:
        threading.excepthook = previous
    assert peer.session.closed.is_set() and failures == []

"""Exec, Attach and PortForward through the streaming server, from the client side of both protocols."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import psutil
import pytest

from shimhub.testing.daemon import Pod, wait_for
from shimhub_proto.cri.v1 import api_pb2 as cri
from tests.conftest import NEEDS_ROOT
from tests.kubeapi import KUBECTL, POD, KubeApi
from tests.streaming_client import SpdyClient, WebSocketClient, exit_code, upgrade_request
from tests.test_runc import exec_sync, runc_config
from tests.test_shimv2 import SHIM
from tests.test_vm import VM_MARKS

pytestmark = NEEDS_ROOT

TOKEN_TTL = 3.0
IDLE_TIMEOUT = 5.0
TRANSPORTS = ["spdy", "websocket"]
#: The conmon-monitored runc handler, and the same runc through containerd's shim v2 (stdio through the shim's FIFOs).
HANDLERS = [
    "runc",
    pytest.param(
        "shim", marks=pytest.mark.skipif(shutil.which(SHIM) is None, reason=f"{SHIM} is not installed (containerd)")
    ),
    pytest.param("kata", marks=VM_MARKS),
]


@pytest.fixture
def node(daemon_factory, registry):
    streaming = f"[streaming]\ntoken_ttl = {TOKEN_TTL}\nidle_timeout = {IDLE_TIMEOUT}\n"
    shim = f'[runtimes.shim]\nplugin = "shimv2"\n[runtimes.shim.options]\nshim = "{SHIM}"\n'
    shim += '[runtimes.kata]\nplugin = "kata"\n'
    daemon = daemon_factory(runc_config(registry, streaming + shim)).start()
    daemon.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image="test/busybox:1")))
    return daemon


class Session:
    """One exec or attach session, the same to a test whichever transport carries it."""

    def __init__(self, transport: str, url: str, *, stdin: bool, stdout: bool, stderr: bool, tty: bool) -> None:
        self.transport = transport
        if transport == "spdy":
            self.spdy = SpdyClient(url, ["v4.channel.k8s.io", "v3.channel.k8s.io"])
            assert self.spdy.status == 101, self.spdy.status
            self.streams = {"error": self.spdy.open({"streamType": "error"})}
            wanted = [("stdin", stdin), ("stdout", stdout), ("stderr", stderr and not tty), ("resize", tty)]
            for kind, wanted_here in wanted:
                if wanted_here:
                    self.streams[kind] = self.spdy.open({"streamType": kind})
        else:
            self.ws = WebSocketClient(url, ["v5.channel.k8s.io", "v4.channel.k8s.io"])
            assert self.ws.protocol == "v5.channel.k8s.io"

    def send(self, data: bytes) -> None:
        self.streams["stdin"].write(data) if self.transport == "spdy" else self.ws.send(0, data)

    def close_stdin(self) -> None:
        self.streams["stdin"].close() if self.transport == "spdy" else self.ws.send(255, b"\0")

    def resize(self, width: int, height: int) -> None:
        document = json.dumps({"Width": width, "Height": height}).encode()
        self.streams["resize"].write(document) if self.transport == "spdy" else self.ws.send(4, document)

    def wait_stdout(self, wanted: bytes) -> bytes:
        if self.transport == "spdy":
            return self.streams["stdout"].read_until(wanted)
        return self.ws.wait_for(1, wanted)

    def finish(self) -> tuple[bytes, bytes, bytes]:
        """Everything that arrived on stdout, stderr and the error stream, once the server ended the session."""
        if self.transport == "spdy":
            parts = [self.streams[kind].read_all() if kind in self.streams else b"" for kind in ("stdout", "stderr")]
            return parts[0], parts[1], self.streams["error"].read_all()
        received = self.ws.wait_closed()
        return received.get(1, b""), received.get(2, b""), received.get(3, b"")


def exec_url(pod: Pod, container_id: str, cmd: list[str], **streams: bool) -> str:
    request = cri.ExecRequest(container_id=container_id, cmd=cmd, **streams)
    return pod.rt.Exec(request).url


def run_exec(transport: str, pod: Pod, container_id: str, cmd: list[str]) -> tuple[bytes, bytes, int]:
    url = exec_url(pod, container_id, cmd, stdout=True, stderr=True)
    stdout, stderr, status = Session(transport, url, stdin=False, stdout=True, stderr=True, tty=False).finish()
    return stdout, stderr, exit_code(status)


@pytest.mark.parametrize("handler", HANDLERS)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_exec_output_and_exit_codes(node, tmp_path: Path, transport: str, handler: str) -> None:
    pod = Pod(node, tmp_path, handler=handler)
    container = pod.run("sleeper", ["sleep", "300"])
    assert run_exec(transport, pod, container, ["echo", "hello", "streams"]) == (b"hello streams\n", b"", 0)
    assert run_exec(transport, pod, container, ["sh", "-c", "echo out; echo err >&2; exit 3"]) == (
        b"out\n",
        b"err\n",
        3,
    )
    url = exec_url(pod, container, ["no-such-command"], stdout=True, stderr=True)
    stdout, stderr, status = Session(transport, url, stdin=False, stdout=True, stderr=True, tty=False).finish()
    # runc runs and fails it (a non-zero exit code); a shim refuses to start it (an error): both are failures
    assert b'"Failure"' in status and b"no-such-command" in stdout + stderr + status


@pytest.mark.parametrize("handler", HANDLERS)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_exec_interactive_stdin_round_trip(node, tmp_path: Path, transport: str, handler: str) -> None:
    pod = Pod(node, tmp_path, handler=handler)
    container = pod.run("sleeper", ["sleep", "300"])
    url = exec_url(pod, container, ["sh", "-c", "while read line; do echo got:$line; done; echo bye"],
                   stdin=True, stdout=True, stderr=True)  # fmt: skip
    session = Session(transport, url, stdin=True, stdout=True, stderr=True, tty=False)
    session.send(b"one\n")
    assert session.wait_stdout(b"got:one\n").endswith(b"got:one\n")  # answered while stdin is still open
    session.send(b"two\n")
    assert session.wait_stdout(b"got:two\n").endswith(b"got:two\n")
    session.close_stdin()
    stdout, _, status = session.finish()
    assert stdout.endswith(b"bye\n") and exit_code(status) == 0


@pytest.mark.parametrize("handler", HANDLERS)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_exec_tty_resize_seen_by_stty(node, tmp_path: Path, transport: str, handler: str) -> None:
    pod = Pod(node, tmp_path, handler=handler)
    container = pod.run("sleeper", ["sleep", "300"])
    url = exec_url(pod, container, ["sh"], stdin=True, stdout=True, tty=True)
    session = Session(transport, url, stdin=True, stdout=True, stderr=False, tty=True)
    session.resize(100, 40)
    time.sleep(0.2)  # the resize travels on its own stream
    session.send(b"stty size; tty\n")
    first = session.wait_stdout(b"/dev/pts/")  # `tty` answers after `stty size`: this read holds both
    assert b"40 100" in first and b"/dev/pts/" in first
    session.resize(123, 45)
    time.sleep(0.2)
    session.send(b"stty size\n")
    assert b"45 123" in session.wait_stdout(b"45 123")
    session.send(b"exit 4\n")
    _, _, status = session.finish()
    assert exit_code(status) == 4


@pytest.mark.parametrize("handler", HANDLERS)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_attach_follows_a_container_printing_every_second(node, tmp_path: Path, transport: str, handler: str) -> None:
    pod = Pod(node, tmp_path, handler=handler)
    container = pod.run("ticker", ["sh", "-c", "i=0; while [ $i -lt 4 ]; do i=$((i+1)); echo tick-$i; sleep 1; done"])
    url = pod.rt.Attach(cri.AttachRequest(container_id=container, stdout=True, stderr=True)).url
    session = Session(transport, url, stdin=False, stdout=True, stderr=True, tty=False)
    stdout, _, status = session.finish()  # the session ends when the container does
    ticks = stdout.decode().split()
    assert ticks and ticks == [f"tick-{n}" for n in range(int(ticks[0][5:]), 5)], stdout
    assert len(ticks) >= 2 and exit_code(status) == 0
    assert pod.wait_exit(container).exit_code == 0


@pytest.mark.parametrize("handler", HANDLERS)
def test_attach_with_stdin_reaches_the_container(node, tmp_path: Path, handler: str) -> None:
    pod = Pod(node, tmp_path, handler=handler)
    container = pod.run("reader", ["sh", "-c", "read line; echo container-got:$line"], stdin=True, stdin_once=True)
    url = pod.rt.Attach(cri.AttachRequest(container_id=container, stdin=True, stdout=True, stderr=True)).url
    session = Session("websocket", url, stdin=True, stdout=True, stderr=True, tty=False)
    session.send(b"hi-there\n")
    stdout, _, _ = session.finish()
    assert b"container-got:hi-there" in stdout
    assert pod.wait_exit(container).exit_code == 0
    assert "container-got:hi-there" in pod.lines("reader")


@pytest.mark.parametrize("handler", HANDLERS)
def test_attach_to_a_terminal_container_with_resize(node, tmp_path: Path, handler: str) -> None:
    pod = Pod(node, tmp_path, handler=handler)
    container = pod.run("shell", ["sh"], tty=True, stdin=True)
    url = pod.rt.Attach(cri.AttachRequest(container_id=container, stdin=True, stdout=True, tty=True)).url
    session = Session("spdy", url, stdin=True, stdout=True, stderr=False, tty=True)
    session.resize(90, 30)
    time.sleep(0.3)  # conmon applies it through its control FIFO
    session.send(b"stty size\n")
    assert b"30 90" in session.wait_stdout(b"30 90")
    session.send(b"exit 0\n")
    session.finish()
    assert pod.wait_exit(container).exit_code == 0


HTTPD = [
    "sh",
    "-c",
    "mkdir -p /tmp/www && echo served-from-the-pod > /tmp/www/index.html && httpd -f -p 8080 -h /tmp/www",
]


def _spdy_forward(client: SpdyClient, request_id: int, port: int, payload: bytes) -> tuple[bytes, bytes]:
    """One forwarded connection: a data and an error stream, as kubectl opens for each local connection."""
    error = client.open({"streamType": "error", "port": str(port), "requestID": str(request_id)})
    data = client.open({"streamType": "data", "port": str(port), "requestID": str(request_id)})
    data.write(payload)
    data.close()
    return data.read_all(), error.read_all()


@pytest.mark.parametrize("handler", HANDLERS)
def test_port_forward_over_spdy(node, tmp_path: Path, handler: str) -> None:
    pod = Pod(node, tmp_path, handler=handler)
    web = pod.run("web", HTTPD)
    wait_for(lambda: b":8080" in exec_sync(pod, web, "netstat", "-ltn").stdout, timeout=10)
    url = pod.rt.PortForward(cri.PortForwardRequest(pod_sandbox_id=pod.id, port=[8080])).url
    client = SpdyClient(url, ["portforward.k8s.io"])
    assert (client.status, client.protocol) == (101, "portforward.k8s.io")
    request = b"GET /index.html HTTP/1.0\r\n\r\n"
    for request_id in range(3):  # several connections over one session
        received, problem = _spdy_forward(client, request_id, 8080, request)
        assert received.startswith(b"HTTP/1.") and received.endswith(b"served-from-the-pod\n"), received
        assert problem == b""
    # A port nobody listens on: the error stream says so; one outside the request is refused.
    received, problem = _spdy_forward(client, 8, 9, b"")
    assert received == b"" and b"not part of the PortForward request" in problem
    client.close()
    url = pod.rt.PortForward(cri.PortForwardRequest(pod_sandbox_id=pod.id)).url
    client = SpdyClient(url, ["portforward.k8s.io"])
    received, problem = _spdy_forward(client, 0, 9, b"")
    assert received == b"" and b"cannot connect to port 9" in problem
    client.close()


def test_port_forward_over_websocket(node, tmp_path: Path) -> None:
    pod = Pod(node, tmp_path)
    echo = pod.run("echo", ["sh", "-c", "nc -l -p 7000 -e sh -c 'read line; echo echoed:$line'"])
    wait_for(lambda: b":7000" in exec_sync(pod, echo, "netstat", "-ltn").stdout, timeout=10)
    url = pod.rt.PortForward(cri.PortForwardRequest(pod_sandbox_id=pod.id, port=[7000])).url
    client = WebSocketClient(url + "?port=7000", ["v4.channel.k8s.io"])
    assert client.protocol == "v4.channel.k8s.io"
    port_bytes = (7000).to_bytes(2, "little")
    assert client.wait_for(0, port_bytes)[:2] == port_bytes and client.wait_for(1, port_bytes)[:2] == port_bytes
    client.send(0, b"ping\n")
    assert client.wait_for(0, b"echoed:ping\n") == port_bytes + b"echoed:ping\n"
    received = client.wait_closed()
    assert received[1] == port_bytes  # no error


def test_bad_used_and_expired_tokens_get_404(node, tmp_path: Path) -> None:
    pod = Pod(node, tmp_path)
    container = pod.run("sleeper", ["sleep", "300"])
    url = exec_url(pod, container, ["true"], stdout=True)
    base = url.rsplit("/", 1)[0]
    spdy_headers = {
        "Connection": ["Upgrade"],
        "Upgrade": ["SPDY/3.1"],
        "X-Stream-Protocol-Version": ["v4.channel.k8s.io"],
    }
    for bad in (base + "/not-a-token", base.rsplit("/", 1)[0] + "/nowhere/x"):
        sock, code, _, body = upgrade_request(bad, spdy_headers)
        sock.close()
        assert code == 404 and b"unknown or expired" in body
    with pytest.raises(Exception, match="404"):
        WebSocketClient(base + "/not-a-token", ["v5.channel.k8s.io"])
    Session("spdy", url, stdin=False, stdout=True, stderr=False, tty=False).finish()
    sock, code, _, _ = upgrade_request(url, spdy_headers)  # used once already
    sock.close()
    assert code == 404
    # A plain GET does not use the URL up, nor does the token under another kind of path.
    fresh = exec_url(pod, container, ["echo", "still-usable"], stdout=True)
    sock, code, _, _ = upgrade_request(fresh, {})
    sock.close()
    assert code == 400
    sock, code, _, _ = upgrade_request(fresh.replace("/exec/", "/portforward/"), spdy_headers)
    sock.close()
    assert code == 404
    stdout, _, _ = Session("spdy", fresh, stdin=False, stdout=True, stderr=False, tty=False).finish()
    assert stdout == b"still-usable\n"
    stale = exec_url(pod, container, ["true"], stdout=True)
    time.sleep(TOKEN_TTL + 0.5)
    sock, code, _, _ = upgrade_request(stale, spdy_headers)
    sock.close()
    assert code == 404


def test_exec_requests_that_cannot_work_are_refused(node, tmp_path: Path) -> None:
    pod = Pod(node, tmp_path)
    container = pod.run("sleeper", ["sleep", "300"])
    done = pod.run("done", ["true"])
    pod.wait_exit(done)
    tty_and_stderr = cri.ExecRequest(container_id=container, cmd=["sh"], tty=True, stdout=True, stderr=True)
    cases = [
        (cri.ExecRequest(container_id=container, cmd=["true"]), grpc.StatusCode.INVALID_ARGUMENT),
        (tty_and_stderr, grpc.StatusCode.INVALID_ARGUMENT),
        (cri.ExecRequest(container_id=container, stdout=True), grpc.StatusCode.INVALID_ARGUMENT),
        (cri.ExecRequest(container_id=done, cmd=["true"], stdout=True), grpc.StatusCode.FAILED_PRECONDITION),
        (cri.ExecRequest(container_id="f" * 64, cmd=["true"], stdout=True), grpc.StatusCode.NOT_FOUND),
    ]  # fmt: skip
    for request, code in cases:
        with pytest.raises(grpc.RpcError) as caught:
            pod.rt.Exec(request)
        assert caught.value.code() == code, request
    with pytest.raises(grpc.RpcError) as caught:
        pod.rt.Attach(cri.AttachRequest(container_id=container, stdin=True, stdout=True))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "without stdin" in caught.value.details()
    url = exec_url(pod, container, ["true"], stdout=True)
    sock, code, _, body = upgrade_request(
        url, {"Connection": ["Upgrade"], "Upgrade": ["SPDY/3.1"], "X-Stream-Protocol-Version": ["v9.channel.k8s.io"]}
    )
    sock.close()
    assert code == 403 and b"no common protocol" in body


def _processes_named(marker: str) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_an_idle_session_is_closed_and_its_exec_ended(node, tmp_path: Path, transport: str) -> None:
    pod = Pod(node, tmp_path)
    container = pod.run("sleeper", ["sleep", "300"])
    url = exec_url(pod, container, ["sleep", "4712"], stdout=True, stderr=True)  # silent, no input
    started = time.monotonic()
    session = Session(transport, url, stdin=False, stdout=True, stderr=True, tty=False)
    wait_for(lambda: _processes_named("sleep 4712"), timeout=10)
    session.finish()  # returns once the server has ended the session
    assert IDLE_TIMEOUT <= time.monotonic() - started < IDLE_TIMEOUT + 10
    wait_for(lambda: not _processes_named("sleep 4712"), timeout=10)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_client_that_leaves_ends_its_exec(node, tmp_path: Path, transport: str) -> None:
    pod = Pod(node, tmp_path)
    container = pod.run("sleeper", ["sleep", "300"])
    url = exec_url(pod, container, ["sleep", "4711"], stdout=True, stderr=True)
    session = Session(transport, url, stdin=False, stdout=True, stderr=True, tty=False)
    wait_for(lambda: _processes_named("sleep 4711"), timeout=10)
    session.spdy.close() if transport == "spdy" else session.ws.connection.close()
    wait_for(lambda: not _processes_named("sleep 4711"), timeout=10)


def test_older_protocol_versions(node, tmp_path: Path) -> None:
    pod = Pod(node, tmp_path)
    container = pod.run("sleeper", ["sleep", "300"])
    for version in ("v2.channel.k8s.io", "channel.k8s.io"):
        url = exec_url(pod, container, ["sh", "-c", "echo old; exit 2"], stdout=True, stderr=True)
        client = SpdyClient(url, [version])
        assert client.protocol == version
        streams = {kind: client.open({"streamType": kind}) for kind in ("error", "stdout", "stderr")}
        assert streams["stdout"].read_all() == b"old\n"
        assert b"exit code" in streams["error"].read_all()  # the error text, not a status document
    url = exec_url(pod, container, ["echo", "b64"], stdout=True)
    client = WebSocketClient(url, ["v4.base64.channel.k8s.io"])
    assert client.protocol == "v4.base64.channel.k8s.io"
    received = client.wait_closed()
    assert base64.b64decode(received[ord("1")]) == b"b64\n"


# -- kubectl, whose client-go code speaks both protocols ------------------------------------


def kubectl(api: KubeApi, home: Path, *args: str, websockets: bool, stdin: str | None = None):
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "KUBECTL_REMOTE_COMMAND_WEBSOCKETS": str(websockets).lower(),
        "KUBECTL_PORT_FORWARD_WEBSOCKETS": "false",
    }
    return subprocess.run(
        [KUBECTL, "-s", api.url, *args], input=stdin, capture_output=True, text=True, timeout=60, env=env, check=False
    )


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")
@pytest.mark.parametrize("websockets", [True, False], ids=["websocket", "spdy"])
def test_kubectl_exec(node, tmp_path: Path, websockets: bool) -> None:
    pod = Pod(node, tmp_path)
    container = pod.run("sleeper", ["sleep", "300"])
    api = KubeApi(node.runtime, pod.id, container)
    try:
        done = kubectl(api, tmp_path, "exec", POD, "--", "sh", "-c", "echo from-kubectl; exit 3", websockets=websockets)
        assert (done.stdout, done.returncode) == ("from-kubectl\n", 3), done.stderr
        done = kubectl(api, tmp_path, "exec", "-i", POD, "--", "sh", "-c", "cat; echo eof-seen",
                       websockets=websockets, stdin="piped through\n")  # fmt: skip
        assert (done.stdout, done.returncode) == ("piped through\neof-seen\n", 0), done.stderr
    finally:
        api.stop()


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")
def test_kubectl_port_forward(node, tmp_path: Path) -> None:
    pod = Pod(node, tmp_path)
    web = pod.run("web", HTTPD)
    wait_for(lambda: b":8080" in exec_sync(pod, web, "netstat", "-ltn").stdout, timeout=10)
    api = KubeApi(node.runtime, pod.id, web)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "KUBECTL_PORT_FORWARD_WEBSOCKETS": "false"}
    forwarder = subprocess.Popen(
        [KUBECTL, "-s", api.url, "port-forward", f"pod/{POD}", "--address", "127.0.0.1", ":8080"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = forwarder.stdout.readline()  # "Forwarding from 127.0.0.1:PORT -> 8080"
        local = int(line.split("127.0.0.1:")[1].split()[0])
        for _ in range(2):  # each connection is a new stream pair on the same session
            with urllib.request.urlopen(f"http://127.0.0.1:{local}/index.html", timeout=10) as answer:
                assert answer.read() == b"served-from-the-pod\n"
    finally:
        forwarder.terminate()
        forwarder.wait(10)
        api.stop()


def test_a_client_flooding_stdin_is_held_back_not_buffered(node, tmp_path: Path) -> None:
    pod = Pod(node, tmp_path)
    container = pod.run("sleeper", ["sleep", "300"])
    url = exec_url(pod, container, ["sleep", "3"], stdin=True, stdout=True, stderr=True)  # never reads its stdin
    daemon = psutil.Process(node.proc.pid)
    before = daemon.memory_info().rss
    session = Session("spdy", url, stdin=True, stdout=True, stderr=True, tty=False)
    sent = [0]

    def flood() -> None:
        chunk = b"x" * 65536
        with contextlib.suppress(OSError):
            for _ in range(1024):  # 64 MiB, far more than anything on the way may hold
                session.send(chunk)
                sent[0] += len(chunk)

    threading.Thread(target=flood, daemon=True).start()
    time.sleep(1.5)
    assert sent[0] < 16 * 2**20  # held back by the server within a few MiB
    assert daemon.memory_info().rss - before < 16 * 2**20
    _, _, status = session.finish()
    assert exit_code(status) == 0


def test_dribbling_clients_cost_no_polling_and_are_bounded(node, tmp_path: Path) -> None:
    """A slowloris: 200 connections sending their request head a byte at a time. They must not spin a core, and
    exec sessions go on being served."""
    pod = Pod(node, tmp_path)
    container = pod.run("sleeper", ["sleep", "300"])
    host, port = urllib.parse.urlsplit(exec_url(pod, container, ["true"], stdout=True)).netloc.rsplit(":", 1)
    daemon = psutil.Process(node.proc.pid)
    dribblers = [socket.create_connection((host, int(port)), timeout=5) for _ in range(200)]
    try:
        cpu_before = sum(daemon.cpu_times()[:2])
        for second in range(4):
            for sock in dribblers:
                with contextlib.suppress(OSError):
                    sock.send(b"GET /exec/"[second : second + 1])
            time.sleep(1)
        used = sum(daemon.cpu_times()[:2]) - cpu_before
        assert used < 1.0, f"200 dribbling connections cost the daemon {used:.2f} CPU seconds in 4 s"
        stdout, _, code = run_exec("spdy", pod, container, ["echo", "served"])
        assert (stdout, code) == (b"served\n", 0)
    finally:
        for sock in dribblers:
            sock.close()


def test_holders_of_valid_urls_get_in_past_300_dribbling_connections(node, tmp_path: Path) -> None:
    """More slow clients than the server takes at once: each new connection closes the oldest still sending
    its head, so real execs (whose head comes at once) are served every time."""
    pod = Pod(node, tmp_path)
    container = pod.run("sleeper", ["sleep", "300"])
    host, port = urllib.parse.urlsplit(exec_url(pod, container, ["true"], stdout=True)).netloc.rsplit(":", 1)
    dribblers = []
    try:
        for _ in range(300):
            sock = socket.create_connection((host, int(port)), timeout=5)
            with contextlib.suppress(OSError):
                sock.send(b"G")
            dribblers.append(sock)
        for number in range(3):
            stdout, _, code = run_exec("spdy", pod, container, ["echo", f"served-{number}"])
            assert (stdout, code) == (f"served-{number}\n".encode(), 0)
        # the oldest were answered and closed by the server to make room, before their head timeout
        answered, _, _ = select.select(dribblers[:200], [], [], 2.0)
        assert len(answered) == 200, len(answered)
    finally:
        for sock in dribblers:
            sock.close()


def test_no_output_is_lost_across_many_parallel_exec_sessions(node, tmp_path: Path) -> None:
    """Each of many exec sessions at once gets all of its command's output, and its exit code."""
    from concurrent.futures import ThreadPoolExecutor

    pod = Pod(node, tmp_path)
    container = pod.run("sleeper", ["sleep", "300"])
    sessions = 120

    def one(number: int) -> tuple[int, bytes, int]:
        transport = "spdy" if number % 2 else "websocket"
        stdout, _, code = run_exec(transport, pod, container, ["sh", "-c", f"echo out-{number}; exit {number % 3}"])
        return number, stdout, code

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(one, range(sessions)))
    wrong = [(n, out, code) for n, out, code in results if (out, code) != (f"out-{n}\n".encode(), n % 3)]
    assert wrong == [], f"{len(wrong)} of {sessions} sessions lost output or their exit code: {wrong[:5]}"

"""Just enough of a Kubernetes API server for kubectl exec / attach / port-forward against one pod.

kubectl asks for discovery documents and the pod, then opens an upgrade
request on the pod's exec, attach or portforward subresource. Like the
kubelet, this server turns that into a CRI call to shimhub and proxies the
upgraded connection, bytes untouched, to the URL shimhub answered: so the
streaming protocols are spoken by kubectl's own client code (client-go).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import socketserver
import threading
from urllib.parse import parse_qs, urlsplit

from shimhub_proto.cri.v1 import api_pb2 as cri

KUBECTL = shutil.which("kubectl")
POD, CONTAINER = "p", "c"

SUBRESOURCES = {"exec": "PodExecOptions", "attach": "PodAttachOptions", "portforward": "PodPortForwardOptions"}
DISCOVERY = {
    "/version": {"major": "1", "minor": "32", "gitVersion": "v1.32.0"},
    "/api": {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []},
    "/apis": {"kind": "APIGroupList", "apiVersion": "v1", "groups": []},
    "/api/v1": {
        "kind": "APIResourceList",
        "groupVersion": "v1",
        "resources": [
            {"name": "pods", "singularName": "pod", "namespaced": True, "kind": "Pod", "verbs": ["get"]},
            *(
                {
                    "name": f"pods/{sub}",
                    "singularName": "",
                    "namespaced": True,
                    "kind": kind,
                    "verbs": ["create", "get"],
                }
                for sub, kind in (
                    ("exec", "PodExecOptions"),
                    ("attach", "PodAttachOptions"),
                    ("portforward", "PodPortForwardOptions"),
                )
            ),
        ],
    },
    f"/api/v1/namespaces/default/pods/{POD}": {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {"name": POD, "namespace": "default"},
        "spec": {"containers": [{"name": CONTAINER, "image": "test/busybox:1"}]},
        "status": {"phase": "Running"},
    },
}


def _flag(query: dict[str, list[str]], name: str) -> bool:
    return query.get(name, ["false"])[0] in ("true", "1")


class KubeApi(socketserver.ThreadingTCPServer):
    """Serves discovery and the pod; upgrades go to shimhub's streaming server through `runtime`."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, runtime: object, sandbox_id: str, container_id: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.runtime, self.sandbox_id, self.container_id = runtime, sandbox_id, container_id
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def streaming_url(self, subresource: str, query: dict[str, list[str]]) -> str:
        """Ask shimhub for the session, as the kubelet would."""
        streams = {name: _flag(query, name) for name in ("stdin", "stdout", "stderr", "tty")}
        if subresource == "exec":
            request = cri.ExecRequest(container_id=self.container_id, cmd=query.get("command", []), **streams)
            return self.runtime.Exec(request).url
        if subresource == "attach":
            return self.runtime.Attach(cri.AttachRequest(container_id=self.container_id, **streams)).url
        ports = [int(port) for port in query.get("ports", [])]
        return self.runtime.PortForward(cri.PortForwardRequest(pod_sandbox_id=self.sandbox_id, port=ports)).url

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def _pipe(source: socket.socket, target: socket.socket) -> None:
    try:
        while chunk := source.recv(65536):
            target.sendall(chunk)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)


class _Handler(socketserver.BaseRequestHandler):
    server: KubeApi

    def handle(self) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.request.recv(4096)
            if not chunk:
                return
            head += chunk
        head, _, rest = head.partition(b"\r\n\r\n")
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, target, _ = request_line.split(" ")
        parts = urlsplit(target)
        if parts.path in DISCOVERY:
            self._json(DISCOVERY[parts.path])
            return
        subresource = parts.path.rsplit("/", 1)[-1]
        if not parts.path.startswith(f"/api/v1/namespaces/default/pods/{POD}/") or subresource not in SUBRESOURCES:
            self._json({"kind": "Status", "status": "Failure", "code": 404}, status="404 Not Found")
            return
        stream_url = urlsplit(self.server.streaming_url(subresource, parse_qs(parts.query)))
        upstream = socket.create_connection((stream_url.hostname, stream_url.port))
        forwarded = [f"{method} {stream_url.path}{'?' + parts.query if parts.query else ''} HTTP/1.1"]
        forwarded += [line for line in header_lines if not line.lower().startswith("host:")]
        forwarded.append(f"Host: {stream_url.netloc}")
        upstream.sendall(("\r\n".join(forwarded) + "\r\n\r\n").encode("latin-1") + rest)
        back = threading.Thread(target=_pipe, args=(upstream, self.request), daemon=True)
        back.start()
        _pipe(self.request, upstream)
        back.join()
        upstream.close()

    def _json(self, document: object, status: str = "200 OK") -> None:
        body = json.dumps(document).encode()
        head = (
            f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        self.request.sendall(head.encode() + body)

"""A registry on 127.0.0.1 that answers as an attacker would: endless or huge manifests, dripped bytes,
oversized configs and pathological auth challenges. Every answer is bounded in bytes and time."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import time
from collections.abc import Callable

#: Most bytes any endless answer sends before it stops by itself.
ENDLESS_LIMIT = 1 << 30
#: Longest any answer lasts.
ANSWER_LIMIT = 60.0

Route = Callable[[http.server.BaseHTTPRequestHandler], None]


def _chunk(handler: http.server.BaseHTTPRequestHandler, data: bytes) -> None:
    handler.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")


def endless_manifest(handler: http.server.BaseHTTPRequestHandler) -> None:
    """A chunked manifest that never ends (until ENDLESS_LIMIT or the client leaves)."""
    handler.send_response(200)
    handler.send_header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
    handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()
    sent, started = 0, time.monotonic()
    block = b" " * (1 << 20)
    try:
        _chunk(handler, b"{")
        while sent < ENDLESS_LIMIT and time.monotonic() - started < ANSWER_LIMIT:
            _chunk(handler, block)
            sent += len(block)
    except OSError:
        return


def declared_huge(handler: http.server.BaseHTTPRequestHandler) -> None:
    """A manifest that says it is 1 GiB, then sends a few bytes and stops."""
    handler.send_response(200)
    handler.send_header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
    handler.send_header("Content-Length", str(1 << 30))
    handler.end_headers()
    try:
        handler.wfile.write(b"{}")
    except OSError:
        return


def drip(handler: http.server.BaseHTTPRequestHandler) -> None:
    """A manifest dripped a byte every half second: each read is quick, the whole never comes."""
    handler.send_response(200)
    handler.send_header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
    handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()
    started = time.monotonic()
    try:
        while time.monotonic() - started < ANSWER_LIMIT:
            _chunk(handler, b" ")
            handler.wfile.flush()
            time.sleep(0.5)
    except OSError:
        return


def _send_manifest(handler: http.server.BaseHTTPRequestHandler, config_size: int, layers: list[dict]) -> None:
    """A well-formed OCI manifest naming a config of `config_size` bytes and `layers`."""
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": "sha256:" + hashlib.sha256(b"x").hexdigest(),
                "size": config_size,
            },
            "layers": layers,
        }
    ).encode()
    handler.send_response(200)
    handler.send_header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def oversized_config(handler: http.server.BaseHTTPRequestHandler) -> None:
    """A well-formed manifest whose config claims 200 MiB."""
    _send_manifest(handler, 200 << 20, [])


def many_layers(handler: http.server.BaseHTTPRequestHandler) -> None:
    """A well-formed manifest of 600 layers (any blob it names answers 404)."""
    layer = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "size": 32}
    _send_manifest(
        handler, 64, [{**layer, "digest": "sha256:" + hashlib.sha256(str(n).encode()).hexdigest()} for n in range(600)]
    )


def redos_challenge(handler: http.server.BaseHTTPRequestHandler) -> None:
    """401 with a 60 KB challenge of the shape that makes a backtracking parser quadratic."""
    handler.send_response(401)
    handler.send_header("WWW-Authenticate", "Bearer " + "a" * 60_000)
    handler.send_header("Content-Length", "0")
    handler.end_headers()


def not_found(handler: http.server.BaseHTTPRequestHandler) -> None:
    body = json.dumps({"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]}).encode()
    handler.send_response(404)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


class HostileRegistry:
    """Serves `routes` (repository name -> behaviour) for /v2/<repository>/manifests/*; /v2/ answers 200."""

    def __init__(self, routes: dict[str, Route]) -> None:
        self.requests: list[str] = []
        registry = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                registry.requests.append(self.path)
                for repository, route in routes.items():
                    if self.path.startswith(f"/v2/{repository}/"):
                        route(self)
                        return
                not_found(self)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

"""Prometheus metrics of shimhub itself, and the HTTP endpoint that serves them.

The endpoint (``metrics_address`` in the config, off by default) serves:

* ``/metrics``: Prometheus text format: per-RPC latency and calls by gRPC code,
  image pulls, pods and containers by state and handler, plugin call latency;
* ``/status``: the readiness of every handler and backend, as JSON;
* ``/inspect/<id or prefix>``: one pod's or container's full record, as JSON.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections import Counter as Tally
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from shimhub.config import converter, split_address
from shimhub.errors import ConfigError, NotFound

if TYPE_CHECKING:
    from shimhub.daemon import Daemon

log = logging.getLogger(__name__)

#: The registry of shimhub's own metrics (the process serves one daemon).
REGISTRY = CollectorRegistry()
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

RPC_SECONDS = Histogram(
    "shimhub_grpc_request_duration_seconds",
    "Time to answer a CRI call, by method.",
    ["method"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
RPC_CALLS = Counter(
    "shimhub_grpc_requests",
    "CRI calls answered, by method and gRPC status code.",
    ["method", "code"],
    registry=REGISTRY,
)
PULL_SECONDS = Histogram(
    "shimhub_image_pull_duration_seconds",
    "Time of successful image pulls.",
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
    registry=REGISTRY,
)
PULL_BYTES = Counter(
    "shimhub_image_pull_bytes", "Bytes of the images pulled (config and layer blobs).", registry=REGISTRY
)
PLUGIN_SECONDS = Histogram(
    "shimhub_plugin_call_duration_seconds",
    "Time of plugin hook calls, by plugin kind, plugin and hook.",
    ["kind", "plugin", "hook"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)


class ObjectCounts(Collector):
    """Pods and containers by state and runtime handler, counted at scrape time."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[GaugeMetricFamily]:
        sandboxes = self.daemon.store.sandboxes()
        handler_of = {s.id: s.handler for s in sandboxes}
        pods = GaugeMetricFamily(
            "shimhub_pods", "Pod sandboxes by state and runtime handler.", labels=["state", "handler"]
        )
        for (state, handler), count in sorted(Tally((s.state, s.handler) for s in sandboxes).items()):
            pods.add_metric([state, handler], count)
        yield pods
        containers = GaugeMetricFamily(
            "shimhub_containers", "Containers by state and runtime handler.", labels=["state", "handler"]
        )
        tally = Tally((c.state.status.value, handler_of.get(c.sandbox_id, "")) for c in self.daemon.store.containers())
        for (state, handler), count in sorted(tally.items()):
            containers.add_metric([state, handler], count)
        yield containers


def inspect(daemon: Daemon, object_id: str) -> dict[str, Any]:
    """The full record of the pod or container `object_id` (an id or a unique prefix)."""
    sandbox = daemon.store.sandbox(object_id, missing_ok=True)
    if sandbox is not None:
        return {"kind": "pod sandbox", "record": converter.unstructure(sandbox)}
    container = daemon.store.container(object_id, missing_ok=True)
    if container is not None:
        return {"kind": "container", "record": converter.unstructure(container)}
    raise NotFound(f"no pod sandbox or container {object_id!r}")


class _Handler(BaseHTTPRequestHandler):
    daemon: Daemon

    def do_GET(self) -> None:
        if self.path == "/metrics":
            self._send(200, CONTENT_TYPE_LATEST, generate_latest(REGISTRY))
        elif self.path == "/status":
            self._json(200, self.daemon.status_info())
        elif self.path.startswith("/inspect/"):
            try:
                self._json(200, inspect(self.daemon, self.path.removeprefix("/inspect/")))
            except NotFound as exc:
                self._json(404, {"error": exc.message})
        else:
            self._json(404, {"error": f"no such endpoint {self.path!r}; try /metrics, /status, /inspect/<id>"})

    def _json(self, code: int, document: object) -> None:
        self._send(code, "application/json", json.dumps(document, indent=2, sort_keys=True).encode())

    def _send(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics endpoint: " + format, *args)


class MetricsEndpoint:
    """The HTTP endpoint, serving on its own thread."""

    def __init__(self, daemon: Daemon, address: str) -> None:
        host, port = split_address(address) or ("", 0)
        REGISTRY.register(ObjectCounts(daemon))
        handler = type("Handler", (_Handler,), {"daemon": daemon})
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_class = type("Server", (ThreadingHTTPServer,), {"address_family": family})
        try:
            self.server = server_class((host, port), handler)
        except OSError as exc:
            raise ConfigError(f"metrics_address {address}: cannot listen there: {exc.strerror}") from None
        self.thread = threading.Thread(target=self.server.serve_forever, name="metrics-endpoint", daemon=True)

    @property
    def address(self) -> str:
        """host:port actually bound (the port is chosen when the config says 0)."""
        host, port = self.server.server_address[:2]
        return f"{host}:{port}"

    def start(self) -> None:
        """Serve until stopped."""
        self.thread.start()
        log.info("serving metrics on http://%s/metrics", self.address)

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.server.shutdown()
        self.server.server_close()

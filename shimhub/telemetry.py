"""Prometheus metrics of shimhub itself, and the HTTP endpoint that serves them.

The endpoint (``metrics_address`` in the config, off by default) serves:

* ``/metrics``: Prometheus text format: per-RPC latency and calls by gRPC code,
  image pulls, pods and containers by state and handler, plugin call latency;
* ``/status``: the readiness of every handler and backend, as JSON.

Any local user can reach a loopback port, so nothing there is secret: records
(environment, mounts, annotations) are only ever shown through the CRI socket
(`shimhub inspect`). At most MAX_CONNECTIONS are served at once, each with
CONNECTION_TIMEOUT seconds per read and write.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections import Counter as Tally
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from shimhub.config import split_address
from shimhub.errors import ConfigError

if TYPE_CHECKING:
    from shimhub.state import StateStore

#: Connections the endpoint serves at once, and the seconds each may wait for a read or a write.
MAX_CONNECTIONS = 32
CONNECTION_TIMEOUT = 10.0

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
NRI_SECONDS = Histogram(
    "shimhub_nri_create_container_duration_seconds",
    "Time NRI plugins took to answer for a container being created (all plugins of one creation).",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
    registry=REGISTRY,
)
POLICY_DECISIONS = Counter(
    "shimhub_image_policy_decisions",
    "Pulls the image trust policy allowed or refused, by result.",
    ["result"],
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

    def __init__(self, store: StateStore) -> None:
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        sandboxes = self.store.sandboxes()
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
        tally = Tally((c.state.status.value, handler_of.get(c.sandbox_id, "")) for c in self.store.containers())
        for (state, handler), count in sorted(tally.items()):
            containers.add_metric([state, handler], count)
        yield containers


class _Handler(BaseHTTPRequestHandler):
    #: What /status answers: the readiness of every handler and backend.
    status: Callable[[], dict[str, Any]]
    timeout = CONNECTION_TIMEOUT  # seconds for each read and write of a connection

    def do_GET(self) -> None:
        if self.path == "/metrics":
            self._send(200, CONTENT_TYPE_LATEST, generate_latest(REGISTRY))
        elif self.path == "/status":
            self._json(200, type(self).status())
        else:
            self._json(404, {"error": f"no such endpoint {self.path[:256]!r}; try /metrics or /status"})

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


class _BoundedServer(ThreadingHTTPServer):
    """A thread a connection, at most MAX_CONNECTIONS at once; one more is closed unanswered."""

    daemon_threads = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._free = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._free.acquire(blocking=False):
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._free.release()


class MetricsEndpoint:
    """The HTTP endpoint, serving on its own thread."""

    def __init__(self, store: StateStore, status: Callable[[], dict[str, Any]], address: str) -> None:
        host, port = split_address(address) or ("", 0)
        REGISTRY.register(ObjectCounts(store))
        handler = type("Handler", (_Handler,), {"status": staticmethod(status)})
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_class = type("Server", (_BoundedServer,), {"address_family": family})
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

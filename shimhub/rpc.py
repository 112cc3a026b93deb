"""Serving a protobuf service from a plain Python object.

`service_handler` builds a gRPC handler for every method of a service
descriptor. A method the servicer defines is called as
``servicer.Method(request, context)``; one it does not define answers
UNIMPLEMENTED naming the method. Every call is logged with its duration at
debug level; a ShimhubError becomes its gRPC status, logged with the method and
the object it names (warning; error for INTERNAL; debug for NOT_FOUND); any
other exception is logged with its traceback and answers INTERNAL with a
one-line message. Repeats of one failure are counted rather than logged.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message_factory import GetMessageClass

from shimhub import telemetry
from shimhub.errors import ResourceExhausted, ShimhubError, Unimplemented

log = logging.getLogger("shimhub.rpc")


def _code(exc: BaseException | None) -> str:
    """The gRPC status code name an RPC ends with."""
    if exc is None:
        return "OK"
    return exc.code.name if isinstance(exc, ShimhubError) else "INTERNAL"


def _record(path: str, started: float, exc: BaseException | None) -> None:
    took = time.monotonic() - started
    log.debug("%s took %.2f ms", path, took * 1e3)
    telemetry.RPC_SECONDS.labels(path).observe(took)
    telemetry.RPC_CALLS.labels(path, _code(exc)).inc()


#: Fields naming the object a request is about, in the order they are looked for.
_OBJECT_FIELDS = ("container_id", "pod_sandbox_id")
#: Seconds during which a repeat of the same failure (method, code, message) is counted, not logged.
REPEAT_WINDOW = 10.0
_repeats: dict[tuple[str, str, str], tuple[float, int]] = {}
_repeats_guard = threading.Lock()


def _about(request: Any) -> str:
    """The object a request names, for the log: a container or sandbox id, or an image."""
    for name in _OBJECT_FIELDS:
        value = getattr(request, name, "")
        if value:
            return f"{name.removesuffix('_id').replace('_', ' ')} {value[:64]}"
    image = getattr(request, "image", None)
    if image is not None and getattr(image, "image", ""):
        return f"image {image.image[:128]!r}"
    return ""


def _log_failure(level: int, path: str, about: str, code: str, message: str, *, exc: BaseException | None) -> None:
    """Log a failed call at `level`; a repeat within REPEAT_WINDOW is counted and said with the next line."""
    key = (path, code, message[:200])
    now = time.monotonic()
    with _repeats_guard:
        last, suppressed = _repeats.get(key, (0.0, 0))
        if now - last < REPEAT_WINDOW:
            _repeats[key] = (last, suppressed + 1)
            return
        _repeats[key] = (now, 0)
        if len(_repeats) > 1000:
            _repeats.clear()
    again = f" (and {suppressed} times more in the last {REPEAT_WINDOW:.0f} s)" if suppressed else ""
    log.log(level, "%s%s failed: %s: %s%s", path, f" ({about})" if about else "", code, message, again, exc_info=exc)


#: Longest status message sent or logged: a request field echoed in an error must not make it huge.
MAX_MESSAGE = 4096


def _bounded(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE else f"{message[:MAX_MESSAGE]}... ({len(message)} characters)"


def _fail(context: grpc.ServicerContext, path: str, request: Any, exc: BaseException) -> None:
    about = _about(request)
    if isinstance(exc, ShimhubError):
        # NOT_FOUND is how the kubelet learns an object is gone: routine, not worth a line by default.
        level = logging.DEBUG if exc.code == grpc.StatusCode.NOT_FOUND else logging.WARNING
        if exc.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
            level = logging.ERROR
        message = _bounded(exc.message)
        _log_failure(level, path, about, exc.code.name, message, exc=None)
        context.abort(exc.code, message)
    message = _bounded(f"{type(exc).__name__}: {exc}")
    _log_failure(logging.ERROR, path, about, "INTERNAL", message, exc=exc)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error in {path}: {message}")


class Lane:
    """At most `limit` calls of one kind at once: calls that can last long (streams, execs, stops, pulls) never
    take the workers that status and list calls need. One call past the limit answers RESOURCE_EXHAUSTED."""

    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.limit = limit
        self._free = threading.BoundedSemaphore(limit)

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        if not self._free.acquire(blocking=False):
            raise ResourceExhausted(f"{self.limit} {self.name} calls are in flight already; try again later")
        try:
            yield
        finally:
            self._free.release()


#: The lanes of calls that may last long, and their methods. Every other call is only bounded by the pool.
LANES = {
    "streaming": (256, ()),  # every server-streaming method: events, and the Stream* lists a slow reader may hold
    "ExecSync": (768, ("ExecSync",)),
    "lifecycle": (
        256,
        ("RunPodSandbox", "StopPodSandbox", "RemovePodSandbox", "CreateContainer", "StartContainer",
         "StopContainer", "RemoveContainer", "UpdateContainerResources", "UpdatePodSandboxResources",
         "CheckpointContainer", "ReopenContainerLog"),
    ),
    "image pull": (64, ("PullImage", "RemoveImage")),
}  # fmt: skip
#: Workers kept for the calls of no lane (status, list, stats, version) when every lane is full.
RESERVED_WORKERS = 128
#: The gRPC server's pool: every lane full at once still leaves RESERVED_WORKERS.
WORKERS = sum(limit for limit, _ in LANES.values()) + RESERVED_WORKERS
_BY_METHOD = {method: (name, limit) for name, (limit, methods) in LANES.items() for method in methods}


def _unary(path: str, impl: Callable[..., Any], lane: Lane | None) -> Callable[[Any, grpc.ServicerContext], Any]:
    def handle(request: Any, context: grpc.ServicerContext) -> Any:
        started = time.monotonic()
        failure: BaseException | None = None
        try:
            with lane.admit() if lane is not None else contextlib.nullcontext():
                return impl(request, context)
        except Exception as exc:  # noqa: BLE001 - every error is mapped to a status here
            failure = exc
            _fail(context, path, request, exc)
        finally:
            _record(path, started, failure)

    return handle


def _streaming(
    path: str, impl: Callable[..., Iterator[Any]], lane: Lane | None
) -> Callable[[Any, grpc.ServicerContext], Iterator[Any]]:
    def handle(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        started = time.monotonic()
        failure: BaseException | None = None
        try:
            with lane.admit() if lane is not None else contextlib.nullcontext():
                yield from impl(request, context)
        except Exception as exc:  # noqa: BLE001 - every error is mapped to a status here
            failure = exc
            _fail(context, path, request, exc)
        finally:
            _record(path, started, failure)

    return handle


def _unimplemented(message: str, streaming: bool) -> Callable[..., Any]:
    def unary(_request: Any, _context: grpc.ServicerContext) -> Any:
        raise Unimplemented(message)

    def stream(_request: Any, _context: grpc.ServicerContext) -> Iterator[Any]:
        raise Unimplemented(message)
        yield  # a generator, as streaming handlers are

    return stream if streaming else unary


def _serialize(response: Any) -> bytes:
    """The response's wire form; a servicer may answer with it already serialized (bytes)."""
    return response if isinstance(response, bytes) else response.SerializeToString()


def lanes() -> dict[str, Lane]:
    """A fresh set of the lanes of LANES, for one server (its services share them)."""
    return {name: Lane(name, limit) for name, (limit, _) in LANES.items()}


def service_handler(service: ServiceDescriptor, servicer: object, lanes: dict[str, Lane]) -> grpc.GenericRpcHandler:
    """A gRPC handler serving every method of `service` from `servicer`, each long-lasting kind in its lane."""
    handlers = {
        method.name: _method_handler(service, method, servicer, _lane_of(method, lanes)) for method in service.methods
    }
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def _lane_of(method: MethodDescriptor, lanes: dict[str, Lane]) -> Lane | None:
    if method.server_streaming:
        return lanes["streaming"]
    return lanes[_BY_METHOD[method.name][0]] if method.name in _BY_METHOD else None


def _method_handler(
    service: ServiceDescriptor, method: MethodDescriptor, servicer: object, lane: Lane | None
) -> grpc.RpcMethodHandler:
    path = f"{service.name}/{method.name}"
    impl = getattr(servicer, method.name, None) or _unimplemented(
        f"shimhub does not implement {service.full_name}/{method.name}", method.server_streaming
    )
    request_class = GetMessageClass(method.input_type)
    kwargs = {"request_deserializer": request_class.FromString, "response_serializer": _serialize}
    if method.server_streaming:
        return grpc.unary_stream_rpc_method_handler(_streaming(path, impl, lane), **kwargs)
    return grpc.unary_unary_rpc_method_handler(_unary(path, impl, lane), **kwargs)

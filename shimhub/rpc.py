"""Serving a protobuf service from a plain Python object.

`service_handler` builds a gRPC handler for every method of a service
descriptor. A method the servicer defines is called as
``servicer.Method(request, context)``; one it does not define answers
UNIMPLEMENTED naming the method. Every call is logged with its duration at
debug level; a ShimhubError becomes its gRPC status; any other exception is
logged with its traceback and answers INTERNAL with a one-line message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message_factory import GetMessageClass

from shimhub import telemetry
from shimhub.errors import ShimhubError, Unimplemented

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


def _fail(context: grpc.ServicerContext, path: str, exc: BaseException) -> None:
    if isinstance(exc, ShimhubError):
        log.debug("%s: %s: %s", path, exc.code.name, exc.message)
        context.abort(exc.code, exc.message)
    log.error("%s: internal error", path, exc_info=exc)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error in {path}: {type(exc).__name__}: {exc}")


def _unary(path: str, impl: Callable[..., Any]) -> Callable[[Any, grpc.ServicerContext], Any]:
    def handle(request: Any, context: grpc.ServicerContext) -> Any:
        started = time.monotonic()
        failure: BaseException | None = None
        try:
            return impl(request, context)
        except Exception as exc:  # noqa: BLE001 - every error is mapped to a status here
            failure = exc
            _fail(context, path, exc)
        finally:
            _record(path, started, failure)

    return handle


def _streaming(path: str, impl: Callable[..., Iterator[Any]]) -> Callable[[Any, grpc.ServicerContext], Iterator[Any]]:
    def handle(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        started = time.monotonic()
        failure: BaseException | None = None
        try:
            yield from impl(request, context)
        except Exception as exc:  # noqa: BLE001 - every error is mapped to a status here
            failure = exc
            _fail(context, path, exc)
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


def service_handler(service: ServiceDescriptor, servicer: object) -> grpc.GenericRpcHandler:
    """A gRPC handler serving every method of `service` from `servicer`."""
    handlers = {method.name: _method_handler(service, method, servicer) for method in service.methods}
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def _method_handler(service: ServiceDescriptor, method: MethodDescriptor, servicer: object) -> grpc.RpcMethodHandler:
    path = f"{service.name}/{method.name}"
    impl = getattr(servicer, method.name, None) or _unimplemented(
        f"shimhub does not implement {service.full_name}/{method.name}", method.server_streaming
    )
    request_class = GetMessageClass(method.input_type)
    kwargs = {"request_deserializer": request_class.FromString, "response_serializer": _serialize}
    if method.server_streaming:
        return grpc.unary_stream_rpc_method_handler(_streaming(path, impl), **kwargs)
    return grpc.unary_unary_rpc_method_handler(_unary(path, impl), **kwargs)

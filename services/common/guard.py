"""The guard around every handler of a dmoe gRPC server: admits, counts, times, answers errors.

Installed by :func:`services.common.server.start_server` as the server's one interceptor, so
health and reflection are guarded too. Per call: admission (:mod:`services.common.limits`),
bytes that do not parse -> INVALID_ARGUMENT, a raised ``StatusError`` -> exactly its code and
message (``services.common.errors.status_of``, the mapping peer links share), a status the
handler set on its context kept, anything else -> INTERNAL with a logged traceback. Each method
is wrapped once, on its first call, because the per-call Python work is what a small unary RPC
costs.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.errors import StatusError, clip, status_of
from services.common.limits import Admission, Refused, peer_key
from services.common.rejections import Rejections

log = logging.getLogger(__name__)


LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


class _Unparsable:
    """Marks a request whose bytes did not parse; the guard answers INVALID_ARGUMENT."""

    def __init__(self, error: Exception) -> None:
        self.error = error


class RpcMetrics:
    """Per-method request counts by status code, latency histograms and in-flight calls."""

    def __init__(self, service: str, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            f"dmoe_{service}_rpc_requests",
            "RPCs served, by method and status code",
            ["method", "code"],
            registry=registry,
        )
        self.duration = Histogram(
            f"dmoe_{service}_rpc_duration_seconds",
            "Time to serve an RPC, by method",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            f"dmoe_{service}_rpc_in_flight", "RPCs being served", registry=registry
        )


def _sized_deserializer(
    deserialize: Callable[[bytes], Any] | None,
) -> Callable[[bytes], tuple[Any, int]]:
    """Parse and keep the request's size for the admission limits: ``(message, len(data))``,
    the message an :class:`_Unparsable` when the bytes do not parse."""

    def parse(data: bytes) -> tuple[Any, int]:
        if deserialize is None:
            return data, len(data)
        try:
            return deserialize(data), len(data)
        except Exception as exc:  # protobuf raises DecodeError, sometimes others
            return _Unparsable(exc), len(data)

    return parse


def _as_async(behavior: Callable[..., Any], response_streaming: bool) -> Callable[..., Any]:
    """A handler written as a plain function (the generated servicer stubs are) as an async one,
    so the guard can await it. Run inline: such handlers here only set a status and raise."""
    if inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior):
        return behavior
    if response_streaming:

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            replies = behavior(request, context)
            if hasattr(replies, "__aiter__"):
                async for reply in replies:
                    yield reply
            else:
                for reply in replies:
                    yield reply

        return stream

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        reply = behavior(request, context)
        return await reply if inspect.isawaitable(reply) else reply

    return unary


class GuardInterceptor(grpc.aio.ServerInterceptor):
    """Admits, counts, times and guards every handler, health and reflection included.

    Per call: admission (:mod:`services.common.limits`: RESOURCE_EXHAUSTED past a limit),
    bytes that do not parse -> INVALID_ARGUMENT, a raised ``StatusError`` -> its code and
    message (how handlers answer a refusal; they do not call ``context.abort``), a status the
    handler set on its context (or ``NotImplementedError`` -> UNIMPLEMENTED) kept as is, any
    other exception -> INTERNAL with a message and a logged traceback. Refusals count in
    ``dmoe_<service>_rejected_total``.
    """

    def __init__(self, metrics: RpcMetrics, admission: Admission, rejections: Rejections) -> None:
        self._metrics = metrics
        self._admission = admission
        self._rejections = rejections
        metrics.in_flight.set_function(lambda: admission.in_flight)
        # full method path -> the handler to use; the registered handlers are fixed once the
        # server runs, so each method is wrapped once instead of on every call (saves a good
        # share of the per-call Python work of a small unary RPC)
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        held = self._handlers.get(details.method)
        if held is not None:
            return held
        handler = await continuation(details)
        if handler is None:
            return handler
        handler = self._wrap(handler, details.method.rsplit("/", 1)[-1])
        self._handlers[details.method] = handler
        return handler

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        metrics, admission, rejections = self._metrics, self._admission, self._rejections
        admit, release, grow = admission.admit, admission.release, admission.grow
        duration = metrics.duration.labels(method)
        counters: dict[str, Any] = {}  # status code name -> counter child

        def finish(context: grpc.aio.ServicerContext, error: bool, started: float) -> None:
            code = context.code() or (grpc.StatusCode.INTERNAL if error else grpc.StatusCode.OK)
            name = getattr(code, "name", str(code))
            counter = counters.get(name)
            if counter is None:
                counter = counters[name] = metrics.requests.labels(method, name)
            counter.inc()
            duration.observe(time.perf_counter() - started)

        kind = (handler.request_streaming, handler.response_streaming)
        behavior = _as_async(
            {
                (False, False): handler.unary_unary,
                (False, True): handler.unary_stream,
                (True, False): handler.stream_unary,
                (True, True): handler.stream_stream,
            }[kind],
            handler.response_streaming,
        )

        async def refuse(refused: Refused, context: grpc.aio.ServicerContext) -> NoReturn:
            source = peer_key(context.peer())
            rejections.reject(refused.reason, refused.message, source, method=method)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refused.message)
            raise AssertionError("context.abort returned")  # it raises; for the type checker

        async def malformed(request: _Unparsable, context: grpc.aio.ServicerContext) -> None:
            message = clip(f"malformed request: {request.error}")
            source = peer_key(context.peer())
            rejections.reject("malformed", f"malformed {method} request", source, method=method,
                              error=str(request.error)[:200])  # fmt: skip
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)

        async def failed(exc: Exception, context: grpc.aio.ServicerContext) -> NoReturn:
            if not isinstance(exc, StatusError):
                code = context.code()
                if isinstance(exc, NotImplementedError) and code in (None, grpc.StatusCode.OK):
                    code = grpc.StatusCode.UNIMPLEMENTED
                if isinstance(code, grpc.StatusCode) and code not in _NOT_CHOSEN:
                    # a status set on the context before raising (the generated stubs do):
                    # keep it (no traceback)
                    message = context.details() or f"{type(exc).__name__}: {exc}"
                    await context.abort(code, clip(message))
            # the mapping a link shares: StatusError -> its status, anything else -> INTERNAL
            await context.abort(*status_of(exc, method))
            raise AssertionError("context.abort returned")  # it raises; for the type checker

        @contextlib.asynccontextmanager
        async def guard(context: grpc.aio.ServicerContext, size: int) -> AsyncIterator[list[Any]]:
            """Admits a streaming call; yields ``[peer, bytes held]`` (chunks add to it)."""
            started, error, peer = time.perf_counter(), False, None
            held: list[Any] = [None, size]
            try:
                admitted = admit(context.peer(), size, True)
                if isinstance(admitted, Refused):
                    await refuse(admitted, context)
                peer = held[0] = admitted
                yield held
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as exc:
                if context.cancelled() or context.done():
                    raise  # the caller hung up: no status to send, gRPC drops it quietly
                error = True
                await failed(exc, context)
            finally:
                if peer is not None:
                    release(peer, held[1], True)
                finish(context, error, started)

        async def checked(
            requests: AsyncIterator[tuple[Any, int]],
            context: grpc.aio.ServicerContext,
            held: list[Any],
        ) -> Any:
            async for request, size in requests:
                refused = grow(held[0], size)
                if refused is not None:
                    await refuse(refused, context)
                held[1] += size
                if type(request) is _Unparsable:
                    await malformed(request, context)
                yield request

        async def unary_unary(parsed: tuple[Any, int], context: grpc.aio.ServicerContext) -> Any:
            # the guard written out: the hot path of every small RPC, no context manager
            request, size = parsed
            started, error, peer = time.perf_counter(), False, None
            try:
                admitted = admit(context.peer(), size, False)
                if isinstance(admitted, Refused):
                    await refuse(admitted, context)
                peer = admitted
                if type(request) is _Unparsable:
                    await malformed(request, context)
                return await behavior(request, context)
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as exc:
                if context.cancelled() or context.done():
                    raise  # the caller hung up: no status to send, gRPC drops it quietly
                error = True
                await failed(exc, context)
            finally:
                if peer is not None:
                    release(peer, size, False)
                finish(context, error, started)

        async def unary_stream(parsed: tuple[Any, int], context: grpc.aio.ServicerContext) -> Any:
            request, size = parsed
            async with guard(context, size):
                if type(request) is _Unparsable:
                    await malformed(request, context)
                async for reply in behavior(request, context):
                    yield reply

        async def stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            async with guard(context, 0) as held:
                return await behavior(checked(requests, context, held), context)

        async def stream_stream(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            async with guard(context, 0) as held:
                async for reply in behavior(checked(requests, context, held), context):
                    yield reply

        async def frames(requests: AsyncIterator[tuple[Any, int]], context: Any) -> Any:
            async for request, _size in requests:
                if type(request) is _Unparsable:
                    await malformed(request, context)
                yield request

        async def link_stream(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            # a peer link (services.common.link): one open stream for its caller; the link
            # admits, counts and times each request on it, so its bytes are not added up here
            async with guard(context, 0):
                async for reply in behavior(frames(requests, context), context):
                    yield reply

        async def unary_writes(parsed: tuple[Any, int], context: grpc.aio.ServicerContext) -> None:
            request, size = parsed
            async with guard(context, size):
                if type(request) is _Unparsable:
                    await malformed(request, context)
                await behavior(request, context)

        wrapped = {
            (False, False): unary_unary,
            (False, True): unary_stream,
            (True, False): stream_unary,
            (True, True): link_stream if method == "Link" else stream_stream,
        }[kind]
        if kind[1] and not inspect.isasyncgenfunction(behavior):
            # a response stream written with ``await context.write(...)`` (health Watch), not
            # yielded: the wrapper must be a coroutine too, gRPC does not mix the two styles
            wrapped = unary_writes if kind == (False, True) else stream_unary
        factory = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[kind]
        return factory(
            wrapped,
            request_deserializer=_sized_deserializer(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )


# statuses that do not mean "the handler chose this": unset, OK, and UNKNOWN (never sent)
_NOT_CHOSEN = (None, grpc.StatusCode.OK, grpc.StatusCode.UNKNOWN)

"""The ``dmoe.Expert`` gRPC servicer: decode, validate, queue, answer.

A Forward (Backward the same) goes ``Forward`` -> ``_unary`` -> ``handle`` (``_call``, wrapped
by ``faults.py`` only when failures or latency are simulated): look up the expert, parse the
tensors' metadata (``wire.parse``) and check them against its schemas
(``ExpertBackend.validate``), then ``TaskPool.submit`` and await the future that the scheduler
(``scheduler.py``) resolves once the batch ran (``batch_runner.py``).

Every check that can fail happens before a request joins a pool, so a bad request gets its own
status (NOT_FOUND, INVALID_ARGUMENT, RESOURCE_EXHAUSTED) and never reaches a batch or the
weights. Every failure is an ``ExpertError`` (a ``StatusError``) carrying its status: a refused
input is counted in ``dmoe_expert_rejected_total{reason}`` and logged (rate-limited) with its
peer in one place (``_refused``), then the error is raised and the server guard or the link
server answers it as its status (``services.common.errors.status_of``). Forward/Backward
replies are serialized on the compute thread (``Task.reply``) and returned as bytes, so the
event loop only moves them to the wire.

Memory: a streamed request's announced size is checked before anything is kept for it, its
chunks are appended to one buffer that grows in place, and all streams being received share
one byte budget (``--max-receive-bytes``), so many slow or stalled streams cannot add up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from functools import partial
from typing import Any

import grpc
import torch
from google.protobuf.message import DecodeError

from services.common.addresses import peer_host
from services.common.errors import echo
from services.common.limits import peer_key
from services.common.link import LinkServer, link_method_handler, protobuf_method
from services.common.rejections import Rejections
from services.common.server import add_service
from services.common.tensor_codec import TORCH_TO_WIRE, TensorDecodeError, encode
from services.expert.backend import ExpertBackend
from services.expert.caller_share import CallerShare
from services.expert.errors import ExpertError, exhausted, invalid, not_found
from services.expert.faults import Handle
from services.expert.metrics import ExpertMetrics
from services.expert.task_pool import BACKWARD, FORWARD, TaskPool
from services.expert.wire import parse
from services.proto import expert_pb2, tensor_pb2

log = logging.getLogger(__name__)

SERVICE_NAME = "dmoe.Expert"
STREAM_CHUNK_CAP = 4 * 1024 * 1024  # smaller chunks pipeline; larger ones save per-message cost
_COMPRESSIONS = set(tensor_pb2.Compression.values())


def encode_reply(outputs: list[torch.Tensor], compression: tensor_pb2.Compression) -> bytes:
    """Serialized ``ExpertResponse``; lossy compression applies to floating tensors only."""
    response = expert_pb2.ExpertResponse()
    for out in outputs:
        chosen = compression if out.is_floating_point() else tensor_pb2.COMPRESSION_NONE
        response.tensors.append(encode(out, chosen))
    return response.SerializeToString()


def split_chunks(data: bytes, chunk: int) -> Iterator[expert_pb2.Chunk]:
    """The reply in chunks, made as grpc sends them (not all copied up front)."""
    view = memoryview(data)
    for i in range(0, max(len(data), 1), chunk):
        message = expert_pb2.Chunk(data=bytes(view[i : i + chunk]))
        if i == 0:
            message.total_bytes = len(data)
        yield message


def _schema(schema: object) -> expert_pb2.TensorSchema:
    return expert_pb2.TensorSchema(shape=schema.shape, dtype=TORCH_TO_WIRE[schema.dtype])  # type: ignore[attr-defined]


class ExpertServicer:
    def __init__(
        self,
        backends: dict[str, ExpertBackend],
        pools: dict[tuple[str, str], TaskPool],
        metrics: ExpertMetrics,
        *,
        rejections: Rejections,
        max_message_bytes: int,
        max_stream_bytes: int,
        max_receive_bytes: int,
        public_key: bytes = b"",
        max_caller_share: float = 0.0,
        caller_share_window: int = 256,
    ) -> None:
        self.backends = backends
        # one caller's share of each expert's backward requests (caller_share.py); {}: off
        self.shares = (
            {uid: CallerShare(max_caller_share, caller_share_window) for uid in backends}
            if max_caller_share > 0
            else {}
        )
        self.public_key = public_key
        self.pools = pools
        self.metrics = metrics
        self.max_message_bytes = max_message_bytes
        self.max_stream_bytes = max_stream_bytes
        self.max_receive_bytes = max_receive_bytes
        self.rejections = rejections
        self._receiving = 0  # bytes held by streams being received
        # the request path; ``faults.with_faults`` wraps it when failures are simulated
        self.handle: Handle = self._call
        self._latency = {m: metrics.latency.labels(m) for m in (FORWARD, BACKWARD)}
        self._in_flight = {m: metrics.in_flight.labels(m) for m in (FORWARD, BACKWARD)}
        self._counts: dict[tuple[str, str, str], Any] = {}
        # the same three methods over a peer link (services.common.link): what clients use
        self.link = LinkServer(
            {
                "Info": protobuf_method(expert_pb2.InfoRequest, self._info_linked),
                "Forward": self._linked(FORWARD),
                "Backward": self._linked(BACKWARD),
            }
        )

    def _linked(self, method: str) -> Any:
        async def serve(payload: bytes, peer: str) -> bytes:
            try:
                try:
                    request = expert_pb2.ExpertRequest.FromString(payload)
                except DecodeError as exc:
                    raise invalid(f"malformed request: {exc}") from exc
                return await self.handle(method, request, peer)
            except ExpertError as exc:
                self._refused(peer, method, exc)
                raise

        return serve

    async def _info_linked(self, request: expert_pb2.InfoRequest, peer: str) -> Any:
        try:
            return self.info(request)
        except ExpertError as exc:
            self._refused(peer, "info", exc)
            raise

    def _count(self, uid: str, method: str, code: str) -> None:
        key = (uid, method, code)
        child = self._counts.get(key)
        if child is None:
            child = self._counts[key] = self.metrics.requests.labels(uid, method, code)
        child.inc()

    def register(self, server: grpc.aio.Server) -> list[str]:
        def raw(data: bytes) -> bytes:
            return data

        request = expert_pb2.ExpertRequest.FromString
        chunk_in, chunk_out = expert_pb2.Chunk.FromString, expert_pb2.Chunk.SerializeToString
        handlers = {
            "Info": grpc.unary_unary_rpc_method_handler(
                self.Info,
                request_deserializer=expert_pb2.InfoRequest.FromString,
                response_serializer=expert_pb2.InfoResponse.SerializeToString,
            ),
            "Forward": grpc.unary_unary_rpc_method_handler(
                self.Forward, request_deserializer=request, response_serializer=raw
            ),
            "Backward": grpc.unary_unary_rpc_method_handler(
                self.Backward, request_deserializer=request, response_serializer=raw
            ),
            "ForwardStream": grpc.stream_stream_rpc_method_handler(
                self.ForwardStream, request_deserializer=chunk_in, response_serializer=chunk_out
            ),
            "BackwardStream": grpc.stream_stream_rpc_method_handler(
                self.BackwardStream, request_deserializer=chunk_in, response_serializer=chunk_out
            ),
            "Link": link_method_handler(self.Link),
        }
        return add_service(server, SERVICE_NAME, handlers)

    # ---- RPCs ----

    async def Info(
        self, request: expert_pb2.InfoRequest, context: grpc.aio.ServicerContext
    ) -> expert_pb2.InfoResponse:
        try:
            return self.info(request)
        except ExpertError as exc:
            self._refused(context.peer() or "", "info", exc)
            raise

    def Link(self, batches: Any, context: grpc.aio.ServicerContext) -> Any:
        return self.link.serve(batches, context)

    def info(self, request: expert_pb2.InfoRequest) -> expert_pb2.InfoResponse:
        backend = self.backends.get(request.uid)
        if backend is None:
            raise not_found(self._unknown(request.uid))
        return expert_pb2.InfoResponse(
            uid=backend.uid,
            expert_class=backend.expert_class.name,
            inputs=[_schema(s) for s in backend.input_schemas],
            outputs=[_schema(s) for s in backend.output_schemas],
            num_parameters=backend.num_parameters,
            optimizer_steps=backend.steps,
            max_batch_size=backend.max_batch_size,
            public_key=self.public_key,
        )

    async def Forward(
        self, request: expert_pb2.ExpertRequest, context: grpc.aio.ServicerContext
    ) -> bytes:
        return await self._unary(FORWARD, request, context)

    async def Backward(
        self, request: expert_pb2.ExpertRequest, context: grpc.aio.ServicerContext
    ) -> bytes:
        return await self._unary(BACKWARD, request, context)

    def ForwardStream(
        self, chunks: AsyncIterator[expert_pb2.Chunk], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[expert_pb2.Chunk]:
        return self._stream(FORWARD, chunks, context)

    def BackwardStream(
        self, chunks: AsyncIterator[expert_pb2.Chunk], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[expert_pb2.Chunk]:
        return self._stream(BACKWARD, chunks, context)

    # ---- shared path ----

    def _unknown(self, uid: str) -> str:
        return f"expert {echo(uid)} is not hosted here ({len(self.backends)} experts hosted)"

    async def _unary(
        self, method: str, request: expert_pb2.ExpertRequest, context: grpc.aio.ServicerContext
    ) -> bytes:
        try:
            reply = await self.handle(method, request, self._peer(context))
            if len(reply) > self.max_message_bytes:
                raise ExpertError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"reply of {len(reply)} bytes exceeds the {self.max_message_bytes}-byte "
                    f"message limit; use {method.capitalize()}Stream",
                )
            return reply
        except ExpertError as exc:
            self._refused(context.peer() or "", method, exc)
            raise

    async def _stream(
        self,
        method: str,
        chunks: AsyncIterator[expert_pb2.Chunk],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[expert_pb2.Chunk]:
        try:
            data, reply_chunk = await self._collect(chunks)
            size = len(data)
            try:
                request = expert_pb2.ExpertRequest.FromString(data)
            except DecodeError as exc:
                raise invalid(f"malformed streamed request: {exc}") from exc
            finally:
                del data  # the parsed message holds its own copy
                self._hold(-size)
            reply = await self.handle(method, request, self._peer(context))
        except ExpertError as exc:
            self._refused(context.peer() or "", method, exc)
            raise
        for chunk in split_chunks(reply, reply_chunk):
            yield chunk

    def _refused(self, peer: str, method: str, exc: ExpertError) -> None:
        """Count and log a refused input with its peer's host (every path calls this before
        raising ``exc``; the guard or the link server then answers it as its status)."""
        if exc.reason is not None:
            host = peer_host(peer) or peer  # not the port: one key per host, as limits key it
            message = f"refused {method}: {exc}"
            self.rejections.reject(exc.reason, message, source=host, code=exc.code.name)

    def _peer(self, context: grpc.aio.ServicerContext) -> str:
        """The caller, where a check needs it (``context.peer()`` costs a call per request)."""
        return (context.peer() or "") if self.shares else ""

    def _check_share(self, uid: str, peer: str) -> None:
        shares = self.shares[uid]
        caller = peer_key(peer)
        if not shares.admit(caller):
            raise exhausted(
                f"this caller ({echo(caller)}) sent {shares.held(caller)} of expert {uid}'s last "
                f"{shares.window} backward requests, its share is {shares.share:g} "
                "(--max-caller-share); retry after other callers' requests",
                "caller_share",
            )

    def _hold(self, size: int) -> None:
        """Take ``size`` bytes from the receive budget (give them back with a negative size)."""
        if size > 0 and self._receiving + size > self.max_receive_bytes:
            raise exhausted(
                f"streamed requests being received hold {self._receiving} bytes; {size} more "
                f"would pass the {self.max_receive_bytes}-byte budget (--max-receive-bytes); "
                "retry later",
                "receive_budget",
            )
        self._receiving += size
        self.metrics.receive_bytes.set(self._receiving)

    async def _collect(self, chunks: AsyncIterator[expert_pb2.Chunk]) -> tuple[bytearray, int]:
        """The streamed request's bytes, and the chunk size for the reply.

        The announced ``total_bytes`` is checked on the first chunk, before anything is kept.
        Chunks are appended to one ``bytearray`` (grown in place by realloc, so what arrived
        before is not copied again, and only what arrived is held), each taking its size from
        the receive budget; the caller gives the buffer's size back after parsing it.
        """
        buffer = bytearray()
        total = 0
        reply_chunk = min(self.max_message_bytes - 1024, STREAM_CHUNK_CAP)
        first = True
        try:
            async for chunk in chunks:
                if first:
                    total, first = chunk.total_bytes, False
                    if chunk.max_chunk_bytes > 0:
                        reply_chunk = min(reply_chunk, chunk.max_chunk_bytes)
                    if total > self.max_stream_bytes:
                        raise invalid(
                            f"streamed request of {total} bytes exceeds the limit of "
                            f"{self.max_stream_bytes} (--max-stream-bytes)",
                            "request_too_large",
                        )
                data = chunk.data
                if len(buffer) + len(data) > total:
                    raise invalid(f"stream carries more than the announced total_bytes={total}")
                self._hold(len(data))
                buffer += data
                if len(buffer) == total:
                    break
            if first or len(buffer) != total:
                raise invalid(f"stream ended after {len(buffer)} of {total} announced bytes")
        except BaseException:
            self._hold(-len(buffer))
            raise
        return buffer, max(1024, reply_chunk)

    async def _call(self, method: str, request: expert_pb2.ExpertRequest, peer: str) -> bytes:
        """The reply to a Forward or Backward: validated, queued, batched, computed.
        ``peer``: the caller's ``context.peer()``."""
        started = time.perf_counter()
        label, code = "unknown", grpc.StatusCode.OK
        self._in_flight[method].inc()
        try:
            uid = request.uid  # one str made of it (each access to the field makes another)
            backend = self.backends.get(uid)
            del uid
            if backend is None:
                raise not_found(self._unknown(request.uid))
            label = backend.uid
            if request.reply_compression not in _COMPRESSIONS:
                raise invalid(f"unknown reply_compression {request.reply_compression}")
            try:
                tensors = [parse(t) for t in request.tensors]
            except TensorDecodeError as exc:
                raise invalid(str(exc)) from exc
            rows = backend.validate(tensors, backward=method == BACKWARD)
            if method == BACKWARD and self.shares:
                self._check_share(backend.uid, peer)
            future = self.pools[(backend.uid, method)].submit(
                tensors,
                rows,
                sum(len(t.buffer) for t in tensors),
                partial(encode_reply, compression=request.reply_compression),
            )
            reply: bytes = await future  # the scheduler sets the reply or an ExpertError
            return reply
        except ExpertError as exc:
            code = exc.code
            raise
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            self._in_flight[method].dec()
            self._count(label, method, code.name)
            self._latency[method].observe(time.perf_counter() - started)

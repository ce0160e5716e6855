"""The callee's end of a peer link (:mod:`services.common.link`): a frame is one request.

What the unary path guarantees, :class:`LinkServer` keeps per request: a bad request gets its
own error reply while the stream and the other requests go on; each request is admitted (rate,
bytes in flight: :mod:`services.common.limits`), counted and timed per method and code like a
unary call of that name. Against a hostile caller: a message of more than
``4 * MAX_BATCH_FRAMES`` frames closes the link and costs a rate token per frame; frames refused
before admission cost a token each; the next message is read only while the replies waiting
are under ``max_outbox_bytes`` (a caller that does not read is not read).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from services.common.errors import StatusError, status_of
from services.common.limits import Admission, Refused, peer_key
from services.common.link_outbox import MAX_BATCH_FRAMES, Outbox
from services.common.rejections import Rejections
from services.proto.link_pb2 import LinkBatch, LinkFrame

# (request payload, caller's context.peer() string) -> reply payload; raise StatusError to fail
LinkMethod = Callable[[bytes, str], Awaitable[bytes]]


def _forget(tasks: dict[int, asyncio.Task[None]], frame_id: int, _done: object) -> None:
    tasks.pop(frame_id, None)


def protobuf_method(request_type: Any, handle: Callable[[Any, str], Awaitable[Any]]) -> LinkMethod:
    """A link method from a coroutine ``(request message, peer) -> reply message``: parses
    the payload (INVALID_ARGUMENT when it does not), serializes the reply."""
    parse = request_type.FromString

    async def serve(payload: bytes, peer: str) -> bytes:
        try:
            request = parse(payload)
        except DecodeError as exc:
            raise StatusError(
                grpc.StatusCode.INVALID_ARGUMENT, f"malformed {request_type.__name__}: {exc}"
            ) from None
        return (await handle(request, peer)).SerializeToString()

    return serve


def link_method_handler(serve: Callable[..., Any]) -> grpc.RpcMethodHandler:
    """The ``<Service>/Link`` method handler: a stream of ``LinkBatch`` each way, ``serve``
    being the servicer's ``Link`` (which hands the stream to its :class:`LinkServer`)."""
    return grpc.stream_stream_rpc_method_handler(
        serve,
        request_deserializer=LinkBatch.FromString,
        response_serializer=LinkBatch.SerializeToString,
    )


class LinkServer:
    """Serves one service's ``Link`` method: each frame is one request to ``methods[name]``.

    :meth:`bind` hands it the server's guard objects (``start_server(links=...)`` does), so
    requests on a link are admitted, counted and timed like unary calls of the same name.
    """

    def __init__(
        self,
        methods: dict[str, LinkMethod],
        max_pending: int = 256,
        max_batch_frames: int = MAX_BATCH_FRAMES * 4,
        max_outbox_bytes: int = 8 << 20,
    ) -> None:
        self.methods = methods
        self.max_pending = max_pending
        self.max_batch_frames = max_batch_frames
        self.max_outbox_bytes = max_outbox_bytes
        self._metrics: Any = None
        self._admission: Admission | None = None
        self._rejections: Rejections | None = None
        self._children: dict[tuple[str, str], Any] = {}

    def bind(self, metrics: Any, admission: Admission, rejections: Rejections) -> None:
        self._metrics, self._admission, self._rejections = metrics, admission, rejections

    def _count(self, method: str, code: grpc.StatusCode, started: float) -> None:
        if self._metrics is None:
            return
        key = (method, code.name)
        children = self._children.get(key)
        if children is None:
            children = (
                self._metrics.requests.labels(method, code.name),
                self._metrics.duration.labels(method),
            )
            self._children[key] = children
        children[0].inc()
        children[1].observe(time.perf_counter() - started)

    async def serve(
        self, batches: AsyncIterator[LinkBatch], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[LinkBatch]:
        """The ``Link`` handler: read requests, run each as its own task, yield the replies
        (all those ready since the last message, in one)."""
        peer = context.peer()
        replies = Outbox()
        tasks: dict[int, asyncio.Task[None]] = {}
        reader = asyncio.ensure_future(self._read(batches, peer, replies, tasks))
        try:
            while True:
                frames = await replies.take()
                if frames is None:
                    if replies.error is not None:
                        raise replies.error  # the server guard answers it as its status
                    return
                yield LinkBatch(frames=frames)
        finally:
            reader.cancel()
            for task in list(tasks.values()):
                task.cancel()

    async def _read(
        self,
        batches: AsyncIterator[LinkBatch],
        peer: str,
        replies: Outbox,
        tasks: dict[int, asyncio.Task[None]],
    ) -> None:
        try:
            async for batch in batches:
                count = len(batch.frames)  # known before a Python object per frame exists
                if count > self.max_batch_frames:
                    # no honest caller sends this many (LinkClient: MAX_BATCH_FRAMES): cut the
                    # stream, and make every frame cost its caller a rate token
                    self._charge(peer, count)
                    replies.error = self._refuse(
                        peer,
                        "link_flood",
                        f"{count} frames in one link message, limit {self.max_batch_frames}",
                    )
                    return
                refused = 0
                for frame in batch.frames:
                    if frame.cancel:
                        task = tasks.pop(frame.id, None)
                        if task is not None:
                            task.cancel()
                        continue
                    problem = self._problem(frame, tasks)
                    if problem is not None:
                        refused += 1  # not admitted, so charged here: junk is not free
                        replies.put(problem)
                        continue
                    task = asyncio.ensure_future(self._run(frame, peer, replies))
                    tasks[frame.id] = task
                    task.add_done_callback(functools.partial(_forget, tasks, frame.id))
                if refused and self._charge(peer, refused) is not None:
                    replies.error = self._refuse(
                        peer, "peer_rate", f"{refused} refused requests and over the rate limit"
                    )
                    return
                # backpressure: read the next message only once the replies are on their way
                # (a caller that never reads its replies stops being read), and let the event
                # loop serve others between messages
                await replies.drained(self.max_outbox_bytes, pause=count > 64)
            if tasks:  # the caller closed its side: finish what it asked for
                await asyncio.gather(*tasks.values(), return_exceptions=True)
        finally:
            replies.close()

    def _charge(self, peer: str, count: int) -> Refused | None:
        """Take ``count`` rate tokens from ``peer`` (its bucket may go into debt)."""
        if self._admission is None:
            return None
        return self._admission.charge(peer, count)

    def _refuse(self, peer: str, reason: str, message: str) -> StatusError:
        if self._rejections is not None:
            self._rejections.reject(reason, "closed a peer link", peer_key(peer), detail=message)
        return StatusError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"link closed: {message}")

    def _problem(self, frame: LinkFrame, tasks: dict[int, Any]) -> LinkFrame | None:
        if frame.id in tasks:
            return _error(frame.id, grpc.StatusCode.INVALID_ARGUMENT, "request id already pending")
        if frame.method not in self.methods:
            return _error(
                frame.id, grpc.StatusCode.UNIMPLEMENTED, f"no method {frame.method[:100]!r}"
            )
        if len(tasks) >= self.max_pending:
            return _error(
                frame.id,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{len(tasks)} requests pending on this link, the limit; wait for replies",
            )
        return None

    async def _run(self, frame: LinkFrame, peer: str, replies: Outbox) -> None:
        started = time.perf_counter()
        method, size = frame.method, len(frame.payload)
        admitted = self._admission.admit(peer, size, False) if self._admission else None
        if type(admitted) is Refused:
            if self._rejections is not None:
                self._rejections.reject(admitted.reason, admitted.message, peer_key(peer),
                                        method=method)  # fmt: skip
            self._count(method, grpc.StatusCode.RESOURCE_EXHAUSTED, started)
            replies.put(_error(frame.id, grpc.StatusCode.RESOURCE_EXHAUSTED, admitted.message))
            return
        code = grpc.StatusCode.OK
        try:
            payload = await self.methods[method](frame.payload, peer)
            reply = LinkFrame(id=frame.id, payload=payload)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED  # the caller gave up: no reply
            raise
        except Exception as exc:
            # the guard's mapping for unary calls: StatusError -> its status, else INTERNAL
            code, details = status_of(exc, method, " over a link")
            reply = _error(frame.id, code, details)
        finally:
            if admitted is not None:
                self._admission.release(admitted, size, False)  # type: ignore[union-attr,arg-type]
            self._count(method, code, started)
        if replies.size > 4 * self.max_outbox_bytes and len(reply.payload) > 4096:
            # the caller does not read its replies (reading stopped at max_outbox_bytes; only
            # requests already running add more): do not pile up more large ones
            reply = _error(
                frame.id,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"reply of {len(reply.payload)} bytes refused: {replies.size} bytes of replies "
                "wait on this link unread",
            )
        replies.put(reply)


def _error(request_id: int, code: grpc.StatusCode, details: str) -> LinkFrame:
    return LinkFrame(id=request_id, code=code.value[0], details=details)

"""Peer links: many requests over one long-lived bidirectional gRPC stream (``proto/link.proto``).

A unary gRPC call pays, every time, for a new HTTP/2 stream, its metadata, a deadline timer and a
handful of Python call objects on both sides: most of the CPU a small request costs here
(figures: docs/dht.md, ``benchmarks/rpc_floor.py``). A link opens one stream per (caller, callee)
and sends each request as a :class:`LinkFrame` with an id; replies come back in any order,
matched by id. Frames are sent in batches (:class:`LinkBatch`): whatever queued up while the
previous stream message was being written leaves in the next one, so under load many requests
share the cost of one gRPC message, and an idle link adds no delay (no timer: the first frame
leaves at once). What the unary path guarantees, the link keeps per request:

- validation and a clear status per request: a bad request gets its own error reply, the stream
  and the other requests go on (:class:`LinkServer`);
- admission per request (rate, bytes in flight: :mod:`services.common.limits`), metrics per
  method and code, rejections counted, exactly as the guard does for unary calls (the stream
  itself counts as one open stream of its caller);
- per-request deadlines and cancellation on the caller's side (:class:`LinkClient`): a request
  whose deadline passes fails with DEADLINE_EXCEEDED and the callee is told to drop it;
- after a failure the stream is reopened on a fresh channel, so DNS is resolved again; TLS is
  the channel's.

Trade-off: one stream carries requests one after the other, so a large message delays the small
ones behind it (head-of-line blocking): callers send large payloads over their other paths
(the expert client's chunked streams); DHT messages are small.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from services.common.errors import CallError, StatusError, status_of
from services.common.limits import Admission, Refused, peer_key
from services.common.rejections import Rejections
from services.proto.link_pb2 import LinkBatch, LinkFrame

# (request payload, caller's context.peer() string) -> reply payload; raise StatusError to fail
LinkMethod = Callable[[bytes, str], Awaitable[bytes]]
_CODES = {code.value[0]: code for code in grpc.StatusCode}
MAX_BATCH_FRAMES = 256  # frames a caller puts in one stream message (a server takes 4x)
CLOSE_WAIT = 2.0  # seconds a closing link waits for its callee to end the stream


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
        replies = _Outbox()
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
        replies: _Outbox,
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

    async def _run(self, frame: LinkFrame, peer: str, replies: _Outbox) -> None:
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


def _frame_bytes(frame: LinkFrame) -> int:
    return len(frame.payload) + len(frame.details) + 16


class _Outbox:
    """Frames waiting to leave; :meth:`take` waits for at least one and returns a batch: those
    that fit ``max_bytes`` of payload and ``max_frames`` (at least one; None once closed and
    empty). ``size`` counts the bytes waiting; :meth:`drained` waits until it is under a
    bound (backpressure). ``error``: why the link is being closed, if it is."""

    def __init__(self, max_bytes: int = 4 << 20, max_frames: int = MAX_BATCH_FRAMES) -> None:
        self.max_bytes = max_bytes
        self.max_frames = max_frames
        self.size = 0
        self.error: StatusError | None = None
        self._frames: deque[LinkFrame] = deque()
        self._ready: asyncio.Future[None] | None = None
        self._room: asyncio.Future[None] | None = None
        self._closed = False

    def put(self, frame: LinkFrame) -> None:
        self._frames.append(frame)
        self.size += _frame_bytes(frame)
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)

    def close(self) -> None:
        self._closed = True
        for waiter in (self._ready, self._room):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    async def drained(self, limit: int, pause: bool = False) -> None:
        """Return once at most ``limit`` bytes wait (or the outbox closed); ``pause``: yield
        to the event loop even then."""
        if pause:
            await asyncio.sleep(0)
        while self.size > limit and not self._closed:
            self._room = asyncio.get_running_loop().create_future()
            await self._room

    async def take(self) -> list[LinkFrame] | None:
        while not self._frames:
            if self._closed:
                return None
            self._ready = asyncio.get_running_loop().create_future()
            await self._ready
        frames, size = self._frames, 0
        taken: list[LinkFrame] = []
        while frames and len(taken) < self.max_frames:
            frame = frames[0]
            cost = _frame_bytes(frame)
            if taken and size + len(frame.payload) > self.max_bytes:
                break
            taken.append(frames.popleft())
            size += len(frame.payload)
            self.size -= cost
        if self._room is not None and not self._room.done():
            self._room.set_result(None)
        return taken


class LinkClient:
    """Requests to one peer over one ``Link`` stream.

    ``open_call()`` opens the stream (on the caller's channel: TLS, message limits); after the
    stream fails, the next request calls it again (the caller should make a new channel then,
    so DNS is resolved again: see :class:`LinkPool`).
    """

    def __init__(self, open_call: Callable[[], Any]) -> None:
        self._open_call = open_call
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._outbox = _Outbox()
        self._pending: dict[int, asyncio.Future[bytes]] = {}
        self._ids = itertools.count(1)
        self.closed = False

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _ensure(self) -> Any:
        if self._call is None:
            if self.closed:
                raise CallError(grpc.StatusCode.UNAVAILABLE, "link closed")
            self._call = self._open_call()
            self._outbox = _Outbox()
            self._reader = asyncio.ensure_future(self._read(self._call))
            self._writer = asyncio.ensure_future(self._write(self._call, self._outbox))
        return self._call

    async def _write(self, call: Any, outbox: _Outbox) -> None:
        """Send what queued up, one batch per stream message, until the link ends."""
        try:
            while True:
                frames = await outbox.take()
                if frames is None:
                    return
                await call.write(LinkBatch(frames=frames))
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError,
                RuntimeError) as exc:  # fmt: skip
            # the stream ended under us (the peer died, the channel closed)
            self._broken(call, f"link write failed: {type(exc).__name__}: {exc}")

    async def call(self, method: str, payload: bytes, timeout: float) -> bytes:
        """The reply payload; raises :class:`CallError` (DEADLINE_EXCEEDED after ``timeout``)."""
        call = self._ensure()
        request_id = next(self._ids)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes] = loop.create_future()
        self._pending[request_id] = future
        timer = loop.call_later(timeout, _expire, future, timeout)
        try:
            self._outbox.put(
                LinkFrame(id=request_id, method=method, payload=payload, timeout=timeout)
            )
            return await future
        except BaseException as exc:
            if not isinstance(exc, CallError) or exc.code == grpc.StatusCode.DEADLINE_EXCEEDED:
                self._cancel(call, request_id)
            raise
        finally:
            timer.cancel()
            self._pending.pop(request_id, None)

    def _cancel(self, call: Any, request_id: int) -> None:
        """Tell the callee to drop ``request_id`` (with the next batch)."""
        if call is self._call and not call.done():
            self._outbox.put(LinkFrame(id=request_id, cancel=True))

    async def _read(self, call: Any) -> None:
        reason = "link closed by the peer"
        try:
            while True:
                batch = await call.read()
                if batch is grpc.aio.EOF:
                    break
                for frame in batch.frames:
                    future = self._pending.get(frame.id)
                    if future is None or future.done():
                        continue  # a reply to a request given up on
                    if frame.code == 0:
                        future.set_result(frame.payload)
                    else:
                        code = _CODES.get(frame.code, grpc.StatusCode.UNKNOWN)
                        future.set_exception(CallError(code, frame.details))
        except grpc.aio.AioRpcError as exc:
            reason = f"link failed: {exc.code().name} {exc.details()}"
        except asyncio.CancelledError:
            reason = "link closed"
            raise
        except Exception as exc:  # a frame that does not parse, ...
            reason = f"link failed: {type(exc).__name__}: {exc}"
        finally:
            self._broken(call, reason)

    def _broken(self, call: Any, reason: str) -> None:
        """Fail every request still waiting on ``call``; the next request reopens the link."""
        if self._call is call:
            self._call = None
            self._outbox.close()
            call.cancel()
        for future in list(self._pending.values()):
            if not future.done():
                future.set_exception(CallError(grpc.StatusCode.UNAVAILABLE, reason))

    async def close(self) -> None:
        """End the stream: half-close it and wait (``CLOSE_WAIT`` at most) until the callee
        ends it, so gRPC reports every operation of the stream while this loop still runs
        (a report arriving after the loop closed is logged by the next loop that runs: "Event
        loop is closed"); then cancel whatever is left. Requests still waiting get their
        replies until then, or UNAVAILABLE."""
        self.closed = True
        call, self._call = self._call, None
        self._outbox.close()  # the writer sends what is queued, then ends
        tasks = [t for t in (self._reader, self._writer) if t is not None]
        try:
            if call is not None:
                with contextlib.suppress(Exception):  # the stream failed already, too slow
                    async with asyncio.timeout(CLOSE_WAIT):
                        if self._writer is not None:
                            await asyncio.wait({self._writer})
                        await call.done_writing()
                        await call.code()  # the callee's status: the stream is over
        finally:
            if call is not None:
                call.cancel()
            for task in tasks:
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _expire(future: asyncio.Future[bytes], timeout: float) -> None:
    if not future.done():
        future.set_exception(
            CallError(grpc.StatusCode.DEADLINE_EXCEEDED, f"no reply within {timeout:g} s")
        )


class LinkPool:
    """One :class:`LinkClient` per peer address, at most ``max_links`` (least recently used
    closed first, once its requests are done), so a node that talks to thousands of peers holds
    a bounded number of streams open."""

    def __init__(
        self, open_call: Callable[[str], Any], forget: Callable[[str], None], max_links: int = 256
    ) -> None:
        self._open_call = open_call
        self._forget = forget  # drop the address's channel: the next one resolves DNS again
        self.max_links = max_links
        self._links: OrderedDict[str, LinkClient] = OrderedDict()
        self._closing: dict[asyncio.Future[None], LinkClient] = {}  # closed once idle
        self._loop: asyncio.AbstractEventLoop | None = None

    def get(self, address: str) -> LinkClient:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            if self._loop is not None:
                if self._loop.is_running():
                    raise RuntimeError("a LinkPool is used from two event loops at once")
                # used again after its loop stopped (two asyncio.run calls): the old links'
                # streams and tasks belong to that loop; start afresh (the channel cache
                # drops the old loop's channels likewise: services.common.channel_cache)
                self._links.clear()
                self._closing.clear()
            self._loop = loop
        link = self._links.get(address)
        if link is not None:
            self._links.move_to_end(address)
            return link
        link = LinkClient(lambda: self._open_call(address))
        self._links[address] = link
        while len(self._links) > self.max_links:
            _, old = self._links.popitem(last=False)
            self._close_later(old)
        return link

    async def call(self, address: str, method: str, payload: bytes, timeout: float) -> bytes:
        try:
            return await self.get(address).call(method, payload, timeout)
        except CallError as exc:
            if exc.code == grpc.StatusCode.UNAVAILABLE:
                self.drop(address)
            raise

    def drop(self, address: str) -> None:
        link = self._links.pop(address, None)
        if link is not None:
            self._close_later(link)
        self._forget(address)

    def _close_later(self, link: LinkClient) -> None:
        async def close() -> None:
            for _ in range(100):  # let requests in flight finish (their deadlines bound this)
                if not link.pending:
                    break
                await asyncio.sleep(0.1)
            await link.close()

        task = asyncio.ensure_future(close())
        self._closing[task] = link
        task.add_done_callback(self._closed)

    def _closed(self, task: asyncio.Future[None]) -> None:
        self._closing.pop(task, None)

    async def close(self) -> None:
        """Close every link now, those waiting for their last requests too (their streams
        would otherwise keep their channels' delayed closes waiting)."""
        links = list(self._links.values())
        self._links.clear()
        closing, self._closing = self._closing, {}
        for task in closing:
            task.cancel()
        links += closing.values()
        await asyncio.gather(*(link.close() for link in links), return_exceptions=True)

"""The caller's end of peer links (:mod:`services.common.link`): one ``Link`` stream per peer.

:class:`LinkClient` sends each request as a frame with an id and matches the replies, which
come back in any order, by id; a request whose deadline passes fails with DEADLINE_EXCEEDED
and the callee is told to drop it. After a failure the stream is reopened, on a fresh channel
(:class:`LinkPool` drops the peer's), so DNS is resolved again. :class:`LinkPool` holds one
client per peer, a bounded number of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import grpc

from services.common.errors import CallError
from services.common.link_outbox import Outbox
from services.proto.link_pb2 import LinkBatch, LinkFrame

_CODES = {code.value[0]: code for code in grpc.StatusCode}
CLOSE_WAIT = 2.0  # seconds a closing link waits for its callee to end the stream


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
        self._outbox = Outbox()
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
            self._outbox = Outbox()
            self._reader = asyncio.ensure_future(self._read(self._call))
            self._writer = asyncio.ensure_future(self._write(self._call, self._outbox))
        return self._call

    async def _write(self, call: Any, outbox: Outbox) -> None:
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

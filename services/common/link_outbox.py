"""The frames waiting to leave one end of a peer link, batched (:mod:`services.common.link`).

Both ends write a link the same way: frames queue in an :class:`Outbox`, and the task writing
the stream takes whatever queued up while the previous message was being written, as one
``LinkBatch``. Under load many frames share one gRPC message; an idle link adds no delay (no
timer). The outbox also bounds what waits: its byte count is the backpressure the server reads
by (:meth:`Outbox.drained`).
"""

from __future__ import annotations

import asyncio
from collections import deque

from services.common.errors import StatusError
from services.proto.link_pb2 import LinkFrame

MAX_BATCH_FRAMES = 256  # frames a caller puts in one stream message (a server takes 4x)


def frame_bytes(frame: LinkFrame) -> int:
    """What a waiting frame counts for against an outbox's byte bound."""
    return len(frame.payload) + len(frame.details) + 16


class Outbox:
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
        self.size += frame_bytes(frame)
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
            cost = frame_bytes(frame)
            if taken and size + len(frame.payload) > self.max_bytes:
                break
            taken.append(frames.popleft())
            size += len(frame.payload)
            self.size -= cost
        if self._room is not None and not self._room.done():
            self._room.set_result(None)
        return taken

"""A bounded cache of ``grpc.aio`` channels, one per peer address, closed late once dropped.

Every dmoe client that talks to peers over and over (``DHTClient``, a DHT node's
``GrpcTransport``, the averager) keeps one channel per address (a new channel costs a TCP and,
with TLS, a handshake) and drops it after a connection failure, so the next attempt dials afresh
and resolves DNS again (a restarted container with a new IP is found; gRPC's own reconnect
back-off would keep the old channel looking dead). This module is that idea, once:

- :meth:`ChannelCache.get` returns the address's stub (whatever ``stub(channel)`` builds: a
  generated ``*Stub``, or the channel itself), dialling on first use; at most ``max_channels``
  are kept (None: no bound), the least recently used evicted first.
- A dropped channel (:meth:`forget`, or evicted) is closed once the calls still in flight on
  it (other requests to the same peer, a link stream) are done, ``grace`` seconds at most:
  they finish or meet their deadline instead of being cancelled by the drop. Trade-off: a
  dropped channel's sockets live up to ``grace`` longer.
- :meth:`close` closes every cached channel now (calls on them cancelled) and awaits the
  dropped ones' delayed closes (``grace`` at most: a grace cannot be cut short, as gRPC closes
  a channel once), so nothing is left for gRPC's poller once the loop ends. The owner closes
  its streams first (its ``LinkPool``), so those closes are quick.
- One event loop at a time: a ``grpc.aio`` channel belongs to the loop it was made on. Used
  from a new loop after the previous one stopped (two successive ``asyncio.run`` calls), the
  cache drops the old loop's channels (gRPC destroys a channel it collects) and dials afresh;
  used from a second loop while the first still runs, it raises ``RuntimeError``.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import grpc

from services.common.channels import aio_channel
from services.common.tls import TLSConfig

S = TypeVar("S")


def bare_channel(channel: grpc.aio.Channel) -> grpc.aio.Channel:
    """The ``stub`` of a cache that hands out the channels themselves."""
    return channel


class ChannelCache(Generic[S]):
    """Channels (and their stubs) per address: LRU-bounded, closed ``grace`` s after a drop."""

    def __init__(
        self,
        stub: Callable[[grpc.aio.Channel], S],
        options: Sequence[tuple[str, Any]],
        tls: TLSConfig | None = None,
        *,
        grace: float,
        max_channels: int | None = None,
    ) -> None:
        if max_channels is not None and max_channels < 1:
            raise ValueError("max_channels must be at least 1 (or None: no bound)")
        self._stub = stub
        self._options = list(options)
        self._tls = tls
        self.grace = grace  # read at each drop, so an owner may change it
        self.max_channels = max_channels
        self._held: OrderedDict[str, tuple[grpc.aio.Channel, S]] = OrderedDict()
        self._dropped: set[asyncio.Future[None]] = set()  # delayed closes still running
        self._loop: asyncio.AbstractEventLoop | None = None

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, address: object) -> bool:
        return address in self._held

    @property
    def closing(self) -> int:
        """Dropped channels whose delayed close has not finished yet."""
        return len(self._dropped)

    def get(self, address: str) -> S:
        """The stub for ``address`` (dialled now if none is cached)."""
        self._bind()
        held = self._held.get(address)
        if held is not None:
            self._held.move_to_end(address)
            return held[1]
        channel = aio_channel(address, self._options, self._tls)
        held = (channel, self._stub(channel))
        self._held[address] = held
        while self.max_channels is not None and len(self._held) > self.max_channels:
            _, (old, _) = self._held.popitem(last=False)
            self._close_later(old)
        return held[1]

    def forget(self, address: str) -> None:
        """Drop ``address``'s channel (the next :meth:`get` dials again); it closes once the
        calls still on it are done, ``grace`` s at most."""
        self._bind()
        held = self._held.pop(address, None)
        if held is not None:
            self._close_later(held[0])

    def _close_later(self, channel: grpc.aio.Channel) -> None:
        task = asyncio.ensure_future(channel.close(grace=self.grace))
        self._dropped.add(task)
        task.add_done_callback(self._dropped.discard)

    async def close(self) -> None:
        """Close every cached channel now (calls on them cancelled) and wait until the dropped
        ones are closed too (each within its grace)."""
        self._bind()
        channels = [channel for channel, _ in self._held.values()]
        self._held.clear()
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)
        while self._dropped:
            await asyncio.gather(*list(self._dropped), return_exceptions=True)

    def _bind(self) -> None:
        """Tie the cache to the running loop; on a new loop, forget the old loop's channels."""
        loop = asyncio.get_running_loop()
        if loop is self._loop:
            return
        old, self._loop = self._loop, loop
        if old is None:
            return
        if old.is_running():
            self._loop = old
            raise RuntimeError(
                "a ChannelCache (DHTClient, ...) is used from two event loops at once; "
                "use one per loop"
            )
        # the old loop stopped: its channels and their pending closes cannot run on this one
        # (their calls and futures belong to it); dropping them lets gRPC destroy each channel
        # when it is collected (grpc.aio.Channel.__del__)
        self._held.clear()
        self._dropped.clear()

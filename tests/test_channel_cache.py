"""ChannelCache (services/common/channel_cache.py) with real grpc.aio channels to a real server
on 127.0.0.1: one channel per address, LRU eviction, a dropped channel closed only once its
in-flight calls are done (or its grace is over), close() awaiting everything, and a new event
loop getting fresh channels.

The server is a blocking ``grpc.server`` in its own threads, so it outlives the several event
loops one test runs; ``Hold`` answers only once the test opens its gate."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from helpers import run_async, until

from services.common.channel_cache import ChannelCache, bare_channel
from services.common.channels import channel_options


class Server:
    def __init__(self) -> None:
        self.gates: dict[bytes, threading.Event] = {}
        self.arrived: set[bytes] = set()  # Hold calls the server is holding or held
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        handlers = {
            "Echo": grpc.unary_unary_rpc_method_handler(lambda request, context: request),
            "Hold": grpc.unary_unary_rpc_method_handler(self._hold),
        }
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("test.Cache", handlers),)
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{self.port}"
        self.server.start()

    def gate(self, name: bytes) -> threading.Event:
        return self.gates.setdefault(name, threading.Event())

    def _hold(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.arrived.add(request)
        self.gate(request).wait(60)  # bounds a hang only: tests open the gate
        return request

    def stop(self) -> None:
        for gate in list(self.gates.values()):
            gate.set()
        self.server.stop(0)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    running = Server()
    try:
        yield running
    finally:
        running.stop()


def cache(grace: float, max_channels: int | None = None) -> ChannelCache[grpc.aio.Channel]:
    return ChannelCache(bare_channel, channel_options(1 << 20), grace=grace,
                        max_channels=max_channels)  # fmt: skip


async def call(channel: grpc.aio.Channel, method: str, payload: bytes) -> bytes:
    return await channel.unary_unary(f"/test.Cache/{method}")(payload, timeout=60)


def is_closed(channel: grpc.aio.Channel) -> bool:
    """Destroyed, not merely refusing new calls (what a channel in its grace does)."""
    return channel.get_state() == grpc.ChannelConnectivity.SHUTDOWN


@run_async
async def test_one_channel_per_address_least_recently_used_evicted(server: Server) -> None:
    # three names of the same server: three addresses, three channels
    a, b, c = server.address, f"localhost:{server.port}", f"ipv4:127.0.0.1:{server.port}"
    channels = cache(grace=60, max_channels=2)
    try:
        first = channels.get(a)
        assert channels.get(a) is first and await call(first, "Echo", b"x") == b"x"
        second = channels.get(b)
        channels.get(a)  # a is now the most recently used: b goes first
        held = asyncio.ensure_future(call(second, "Hold", b"evicted"))
        await until(lambda: b"evicted" in server.arrived, 30, "the held call to arrive")
        channels.get(c)
        assert b not in channels and a in channels and c in channels and len(channels) == 2
        assert channels.closing == 1
        # the evicted channel's call in flight is not cancelled by the eviction ...
        assert not held.done() and not is_closed(second)
        server.gate(b"evicted").set()
        assert await asyncio.wait_for(held, 30) == b"evicted"
        # ... and the channel closes once it is done, long before its 60 s grace
        await until(lambda: channels.closing == 0, 30, "the evicted channel closed")
        assert is_closed(second)
        assert channels.get(b) is not second  # dialled afresh
    finally:
        await channels.close()


@run_async
async def test_forgotten_channel_closes_after_its_grace_even_with_a_call_stuck(
    server: Server,
) -> None:
    channels = cache(grace=0.2)
    try:
        channel = channels.get(server.address)
        stuck = asyncio.ensure_future(call(channel, "Hold", b"stuck"))
        await until(lambda: b"stuck" in server.arrived, 30, "the held call to arrive")
        channels.forget(server.address)
        assert server.address not in channels
        # the grace is over: the call still on it is cancelled and the channel closed
        await asyncio.wait({stuck}, timeout=30)
        assert stuck.cancelled()  # how grpc.aio ends a call cancelled by its channel's close
        await until(lambda: channels.closing == 0, 30, "the forgotten channel closed")
        assert is_closed(channel)
        channels.forget(server.address)  # nothing held: nothing happens
    finally:
        server.gate(b"stuck").set()
        await channels.close()


@run_async
async def test_close_closes_cached_channels_and_awaits_the_dropped_ones(server: Server) -> None:
    channels = cache(grace=60)
    kept = channels.get(server.address)
    dropped_address = f"localhost:{server.port}"
    dropped = channels.get(dropped_address)
    held = asyncio.ensure_future(call(dropped, "Hold", b"at-close"))
    await until(lambda: b"at-close" in server.arrived, 30, "the held call to arrive")
    channels.forget(dropped_address)
    assert channels.closing == 1
    closing = asyncio.ensure_future(channels.close())
    # the cached channel is closed at once; close() then waits for the dropped one, whose
    # call in flight may still finish (it cannot before the server answers: no race here)
    await until(lambda: is_closed(kept), 30, "the cached channel closed")
    assert not closing.done() and not held.done() and not is_closed(dropped)
    server.gate(b"at-close").set()
    assert await asyncio.wait_for(held, 30) == b"at-close"
    await asyncio.wait_for(closing, 30)  # long before the 60 s grace
    assert channels.closing == 0 and len(channels) == 0
    assert is_closed(dropped)


def test_a_new_event_loop_gets_fresh_channels(server: Server) -> None:
    channels = cache(grace=5)

    async def echo(payload: bytes) -> grpc.aio.Channel:
        channel = channels.get(server.address)
        assert await call(channel, "Echo", payload) == payload
        return channel

    first = asyncio.run(echo(b"one"))
    # the first loop is closed; its channel cannot serve the second one
    second = asyncio.run(echo(b"two"))
    assert second is not first
    asyncio.run(channels.close())
    assert len(channels) == 0


def test_two_loops_running_at_once_is_a_clear_error(server: Server) -> None:
    channels = cache(grace=5)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:

        async def dial() -> None:
            channels.get(server.address)

        asyncio.run_coroutine_threadsafe(dial(), loop).result(30)

        async def dial_here() -> None:
            with pytest.raises(RuntimeError, match="two event loops"):
                channels.get(server.address)

        asyncio.run(dial_here())
        asyncio.run_coroutine_threadsafe(channels.close(), loop).result(30)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


def test_max_channels_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_channels"):
        cache(grace=1, max_channels=0)

"""Peer links over real gRPC: many requests on one stream, answered in any order, each with
its own status, deadline and admission; the stream survives bad requests and reopens after
the peer comes back."""

import asyncio
import threading
from typing import Any

import grpc
import pytest
from helpers import run_async

from services.common.channel_cache import ChannelCache, bare_channel
from services.common.errors import CallError, StatusError
from services.common.limits import ServerLimits
from services.common.link import LinkClient, LinkPool, LinkServer, link_method_handler
from services.common.server import start_server
from services.proto.link_pb2 import LinkBatch

SERVICE = "test.Echo"


def echo_server(cancelled: list[str]) -> LinkServer:
    async def echo(payload: bytes, peer: str) -> bytes:
        delay = payload.count(b"z") * 0.05  # more z: later answer
        await asyncio.sleep(delay)
        return payload.upper()

    async def fail(payload: bytes, peer: str) -> bytes:
        raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, f"bad: {payload!r}")

    async def slow(payload: bytes, peer: str) -> bytes:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(payload.decode())
            raise
        return b""

    async def broken(payload: bytes, peer: str) -> bytes:
        raise RuntimeError("a bug")

    return LinkServer({"Echo": echo, "Fail": fail, "Slow": slow, "Broken": broken})


async def serve(link: LinkServer, port: int = 0, limits: ServerLimits | None = None):
    def register(server: grpc.aio.Server) -> list[str]:
        handler = grpc.stream_stream_rpc_method_handler(
            link.serve,
            request_deserializer=LinkBatch.FromString,
            response_serializer=LinkBatch.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {"Link": handler}),)
        )
        return [SERVICE]

    return await start_server(
        "test", register, port=port, metrics_port=None, links=[link], limits=limits
    )


def pool() -> tuple[LinkPool, dict[str, grpc.aio.Channel]]:
    channels: dict[str, grpc.aio.Channel] = {}

    def open_call(address: str):
        if address not in channels:
            channels[address] = grpc.aio.insecure_channel(address)
        return channels[address].stream_stream(
            f"/{SERVICE}/Link",
            request_serializer=LinkBatch.SerializeToString,
            response_deserializer=LinkBatch.FromString,
        )()

    def forget(address: str) -> None:
        channels.pop(address, None)

    return LinkPool(open_call, forget, max_links=2), channels


@run_async
async def test_many_requests_one_stream_any_order_own_status_and_deadline() -> None:
    cancelled: list[str] = []
    server = await serve(echo_server(cancelled))
    address = f"127.0.0.1:{server.port}"
    links, _channels = pool()
    try:
        # answered in any order (the first asked is the last answered), matched by id
        words = [b"a" + b"z" * (5 - i) for i in range(6)]
        replies = await asyncio.gather(*(links.call(address, "Echo", w, 5) for w in words))
        assert replies == [w.upper() for w in words]
        # a request that fails, an unknown method and a bug each fail alone
        results = await asyncio.gather(
            links.call(address, "Fail", b"x", 5),
            links.call(address, "Nope", b"x", 5),
            links.call(address, "Broken", b"x", 5),
            links.call(address, "Echo", b"ok", 5),
            return_exceptions=True,
        )
        assert [getattr(r, "code", r) for r in results[:3]] == [
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.UNIMPLEMENTED,
            grpc.StatusCode.INTERNAL,
        ]
        assert "bad: b'x'" in results[0].message and results[3] == b"OK"
        # a deadline: the caller gets DEADLINE_EXCEEDED, the callee drops the request
        with pytest.raises(CallError) as err:
            await links.call(address, "Slow", b"late", 0.2)
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        for _ in range(50):
            if cancelled:
                break
            await asyncio.sleep(0.05)
        assert cancelled == ["late"]
        assert await links.call(address, "Echo", b"still", 5) == b"STILL"
        # per request metrics, by method and code
        sample = server.registry.get_sample_value
        assert sample("dmoe_test_rpc_requests_total", {"method": "Echo", "code": "OK"}) == 8
        labels = {"method": "Fail", "code": "INVALID_ARGUMENT"}
        assert sample("dmoe_test_rpc_requests_total", labels) == 1
    finally:
        await links.close()
        await server.stop(0)


@run_async
async def test_requests_are_admitted_one_by_one_and_the_link_reopens() -> None:
    limits = ServerLimits(max_peer_rps=1, max_peer_burst=3)
    server = await serve(echo_server([]), limits=limits)
    port = server.port
    address = f"127.0.0.1:{port}"
    links, channels = pool()
    try:
        results = await asyncio.gather(
            *(links.call(address, "Echo", b"x", 5) for _ in range(6)), return_exceptions=True
        )
        codes = [getattr(r, "code", "ok") for r in results]
        # the stream is one call; its requests spend the caller's tokens one by one
        assert codes.count("ok") >= 2
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
        assert server.rejections.count("peer_rate") >= 1
        await server.stop(0)
        with pytest.raises(CallError) as err:
            await links.call(address, "Echo", b"x", 2)
        assert err.value.code in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        )
        server = await serve(echo_server([]), port=port)  # back on the same port
        for _ in range(50):  # the next request reopens the stream on a fresh channel
            try:
                assert await links.call(address, "Echo", b"back", 2) == b"BACK"
                break
            except CallError:
                await asyncio.sleep(0.1)
        else:
            raise AssertionError("the link did not reopen")
        # at most max_links links stay open
        for i in range(3):
            links.get(f"127.0.0.1:{port + 1 + i}")
        assert len(links._links) == 2
    finally:
        await links.close()
        for channel in channels.values():
            await channel.close()
        await server.stop(0)


@run_async
async def test_close_ends_the_stream_with_the_callee_and_bounds_a_callee_that_does_not() -> None:
    # an honest callee: close() half-closes the stream and returns once the callee ended it
    # (the stream's status is the callee's OK, not a local cancellation)
    server = await serve(echo_server([]))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    calls: list[Any] = []

    def open_call() -> Any:
        calls.append(
            channel.stream_stream(
                f"/{SERVICE}/Link",
                request_serializer=LinkBatch.SerializeToString,
                response_deserializer=LinkBatch.FromString,
            )()
        )
        return calls[-1]

    link = LinkClient(open_call)
    try:
        assert await link.call("Echo", b"x", 5) == b"X"
        await asyncio.wait_for(link.close(), 30)
        assert await calls[0].code() == grpc.StatusCode.OK
    finally:
        await channel.close()
        await server.stop(0)

    # a callee that never ends the stream: close() gives up after CLOSE_WAIT and cancels it
    ended = asyncio.Event()

    async def stuck(batches: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            async for _ in batches:
                pass
            await asyncio.Event().wait()
        finally:
            ended.set()
        yield LinkBatch()  # never reached: makes this a response stream

    def register(server: grpc.aio.Server) -> list[str]:
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {"Link": link_method_handler(stuck)}),)
        )
        return [SERVICE]

    server = await start_server("test", register, port=0, metrics_port=None)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    calls.clear()
    link = LinkClient(open_call)
    try:
        with pytest.raises(CallError) as err:  # the stream opens; the request is never answered
            await link.call("Echo", b"x", 0.5)
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        await asyncio.wait_for(link.close(), 30)
        assert calls[0].cancelled()
        await asyncio.wait_for(ended.wait(), 30)  # the callee saw the stream cancelled
    finally:
        await channel.close()
        await server.stop(0)


def test_a_pool_used_on_a_new_event_loop_starts_afresh() -> None:
    # the callee lives on a loop of its own (a thread), so it outlives the caller's loops
    server_loop = asyncio.new_event_loop()
    thread = threading.Thread(target=server_loop.run_forever, daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(serve(echo_server([])), server_loop).result(60)
    address = f"127.0.0.1:{server.port}"
    channels = ChannelCache(bare_channel, [], grace=1.0)

    def open_call(address: str) -> Any:
        return channels.get(address).stream_stream(
            f"/{SERVICE}/Link",
            request_serializer=LinkBatch.SerializeToString,
            response_deserializer=LinkBatch.FromString,
        )()

    links = LinkPool(open_call, channels.forget)
    try:
        # a first loop stopped without closing anything: the link's stream and tasks stay
        # with it (before, the pool handed that link to the next loop, where no task ever sent
        # the request: DEADLINE_EXCEEDED)
        first = asyncio.new_event_loop()
        assert first.run_until_complete(links.call(address, "Echo", b"one", 10)) == b"ONE"

        async def twice() -> bytes:
            reply = await links.call(address, "Echo", b"two", 10)
            await links.close()
            await channels.close()
            return reply

        assert asyncio.run(twice()) == b"TWO"
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), server_loop).result(60)
        server_loop.call_soon_threadsafe(server_loop.stop)
        thread.join(60)
        server_loop.close()

"""The common server's admission limits over real gRPC on 127.0.0.1: each limit refuses with
RESOURCE_EXHAUSTED and counts its reason, and the server serves again once the burst or the
load is over. Plus the peer key and the bounded peer table, on the real classes."""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from helpers import Proc, free_port, run_async

from services.common.limits import Admission, Peer, Refused, ServerLimits, peer_key
from services.common.server import RunningServer, start_server

SERVICE = "dmoe.test.Limits"
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def _identity(data: bytes) -> bytes:
    return data


class _Held:
    """Handlers that stay in flight until released: ``Hold`` (unary) and ``Stream``."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.entered = 0
        self.changed = asyncio.Event()

    async def _enter(self) -> None:
        self.entered += 1
        self.changed.set()
        await self.release.wait()

    async def wait_entered(self, count: int) -> None:
        while self.entered < count:
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), 30)

    def register(self, server: grpc.aio.Server) -> list[str]:
        async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return request[:16]

        async def hold(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            await self._enter()
            return b"done"

        async def stream(
            requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[bytes]:
            async for chunk in requests:
                yield chunk[:16]

        raw = {"request_deserializer": _identity, "response_serializer": _identity}
        handler = grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Echo": grpc.unary_unary_rpc_method_handler(echo, **raw),
                "Hold": grpc.unary_unary_rpc_method_handler(hold, **raw),
                "Stream": grpc.stream_stream_rpc_method_handler(stream, **raw),
            },
        )
        server.add_generic_rpc_handlers((handler,))
        return [SERVICE]


def _rejected(running: RunningServer, reason: str) -> float:
    value = running.registry.get_sample_value("dmoe_test_rejected_total", {"reason": reason})
    return value or 0.0


async def _refused(call: Awaitable[object], *words: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == EXHAUSTED, err.value.details()
    for word in words:
        assert word in err.value.details(), err.value.details()


async def _until_served(call: Callable[[], Awaitable[object]], timeout: float = 30.0) -> None:
    """Retry ``call`` until it succeeds: the limit let go (no timing target, just a bound)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            await call()
            return
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == EXHAUSTED, exc.details()
            assert asyncio.get_running_loop().time() < deadline, "still refused"
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def _serving(limits: ServerLimits, host: str = "127.0.0.1") -> AsyncIterator[tuple]:
    held = _Held()
    running = await start_server("test", held.register, host=host, metrics_port=None,
                                 limits=limits)  # fmt: skip
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        yield running, held, channel
    finally:
        held.release.set()
        await channel.close()
        await running.stop(0.5)


def _stubs(channel: grpc.aio.Channel) -> tuple:
    raw = {"request_serializer": _identity, "response_deserializer": _identity}
    return (
        channel.unary_unary(f"/{SERVICE}/Echo", **raw),
        channel.unary_unary(f"/{SERVICE}/Hold", **raw),
        channel.stream_stream(f"/{SERVICE}/Stream", **raw),
    )


@run_async
async def test_peer_rate_refuses_past_the_burst_then_serves_again() -> None:
    limits = ServerLimits(max_peer_rps=2.0, max_peer_burst=3)
    async with _serving(limits) as (running, _held, channel):
        echo, _, _ = _stubs(channel)
        served = 0
        with pytest.raises(grpc.aio.AioRpcError) as err:
            for _ in range(50):  # 3 tokens, 2 more a second: one of these is refused
                await echo(b"x")
                served += 1
        assert err.value.code() == EXHAUSTED
        assert "--max-peer-rps" in err.value.details()
        assert served >= 3  # the whole burst was served first
        assert _rejected(running, "peer_rate") == 1
        await _until_served(lambda: echo(b"x"))
        assert running.admission.in_flight == 0


@run_async
async def test_concurrency_limit_refuses_then_serves_when_calls_finish() -> None:
    async with _serving(ServerLimits(max_concurrent_rpcs=2)) as (running, held, channel):
        echo, hold, _ = _stubs(channel)
        calls = [asyncio.ensure_future(hold(b"h")) for _ in range(2)]
        await held.wait_entered(2)
        await _refused(echo(b"x"), "server busy", "--max-concurrent-rpcs")
        assert _rejected(running, "concurrency") == 1
        held.release.set()
        assert await asyncio.gather(*calls) == [b"done", b"done"]
        assert await echo(b"x") == b"x"


@run_async
async def test_peer_streams_limit_refuses_a_second_stream_until_the_first_ends() -> None:
    async with _serving(ServerLimits(max_peer_streams=1)) as (running, _held, channel):
        _, _, stream = _stubs(channel)
        first = stream()
        await first.write(b"one")
        assert await first.read() == b"one"  # admitted and open
        second = stream()
        await _refused(second.read(), "--max-peer-streams")
        assert _rejected(running, "peer_streams") == 1
        await first.done_writing()
        assert await first.read() == grpc.aio.EOF

        async def another() -> None:
            call = stream()
            await call.write(b"two")
            await call.done_writing()
            assert [r async for r in call] == [b"two"]

        await _until_served(another)


@run_async
async def test_peer_bytes_limit_counts_requests_in_flight_and_stream_chunks() -> None:
    limits = ServerLimits(max_peer_bytes_in_flight=1000)
    async with _serving(limits) as (running, held, channel):
        echo, hold, stream = _stubs(channel)
        holding = asyncio.ensure_future(hold(b"h" * 600))
        await held.wait_entered(1)
        await _refused(echo(b"e" * 600), "--max-peer-bytes-in-flight")
        assert await echo(b"e" * 300) == b"e" * 16  # 600 + 300 fit
        assert _rejected(running, "peer_bytes") == 1
        # a stream's chunks add up while it lives: 600 held + 3 x 150 > 1000
        call = stream()
        for _ in range(2):
            await call.write(b"s" * 150)
            assert await call.read() == b"s" * 16
        await call.write(b"s" * 150)
        await _refused(call.read(), "--max-peer-bytes-in-flight")
        assert _rejected(running, "peer_bytes") == 2
        held.release.set()
        assert await holding == b"done"
        assert await echo(b"e" * 900) == b"e" * 16
        assert running.admission.in_flight == 0


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback here")
@run_async
async def test_one_peers_limit_leaves_another_address_alone() -> None:
    limits = ServerLimits(max_peer_rps=0.01, max_peer_burst=2)
    async with _serving(limits, host="::") as (running, _held, channel):
        echo, _, _ = _stubs(channel)
        for _ in range(2):
            await echo(b"x")
        await _refused(echo(b"x"), "127.0.0.1")
        async with grpc.aio.insecure_channel(f"[::1]:{running.port}") as other:
            assert await _stubs(other)[0](b"y") == b"y"


def test_peer_key_is_the_ip_address() -> None:
    assert peer_key("ipv4:10.1.2.3:5000") == "10.1.2.3"
    assert peer_key("ipv6:%5B::1%5D:5000") == "::1"
    assert peer_key("ipv6:[2001:db8::0001]:1") == "2001:db8::1"
    assert peer_key("ipv6:%5B::ffff:10.0.0.7%5D:9") == "10.0.0.7"
    assert peer_key("ipv6:%5Bfe80::1%25eth0%5D:9") == "fe80::1"
    assert peer_key("unix:/tmp/sock") == "unix:/tmp/sock"


def test_peer_table_stays_bounded_and_keeps_callers_in_flight() -> None:
    admission = Admission(ServerLimits(max_peers=100, max_peer_rps=1.0, max_peer_burst=1))
    busy = admission.admit("ipv4:192.0.2.1:1", 10, True)
    assert isinstance(busy, Peer)
    for i in range(10_000):
        state = admission.admit(f"ipv4:10.0.{i // 256}.{i % 256}:{i}", 1, False)
        assert isinstance(state, Peer)
        admission.release(state, 1, False)
        assert admission.peers() <= 126
    assert isinstance(admission.admit("ipv4:192.0.2.1:2", 0, False), Refused)  # still limited
    admission.release(busy, 10, True)
    assert admission.in_flight == 0


def test_limits_must_not_be_negative() -> None:
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError):
            ServerLimits(max_peer_rps=bad)
    assert ServerLimits(max_peer_rps=50, max_peer_burst=0).burst == 50
    unlimited = Admission(ServerLimits.unlimited())
    for _ in range(1000):
        assert isinstance(unlimited.admit("ipv4:127.0.0.1:1", 1 << 40, True), Peer)


def test_flags_and_env_reach_the_servers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from services.expert.__main__ import build_parser, config_from_args

    monkeypatch.setenv("DMOE_MAX_PEER_RPS", "7.5")
    args = build_parser().parse_args(["--no-dht", "--max-peer-streams", "3"])
    limits = config_from_args(args).limits
    assert (limits.max_peer_streams, limits.max_peer_rps) == (3, 7.5)
    assert limits.max_concurrent_rpcs == ServerLimits().max_concurrent_rpcs
    # a real DHT process: a request over its per-peer byte budget is refused before parsing
    dht = Proc("dht", ["services.dht", "--metrics-port", "-1", "--max-peer-bytes-in-flight", "64"],
               tmp_path, free_port())  # fmt: skip
    try:
        dht.wait_healthy()
        with grpc.insecure_channel(dht.address) as channel:
            with pytest.raises(grpc.RpcError) as err:
                channel.unary_unary("/dmoe.DHT/Get")(b"x" * 100, timeout=10)
            assert err.value.code() == EXHAUSTED
            assert "--max-peer-bytes-in-flight" in err.value.details()
    finally:
        dht.stop()

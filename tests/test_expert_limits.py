"""Memory bounds over real gRPC, each with a clear status and a counted reason: the size of one
streamed request (refused before anything is allocated for it), the bytes all streams being
received may hold together, the bytes queued per expert and method, and every free dimension."""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import AsyncIterator

import grpc
import pytest
import torch
from helpers import metric, run_async, serve_expert, until

from services.common.errors import CallError
from services.common.tensor_codec import encode
from services.proto import expert_pb2

MIB = 1024 * 1024
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


async def _until(condition, what: str) -> None:  # type: ignore[no-untyped-def]
    await until(condition, 60, what, every=0.005)


async def _expect(call, code: grpc.StatusCode, *fragments: str) -> None:  # type: ignore[no-untyped-def]
    """An ExpertClient call fails with ``code`` and a message holding ``fragments``."""
    with pytest.raises(CallError) as err:
        await call
    assert err.value.code == code, err.value.message
    for fragment in fragments:
        assert fragment in err.value.message, err.value.message


async def _expect_raw(call, code: grpc.StatusCode, *fragments: str) -> None:  # type: ignore[no-untyped-def]
    """The same for a raw gRPC call (the server's answer, as grpc raises it)."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == code, err.value.details()
    for fragment in fragments:
        assert fragment in err.value.details(), err.value.details()


class HeldStream:
    """A raw streamed call that sends ``first`` and then waits until ``finish`` sends ``rest``."""

    def __init__(self, channel: grpc.aio.Channel, method: str = "ForwardStream") -> None:
        self._call_factory = channel.stream_stream(f"/dmoe.Expert/{method}")
        self._rest: asyncio.Queue[list[bytes]] = asyncio.Queue()

    def start(self, first: expert_pb2.Chunk) -> grpc.aio.StreamStreamCall:
        async def chunks() -> AsyncIterator[bytes]:
            yield first.SerializeToString()
            for item in await self._rest.get():
                yield item

        return self._call_factory(chunks(), timeout=60)

    def finish(self, *rest: expert_pb2.Chunk) -> None:
        self._rest.put_nowait([c.SerializeToString() for c in rest])


async def _reply(call: grpc.aio.StreamStreamCall) -> expert_pb2.ExpertResponse:
    parts = [expert_pb2.Chunk.FromString(c).data async for c in call]
    return expert_pb2.ExpertResponse.FromString(b"".join(parts))


@run_async
async def test_streamed_request_size_is_bounded_before_allocation() -> None:
    """Default limit 64 MiB: a larger announced total is refused on the first chunk; a stream
    within the limit holds only what has arrived, not what it announced."""

    async with serve_expert(experts=["nop.0"], expert_cls="nop", hidden_dim=8) as (server, _):
        assert server.config.max_stream_bytes == 64 * MIB
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            over = HeldStream(channel)
            call = over.start(expert_pb2.Chunk(data=b"x" * 1024, total_bytes=64 * MIB + 1))
            await _expect_raw(_reply(call), INVALID, "exceeds", "--max-stream-bytes")
            over.finish()

            held = HeldStream(channel)
            call = held.start(expert_pb2.Chunk(data=b"x" * 1024, total_bytes=64 * MIB))
            await _until(
                lambda: metric(server, "dmoe_expert_stream_receive_bytes") == 1024,
                "the first chunk is received",
            )
            _, peak = tracemalloc.get_traced_memory()
            assert peak - base < 8 * MIB, f"{(peak - base) / MIB:.1f} MiB allocated"
            held.finish()  # ends short of the announced total
            await _expect_raw(_reply(call), INVALID, "stream ended")
        finally:
            tracemalloc.stop()
            await channel.close()
        await _until(
            lambda: metric(server, "dmoe_expert_stream_receive_bytes") == 0,
            "the stream's bytes are released",
        )
        assert metric(server, "dmoe_expert_rejected_total", reason="request_too_large") == 1
        assert metric(server, "dmoe_expert_rejected_total", reason="malformed") == 1


@run_async
async def test_bytes_of_streams_being_received_are_bounded() -> None:
    """Two streams of 900 KiB under a 1.5 MiB receive budget: the second one is refused
    (RESOURCE_EXHAUSTED) while the first is held; the first still completes correctly."""

    async with serve_expert(
        experts=["nop.0"],
        expert_cls="nop",
        hidden_dim=256,
        max_stream_bytes=MIB,
        max_receive_bytes=3 * MIB // 2,
    ) as (server, _):
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        try:
            x = torch.randn(900, 256)  # 900 KiB
            body = expert_pb2.ExpertRequest(uid="nop.0", tensors=[encode(x)]).SerializeToString()
            cut = 800 * 1024
            first = HeldStream(channel)
            call = first.start(expert_pb2.Chunk(data=body[:cut], total_bytes=len(body)))
            await _until(
                lambda: metric(server, "dmoe_expert_stream_receive_bytes") == cut,
                "the first stream's chunk is held",
            )
            second = HeldStream(channel)
            refused = second.start(expert_pb2.Chunk(data=body[:cut], total_bytes=len(body)))
            await _expect_raw(_reply(refused), EXHAUSTED, "--max-receive-bytes")
            second.finish()
            first.finish(expert_pb2.Chunk(data=body[cut:]))
            reply = await _reply(call)
            out = torch.frombuffer(bytearray(reply.tensors[0].buffer), dtype=torch.float32)
            assert torch.equal(out.view(900, 256), x)
        finally:
            await channel.close()
        assert metric(server, "dmoe_expert_rejected_total", reason="receive_budget") == 1


@run_async
async def test_queue_is_bounded_in_bytes() -> None:
    """While the expert computes (its lock held here), requests queue; past --max-queue-bytes
    the next one is RESOURCE_EXHAUSTED although the sample bound is far away; the queued ones
    still complete once the expert is free."""

    x = torch.randn(64, 256)  # 64 KiB
    async with serve_expert(
        experts=["nop.0"],
        expert_cls="nop",
        hidden_dim=256,
        max_queue_samples=100_000,
        max_queue_bytes=150 * 1024,
    ) as (server, client):
        backend = server.backends["nop.0"]
        backend.lock.acquire()  # the first batch waits for it: later requests queue up
        try:
            labels = {"expert": "nop.0", "method": "forward"}
            tasks = [asyncio.create_task(client.forward("nop.0", [x], timeout=60))]
            await _until(  # observed when a batch is taken from its pool
                lambda: (
                    metric(server, "dmoe_expert_queue_wait_seconds_count", method="forward") == 1
                ),
                "the first batch is taken",
            )
            for queued in (1, 2):
                tasks.append(asyncio.create_task(client.forward("nop.0", [x], timeout=60)))
                await _until(
                    lambda q=queued: (
                        metric(server, "dmoe_expert_queued_bytes", **labels) == q * x.numel() * 4
                    ),
                    f"{queued} requests queued",
                )
            await _expect(client.forward("nop.0", [x]), EXHAUSTED, "--max-queue-bytes")
        finally:
            backend.lock.release()
        for (out,) in await asyncio.gather(*tasks):
            assert torch.equal(out, x)
        assert metric(server, "dmoe_expert_rejected_total", reason="queue_full") == 1


@run_async
async def test_free_dimensions_are_bounded() -> None:
    """A transformer's sequence length (a free dimension) is at most --max-free-dim and at
    least 1, checked on metadata before the request is queued."""

    async with serve_expert(
        experts=["tr.0"], expert_cls="transformer", hidden_dim=8, max_free_dim=6
    ) as (server, client):

        def seq(n: int) -> list[torch.Tensor]:  # the sequence and its attention mask
            return [torch.randn(2, n, 8), torch.ones(2, n, dtype=torch.bool)]

        (out,) = await client.forward("tr.0", seq(6))
        assert out.shape == (2, 6, 8)
        await _expect(
            client.forward("tr.0", seq(7)),
            INVALID,
            "inputs[0]",
            "7",
            "--max-free-dim",
        )
        await _expect(
            client.backward("tr.0", seq(6), [torch.randn(2, 9, 8)]),
            INVALID,
            "grad_outputs[0]",
            "--max-free-dim",
        )
        await _expect(client.forward("tr.0", seq(0)), INVALID, "at least 1")
        assert server.backends["tr.0"].steps == 0
        assert metric(server, "dmoe_expert_rejected_total", reason="free_dim_too_large") == 2
        families = [m for m in server.registry.collect() if m.name == "dmoe_expert_rejected"]
        assert len(families) == 1

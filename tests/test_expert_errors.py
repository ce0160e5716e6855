"""Every bad input over real gRPC gets a clear status; the weights stay untouched and the server
keeps serving correct results. Also overload, failure injection and simulated latency."""

from __future__ import annotations

import asyncio
import copy
import time

import grpc
import pytest
import torch
from helpers import run_async, until

from services.common.errors import CallError
from services.common.tensor_codec import encode
from services.expert.client import ExpertClient
from services.expert.server import ExpertConfig, ExpertServer
from services.proto import expert_pb2, tensor_pb2

H = 16
INVALID = grpc.StatusCode.INVALID_ARGUMENT


async def _expect(call, code: grpc.StatusCode, *fragments: str) -> None:
    with pytest.raises(CallError) as err:
        await call
    assert err.value.code == code, err.value.message
    for fragment in fragments:
        assert fragment in err.value.message, err.value.message


async def _expect_raw(call, code: grpc.StatusCode, *fragments: str) -> None:
    """The same for a raw gRPC call (the server's answer, as grpc raises it)."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == code, err.value.details()
    for fragment in fragments:
        assert fragment in err.value.details(), err.value.details()


def _request(*tensors: tensor_pb2.Tensor, uid: str = "ffn.0", **kw: object) -> bytes:
    return expert_pb2.ExpertRequest(uid=uid, tensors=tensors, **kw).SerializeToString()  # type: ignore[arg-type]


@run_async
async def test_bad_inputs_get_clear_errors_and_change_nothing() -> None:
    config = ExpertConfig(experts=["ffn.0"], hidden_dim=H, seed=5, max_batch_size=32,
                          max_stream_bytes=1 << 20)  # fmt: skip
    server = await ExpertServer(config).start()
    client = ExpertClient(f"127.0.0.1:{server.port}")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    raw_forward = channel.unary_unary("/dmoe.Expert/Forward")
    raw_stream = channel.stream_stream("/dmoe.Expert/ForwardStream")
    backend = server.backends["ffn.0"]
    before = copy.deepcopy(backend.module.state_dict())
    x, g = torch.randn(4, H), torch.randn(4, H)
    nan = x.clone()
    nan[1, 2] = float("nan")
    inf = g.clone()
    inf[0, 0] = float("inf")
    try:
        await _expect(client.forward("ffn.9", [x]), grpc.StatusCode.NOT_FOUND, "ffn.9")
        await _expect(client.info("nope.1"), grpc.StatusCode.NOT_FOUND, "nope.1")
        await _expect(client.backward("ffn.9", [x], [g]), grpc.StatusCode.NOT_FOUND)
        await _expect(
            client.forward("ffn.0", [torch.randn(4, H + 1)]),
            INVALID,
            "expected shape [batch, 16]",
        )
        await _expect(
            client.forward("ffn.0", [x.double()]), INVALID, "expected dtype float32", "float64"
        )
        await _expect(client.forward("ffn.0", [x[0]]), INVALID, "expected rank 2")
        await _expect(client.forward("ffn.0", [x.unsqueeze(0)]), INVALID, "expected rank 2")
        await _expect(client.forward("ffn.0", [x, x]), INVALID, "takes 1 inputs", "got 2")
        await _expect(client.forward("ffn.0", []), INVALID, "got 0")
        await _expect(client.forward("ffn.0", [nan]), INVALID, "inputs[0]", "NaN")
        await _expect(client.forward("ffn.0", [torch.empty(0, H)]), INVALID, "empty batch")
        await _expect(client.forward("ffn.0", [torch.randn(33, H)]), INVALID, "at most 32", "split")
        await _expect(client.backward("ffn.0", [x], []), INVALID, "1 grad_outputs")
        await _expect(
            client.backward("ffn.0", [x], [torch.randn(4, 3)]), INVALID, "grad_outputs[0]"
        )
        await _expect(
            client.backward("ffn.0", [x], [torch.randn(5, H)]), INVALID, "batch dimension"
        )
        await _expect(client.backward("ffn.0", [x], [inf]), INVALID, "grad_outputs[0]", "NaN")
        await _expect(client.backward("ffn.0", [nan], [g]), INVALID, "inputs[0]", "NaN")
        # malformed messages, sent raw
        short = encode(x)
        short.buffer = short.buffer[:-4]
        await _expect_raw(raw_forward(_request(short)), INVALID, "buffer has")
        bad_dtype = encode(x)
        bad_dtype.dtype = 0
        await _expect_raw(raw_forward(_request(bad_dtype)), INVALID, "dtype")
        bad_comp = encode(x)
        bad_comp.compression = 42
        await _expect_raw(raw_forward(_request(bad_comp)), INVALID, "compression")
        await _expect_raw(
            raw_forward(_request(encode(x), reply_compression=9)), INVALID, "reply_compression"
        )
        await _expect_raw(raw_forward(b"\xff\xfe not a protobuf"), INVALID, "malformed")

        async def chunks(*items: expert_pb2.Chunk):
            for item in items:
                yield item.SerializeToString()

        async def drain(call) -> None:
            async for _ in call:
                pass

        body = _request(encode(x))
        truncated = expert_pb2.Chunk(data=body[:10], total_bytes=len(body))
        await _expect_raw(drain(raw_stream(chunks(truncated))), INVALID, "stream ended")
        huge = expert_pb2.Chunk(data=b"x", total_bytes=1 << 30)
        await _expect_raw(drain(raw_stream(chunks(huge))), INVALID, "exceeds the limit")
        garbage = expert_pb2.Chunk(data=b"\xff" * 8, total_bytes=8)
        await _expect_raw(drain(raw_stream(chunks(garbage))), INVALID, "malformed")

        # nothing reached the weights or the optimizer
        after = backend.module.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert backend.steps == 0
        assert (await client.info("ffn.0")).optimizer_steps == 0

        # and the server still answers correctly
        local = copy.deepcopy(backend.module)
        (out,) = await client.forward("ffn.0", [x])
        with torch.no_grad():
            torch.testing.assert_close(out, local(x), atol=1e-5, rtol=0)
        (grad,) = await client.backward("ffn.0", [x], [g])
        leaf = x.clone().requires_grad_(True)
        local(leaf).backward(g)
        torch.testing.assert_close(grad, leaf.grad, atol=1e-5, rtol=0)
        assert backend.steps == 1
        invalid = server.registry.get_sample_value(
            "dmoe_expert_requests_total",
            {"expert": "ffn.0", "method": "forward", "code": "INVALID_ARGUMENT"},
        )
        assert invalid is not None and invalid >= 10
    finally:
        await channel.close()
        await client.close()
        await server.stop(0.5)


@run_async
async def test_every_client_path_raises_the_same_call_error() -> None:
    """A refusal reads the same whichever path ExpertClient took: over the link, as a unary
    call or as a stream, the caller gets a CallError with the server's code and message
    (never the raw AioRpcError of the unary and streamed calls)."""
    server = await ExpertServer(ExpertConfig(experts=["ffn.0"], hidden_dim=H, seed=5)).start()
    address = f"127.0.0.1:{server.port}"
    clients = {
        "link": ExpertClient(address),
        "unary": ExpertClient(address, link_max_bytes=0),
        "stream": ExpertClient(
            address, link_max_bytes=0, max_message_bytes=(64 << 10) + 1, stream_chunk_bytes=256
        ),
    }
    seen: dict[str, tuple[grpc.StatusCode, str]] = {}
    try:
        for path, client in clients.items():
            with pytest.raises(CallError) as err:
                await client.forward("ffn.9", [torch.randn(4, H)], timeout=60)
            seen[path] = (err.value.code, err.value.message)
        with pytest.raises(CallError) as err:
            await clients["unary"].info("nope.1", timeout=60)
        assert err.value.code == grpc.StatusCode.NOT_FOUND and "nope.1" in err.value.message
        assert str(err.value).startswith("NOT_FOUND: ")
    finally:
        for client in clients.values():
            await client.close()
        await server.stop(0.5)
    assert seen["link"][0] == grpc.StatusCode.NOT_FOUND and "ffn.9" in seen["link"][1], seen
    assert seen["unary"] == seen["link"] and seen["stream"] == seen["link"], seen


@run_async
async def test_overload_is_resource_exhausted_and_queued_requests_still_complete() -> None:
    # batches wait 1.5 s to fill; the queue holds at most 64 samples
    config = ExpertConfig(experts=["ffn.0"], hidden_dim=H, seed=0, max_batch_size=64,
                          max_queue_samples=64, batch_timeout_ms=1500)  # fmt: skip
    server = await ExpertServer(config).start()
    client = ExpertClient(f"127.0.0.1:{server.port}")
    try:
        local = copy.deepcopy(server.backends["ffn.0"].module)
        xs = [torch.randn(30, H), torch.randn(30, H)]
        queued = [asyncio.create_task(client.forward("ffn.0", [x], timeout=30)) for x in xs]
        labels = {"expert": "ffn.0", "method": "forward"}
        await until(
            lambda: server.registry.get_sample_value("dmoe_expert_queued_samples", labels) == 60,
            60,
            "both requests are queued",
            every=0.005,
        )
        await _expect(
            client.forward("ffn.0", [torch.randn(30, H)]),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "queue is full",
        )
        for task, x in zip(queued, xs, strict=True):
            (out,) = await task
            with torch.no_grad():
                torch.testing.assert_close(out, local(x), atol=1e-5, rtol=0)
    finally:
        await client.close()
        await server.stop(0.5)


@run_async
async def test_simulated_failures_and_latency() -> None:
    failing = await ExpertServer(
        ExpertConfig(experts=["ffn.0"], hidden_dim=H, simulate_failure_rate=1.0)
    ).start()
    slow = await ExpertServer(
        ExpertConfig(experts=["ffn.0"], hidden_dim=H, simulate_latency_ms=300)
    ).start()
    a = ExpertClient(f"127.0.0.1:{failing.port}")
    b = ExpertClient(f"127.0.0.1:{slow.port}")
    x = torch.randn(2, H)
    try:
        await _expect(a.forward("ffn.0", [x]), grpc.StatusCode.UNAVAILABLE, "simulated")
        await _expect(a.backward("ffn.0", [x], [x]), grpc.StatusCode.UNAVAILABLE, "simulated")
        assert failing.backends["ffn.0"].steps == 0
        started = time.perf_counter()
        await b.forward("ffn.0", [x])
        assert time.perf_counter() - started >= 0.3
        await _expect(b.forward("ffn.0", [x], timeout=0.1), grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        await a.close()
        await b.close()
        await failing.stop(0.5)
        await slow.stop(0.5)


def test_finite_check_refuses_every_bad_value_and_accepts_huge_finite_ones() -> None:
    """The finite check's fast path (a sum) must not refuse finite values whose sum overflows,
    and must catch NaN, +inf, -inf and +inf together with -inf (whose sum is NaN)."""
    from services.expert.backend import ExpertBackend, OptimizerConfig
    from services.expert.errors import ExpertError
    from services.expert.layers import get_expert_class

    backend = ExpertBackend("ffn.0", get_expert_class("ffn"), 8, OptimizerConfig())
    backend.check_finite([torch.full((4, 8), 3e38)])  # the float32 sum overflows to inf
    backend.check_finite([torch.full((4, 8), 60000.0, dtype=torch.float16)])
    backend.check_finite([torch.arange(32).view(4, 8)])  # integers are not checked
    for values in ([float("nan")], [float("inf")], [-float("inf")], [float("inf"), -float("inf")]):
        x = torch.ones(4, 8)
        x.view(-1)[: len(values)] = torch.tensor(values)
        with pytest.raises(ExpertError, match="NaN or infinite"):
            backend.check_finite([torch.zeros(4, 8), x])

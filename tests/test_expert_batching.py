"""Concurrent requests from several clients are merged into one batch (seen in the metrics),
every client gets its own rows back, and a merged backward is one optimizer step."""

from __future__ import annotations

import asyncio
import copy

import grpc
import torch
from helpers import metric, run_async, serve_expert, until

from services.common.errors import CallError
from services.expert.client import ExpertClient
from services.expert.server import ExpertConfig, ExpertServer

H = 16


@run_async
async def test_concurrent_clients_are_batched_and_get_their_rows() -> None:
    # a long batch timeout makes the merge deterministic: all requests arrive well within it
    config = ExpertConfig(
        experts=["ffn.0"], hidden_dim=H, seed=3, batch_timeout_ms=400, max_batch_size=1024
    )
    server = await ExpertServer(config).start()
    clients = [ExpertClient(f"127.0.0.1:{server.port}") for _ in range(6)]
    try:
        local = copy.deepcopy(server.backends["ffn.0"].module)
        inputs = [torch.randn(rows, H) for rows in (1, 5, 2, 7, 3, 4)]
        outs = await asyncio.gather(
            *(c.forward("ffn.0", [x], timeout=30) for c, x in zip(clients, inputs, strict=True))
        )
        for (out,), x in zip(outs, inputs, strict=True):
            with torch.no_grad():
                torch.testing.assert_close(out, local(x), atol=1e-5, rtol=0)
        batches = metric(server, "dmoe_expert_batch_requests_count", method="forward")
        merged = metric(server, "dmoe_expert_batch_requests_sum", method="forward")
        assert merged == 6
        assert batches < 6, f"{batches} batches for 6 concurrent requests: nothing merged"
        rows = metric(server, "dmoe_expert_batch_size_samples_sum", method="forward")
        assert rows == sum(x.shape[0] for x in inputs)

        # concurrent backwards: each gets its own input gradients, one step per batch
        grads = [torch.randn_like(x) for x in inputs]
        results = await asyncio.gather(
            *(
                c.backward("ffn.0", [x], [g], timeout=30)
                for c, x, g in zip(clients, inputs, grads, strict=True)
            )
        )
        for (got,), x, g in zip(results, inputs, grads, strict=True):
            leaf = x.clone().requires_grad_(True)
            local(leaf).backward(g)
            torch.testing.assert_close(got, leaf.grad, atol=1e-5, rtol=0)
        bwd_batches = metric(server, "dmoe_expert_batch_requests_count", method="backward")
        assert bwd_batches < 6
        info = await clients[0].info("ffn.0")
        assert info.optimizer_steps == bwd_batches
    finally:
        for c in clients:
            await c.close()
        await server.stop(0.5)


@run_async
async def test_different_sequence_lengths_are_not_mixed() -> None:
    """Requests whose free dimension differs cannot be concatenated; each still succeeds."""

    config = ExpertConfig(
        experts=["tr.0"], expert_cls="transformer", hidden_dim=H, seed=0, batch_timeout_ms=200
    )
    server = await ExpertServer(config).start()
    client = ExpertClient(f"127.0.0.1:{server.port}")
    try:
        local = copy.deepcopy(server.backends["tr.0"].module)
        inputs = [
            [torch.randn(2, seq, H), torch.ones(2, seq, dtype=torch.bool)] for seq in (3, 5, 3, 5)
        ]
        outs = await asyncio.gather(*(client.forward("tr.0", x) for x in inputs))
        for (out,), x in zip(outs, inputs, strict=True):
            with torch.no_grad():
                torch.testing.assert_close(out, local(*x), atol=1e-5, rtol=0)
        batches = metric(server, "dmoe_expert_batch_requests_count", method="forward")
        assert batches == 2  # one per sequence length
    finally:
        await client.close()
        await server.stop(0.5)


@run_async
async def test_a_nan_request_is_cut_out_of_its_batch() -> None:
    """A non-finite request queued with good ones is refused; the others run as one batch."""

    config = ExpertConfig(experts=["ffn.0"], hidden_dim=H, seed=4, batch_timeout_ms=300)
    server = await ExpertServer(config).start()
    client = ExpertClient(f"127.0.0.1:{server.port}")
    try:
        local = copy.deepcopy(server.backends["ffn.0"].module)
        xs = [torch.randn(3, H) for _ in range(3)]
        gs = [torch.randn(3, H) for _ in range(3)]
        gs[1][2, 0] = float("nan")
        results = await asyncio.gather(
            *(client.backward("ffn.0", [x], [g]) for x, g in zip(xs, gs, strict=True)),
            return_exceptions=True,
        )
        assert isinstance(results[1], CallError)
        assert results[1].code == grpc.StatusCode.INVALID_ARGUMENT
        assert "grad_outputs[0]" in results[1].message
        good_x = torch.cat([xs[0], xs[2]]).requires_grad_(True)
        local(good_x).backward(torch.cat([gs[0], gs[2]]))
        torch.testing.assert_close(results[0][0], good_x.grad[:3], atol=1e-5, rtol=0)
        torch.testing.assert_close(results[2][0], good_x.grad[3:], atol=1e-5, rtol=0)
        assert server.backends["ffn.0"].steps == 1  # one step, from the good rows only
        assert metric(server, "dmoe_expert_batch_size_samples_sum", method="backward") == 6
    finally:
        await client.close()
        await server.stop(0.5)


@run_async
async def test_min_batch_size_runs_at_once_and_the_timeout_bounds_the_wait() -> None:
    """--min-batch-size 8 with a 60 s timeout: a 4-row request waits for company, and runs the
    moment a second one brings the pool to 8 samples (both answered long before the timeout).
    With a short timeout, a lone 4-row request is never stuck: it runs after the timeout."""

    async with (
        serve_expert(
            experts=["ffn.0"], hidden_dim=H, seed=5, min_batch_size=8, batch_timeout_ms=60_000
        ) as (waiting, client),
        serve_expert(
            experts=["ffn.0"], hidden_dim=H, seed=5, min_batch_size=8, batch_timeout_ms=200
        ) as (bounded, lone_client),
    ):
        local = copy.deepcopy(waiting.backends["ffn.0"].module)
        xs = [torch.randn(4, H), torch.randn(4, H)]
        first = asyncio.create_task(client.forward("ffn.0", [xs[0]], timeout=30))
        labels = {"expert": "ffn.0", "method": "forward"}
        await until(
            lambda: waiting.registry.get_sample_value("dmoe_expert_queued_samples", labels) == 4,
            60,
            "the first request is queued",
            every=0.005,
        )
        assert not first.done()  # it cannot run before the timeout or a second request
        second = await client.forward("ffn.0", [xs[1]], timeout=30)
        outs = [(await first)[0], second[0]]
        for out, x in zip(outs, xs, strict=True):
            with torch.no_grad():
                torch.testing.assert_close(out, local(x), atol=1e-5, rtol=0)
        assert metric(waiting, "dmoe_expert_batch_requests_count", method="forward") == 1
        assert metric(waiting, "dmoe_expert_batch_size_samples_sum", method="forward") == 8

        (out,) = await lone_client.forward("ffn.0", [xs[0]], timeout=30)
        with torch.no_grad():
            torch.testing.assert_close(out, local(xs[0]), atol=1e-5, rtol=0)
        assert metric(bounded, "dmoe_expert_batch_size_samples_sum", method="forward") == 4

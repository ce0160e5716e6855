"""Drift: backwards that pass every check but all push one way (open training's inherent
risk), and the opt-in ``--max-caller-share`` that bounds one caller's part of it.

Callers on distinct addresses are real: each non-default caller reaches the server through a
relay whose connections come from its own 127.0.0.x address (``helpers.relay_from``).
"""

from __future__ import annotations

import asyncio
import contextlib
import math

import grpc
import torch
from helpers import relay_from, serve_expert

from services.common.errors import CallError
from services.expert.client import ExpertClient

H = 16
ROWS = 4
RMS = 0.1  # grad_outputs RMS of every request, honest or not: no outlier check can tell


async def _drift_run(max_caller_share: float) -> tuple[float, int, int, list[str]]:
    """20 rounds of 3 honest callers (one backward each, random directions) and a hostile one
    (10 backwards, all pushing the outputs along ``d``). Returns how far the outputs of fixed
    probe inputs moved along ``d``, the hostile backwards accepted, the honest ones refused,
    and the hostile refusals' messages."""
    gen = torch.Generator().manual_seed(0)
    d = torch.randn(H, generator=gen)
    d /= d.norm()
    probe = torch.randn(32, H, generator=gen)
    push = (-RMS * math.sqrt(H) * d).expand(ROWS, H)  # descending this raises <out, d>
    async with (
        serve_expert(
            experts=["ffn.0"],
            hidden_dim=H,
            seed=3,
            max_caller_share=max_caller_share,
            caller_share_window=64,
        ) as (server, local),
        contextlib.AsyncExitStack() as stack,
    ):
        addresses = [
            await stack.enter_async_context(relay_from(server.address, f"127.0.0.{i}"))
            for i in (2, 3, 4)
        ]
        hostile, *others = [ExpertClient(a) for a in addresses]
        honest = [local, *others]
        for client in (hostile, *others):
            stack.push_async_callback(client.close)

        async def along_d() -> float:
            (out,) = await local.forward("ffn.0", [probe], timeout=60)
            return float((out @ d).mean())

        start = await along_d()
        accepted, honest_refused, messages = 0, 0, []
        for _ in range(20):
            for client in honest:
                g = torch.randn(ROWS, H, generator=gen)
                g *= RMS / float(g.pow(2).mean().sqrt())
                x = torch.randn(ROWS, H, generator=gen)
                try:
                    await client.backward("ffn.0", [x], [g], timeout=60)
                except CallError:
                    honest_refused += 1
            for _ in range(10):
                x = torch.randn(ROWS, H, generator=gen)
                try:
                    await hostile.backward("ffn.0", [x], [push], timeout=60)
                    accepted += 1
                except CallError as exc:
                    assert exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.message
                    messages.append(exc.message)
        rejected = server.registry.get_sample_value(
            "dmoe_expert_rejected_total", {"reason": "caller_share"}
        )
        assert (rejected or 0) == len(messages)
        return await along_d() - start, accepted, honest_refused, messages


def test_one_caller_cannot_train_an_expert_alone() -> None:
    """Without the limit the hostile caller does 200 of the 260 updates and drags the outputs
    along its direction; with ``--max-caller-share 0.3`` (window 64) it gets at most 19 of any
    64 consecutive admitted backwards, every honest call still succeeds, and the drift is a
    fraction of the unlimited one."""

    async def scenario() -> None:
        drift_off, accepted_off, refused_off, _ = await _drift_run(0.0)
        drift_on, accepted_on, refused_on, messages = await _drift_run(0.3)
        assert accepted_off == 200 and refused_off == refused_on == 0
        assert accepted_on <= 19 + 20 * 2, accepted_on  # ~1 per round once the window is full
        assert messages and all("--max-caller-share" in m for m in messages)
        assert "'127.0.0.2'" in messages[0]
        assert drift_off > 0 and drift_on < 0.5 * drift_off, (drift_on, drift_off)

    asyncio.run(scenario())

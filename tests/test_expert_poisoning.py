"""A hostile client cannot poison an expert, over real gRPC: huge-but-finite grad_outputs fail
alone (INVALID_ARGUMENT) while the honest requests batched with them get their replies and their
optimizer step; a step that would leave a non-finite value is undone exactly; after a warm-up a
request whose grad_outputs dwarf recent ones is refused before it reaches a batch."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import grpc
import pytest
import torch
from helpers import metric, run_async, serve_expert, until

from services.common.errors import CallError
from services.expert.backend import ExpertBackend, OptimizerConfig
from services.expert.client import ExpertClient
from services.expert.server import ExpertServer

H = 16
ROWS = 4
INVALID = grpc.StatusCode.INVALID_ARGUMENT


async def _until_queued(server: ExpertServer, uid: str, rows: int) -> None:
    """Wait until ``rows`` samples sit in the expert's backward pool (a condition, no timing)."""
    labels = {"expert": uid, "method": "backward"}
    await until(
        lambda: server.registry.get_sample_value("dmoe_expert_queued_samples", labels) == rows,
        60,
        f"{rows} samples queued",
        every=0.005,
    )


async def _one_batch(
    server: ExpertServer, client: ExpertClient, uid: str, requests: list[tuple[Any, Any]]
) -> list[Any]:
    """Send backward requests in this order so they form one batch in exactly this order (the
    pool runs once it holds ``max_batch_size`` = all their rows)."""
    tasks = []
    for i, (x, g) in enumerate(requests):
        tasks.append(asyncio.create_task(client.backward(uid, [x], [g], timeout=60)))
        if i + 1 < len(requests):  # the last one fills the batch, which then runs at once
            await _until_queued(server, uid, ROWS * (i + 1))
    return await asyncio.gather(*tasks, return_exceptions=True)


def _state(backend: ExpertBackend) -> dict[str, Any]:
    with backend.lock:
        return copy.deepcopy(backend.state_dict())


def _all_finite(backend: ExpertBackend) -> bool:
    tensors = [*backend.module.state_dict().values()]
    if backend.optimizer is not None:
        for state in backend.optimizer.state.values():
            tensors.extend(v for v in state.values() if isinstance(v, torch.Tensor))
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Weights, optimizer state and step count equal, bit for bit."""
    assert a["steps"] == b["steps"]
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for index in sa:
        assert sa[index].keys() == sb[index].keys()
        for key in sa[index]:
            assert torch.equal(sa[index][key], sb[index][key]), (index, key)


def _replica(server: ExpertServer, uid: str, state: dict[str, Any]) -> ExpertBackend:
    """A local expert of the same class and optimizer, in ``state``."""
    backend = server.backends[uid]
    local = ExpertBackend(uid, backend.expert_class, H, backend.optimizer_config)
    local.load_state_dict(copy.deepcopy(state))
    return local


def _honest(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(ROWS, H, generator=gen), 0.1 * torch.randn(ROWS, H, generator=gen)


def _refused(result: Any, *fragments: str) -> None:
    assert isinstance(result, CallError), result
    assert result.code == INVALID, result.message
    for fragment in fragments:
        assert fragment in result.message, result.message


@pytest.mark.parametrize("clip", [1.0, 0.0], ids=["clipping", "no-clipping"])
@run_async
async def test_huge_grad_outputs_fail_alone_and_honest_batchmates_step(clip: float) -> None:
    """3e38 grad_outputs are finite, so they pass validation, but overflow the gradients, with
    clipping or without: the combined step is refused before it is applied, the batch is split
    to find the culprit, only the culprit fails, and A and B each get their step, exactly as a
    local replay of A then B."""

    async with serve_expert(
        experts=["ffn.0"],
        hidden_dim=H,
        seed=7,
        max_batch_size=3 * ROWS,
        batch_timeout_ms=60_000,
        optimizer=OptimizerConfig(clip_grad_norm=clip),
    ) as (server, client):
        backend = server.backends["ffn.0"]
        initial = _state(backend)
        (xa, ga), (xb, gb) = _honest(1), _honest(2)
        hostile = (torch.randn(ROWS, H), torch.full((ROWS, H), 3e38))
        a, h, b = await _one_batch(server, client, "ffn.0", [(xa, ga), hostile, (xb, gb)])
        _refused(h, "non-finite")
        assert not isinstance(a, BaseException) and not isinstance(b, BaseException), (a, b)
        assert _all_finite(backend)

        local = _replica(server, "ffn.0", initial)
        (want_a,) = local.backward([xa], [ga])
        (want_b,) = local.backward([xb], [gb])
        torch.testing.assert_close(a[0], want_a, atol=1e-6, rtol=0)
        torch.testing.assert_close(b[0], want_b, atol=1e-6, rtol=0)
        assert backend.steps == local.steps == 2
        for name, value in local.module.state_dict().items():
            torch.testing.assert_close(backend.module.state_dict()[name], value, atol=1e-6, rtol=0)
        assert metric(server, "dmoe_expert_rejected_total", reason="nonfinite_step") == 1
        rejected = sum(
            metric(server, "dmoe_expert_steps_rejected_total", expert="ffn.0", reason=r)
            for r in ("nonfinite_gradient", "nonfinite_result")
        )
        assert rejected >= 2  # the whole batch, then the half holding the culprit


SCALE_EXPERT = """
import torch
from torch import nn

from services.expert.layers import Schema, register_expert_class


def _vector(h):
    return [Schema((h,))]


@register_expert_class("scale_test", inputs=_vector, outputs=_vector)
class Scale(nn.Module):
    \"\"\"x * w: stays finite with weights up to ~1e38, so only the step can overflow.\"\"\"

    def __init__(self, hidden_dim):
        super().__init__()
        self.w = nn.Parameter(torch.ones(hidden_dim))

    def forward(self, x):
        return x * self.w
"""


@run_async
async def test_a_step_that_would_go_non_finite_is_undone_exactly(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """SGD with momentum and lr=1e38, no clipping: the gradients are finite, the first steps
    leave weights near 1e38 (finite), a later one overflows. The refused step leaves weights,
    momentum buffers and the step count bit for bit as before. Adam with lr=1e39 overflows on
    its first step: the optimizer state it created is dropped again."""
    custom = tmp_path / "scale_test.py"
    custom.write_text(SCALE_EXPERT)
    cases = [
        ("scale_test.0", OptimizerConfig(name="sgd", lr=1e38, momentum=0.9, clip_grad_norm=0.0)),
        ("ffn.0", OptimizerConfig(lr=1e39, clip_grad_norm=0.0)),
    ]

    for uid, optimizer in cases:
        async with serve_expert(
            experts=[uid],
            expert_cls=uid.split(".")[0],
            hidden_dim=H,
            seed=3,
            custom_module=str(custom),
            optimizer=optimizer,
        ) as (server, client):
            backend = server.backends[uid]
            accepted = 0
            for attempt in range(8):
                before = _state(backend)
                x, g = _honest(attempt)
                try:
                    await client.backward(uid, [x], [g], timeout=60)
                except CallError as exc:
                    _refused(exc, "non-finite", "undone")
                    break
                accepted += 1
            else:
                raise AssertionError("no step was refused")
            after = _state(backend)
            _assert_same_state(after, before)
            if uid.startswith("scale"):
                assert accepted > 0 and after["optimizer"]["state"]  # momentum restored
            else:
                assert accepted == 0 and after["optimizer"]["state"] == {}
            assert _all_finite(backend)
            assert (await client.info(uid)).optimizer_steps == accepted
            undone = metric(
                server,
                "dmoe_expert_steps_rejected_total",
                expert=uid,
                reason="nonfinite_result",
            )
            assert undone == 1


@run_async
async def test_grad_norm_outlier_is_refused_and_batchmates_share_one_step() -> None:
    """After the warm-up, grad_outputs 10^4 x larger than recent ones are finite and would be
    clipped into a valid step that follows the attacker alone; they are refused before the step
    instead, and A and B run as one batch, one step."""

    async with serve_expert(
        experts=["ffn.0"],
        hidden_dim=H,
        seed=11,
        max_batch_size=3 * ROWS,
        batch_timeout_ms=60_000,
    ) as (server, client):
        backend = server.backends["ffn.0"]
        for _ in range(70):  # warm-up (64): full batches of honest rows run at once
            x, g = torch.randn(3 * ROWS, H), 0.1 * torch.randn(3 * ROWS, H)
            await client.backward("ffn.0", [x], [g], timeout=60)
        before = _state(backend)
        (xa, ga), (xb, gb) = _honest(5), _honest(6)
        hostile = (torch.randn(ROWS, H), 1e3 * torch.randn(ROWS, H))
        a, h, b = await _one_batch(server, client, "ffn.0", [(xa, ga), hostile, (xb, gb)])
        _refused(h, "--max-grad-norm-ratio")
        assert not isinstance(a, BaseException) and not isinstance(b, BaseException), (a, b)
        local = _replica(server, "ffn.0", before)
        (both,) = local.backward([torch.cat([xa, xb])], [torch.cat([ga, gb])])
        torch.testing.assert_close(torch.cat([a[0], b[0]]), both, atol=1e-6, rtol=0)
        assert backend.steps == before["steps"] + 1 == local.steps
        for name, value in local.module.state_dict().items():
            torch.testing.assert_close(backend.module.state_dict()[name], value, atol=1e-6, rtol=0)
        assert metric(server, "dmoe_expert_rejected_total", reason="grad_norm_outlier") == 1


@run_async
async def test_honest_training_goes_on_beside_a_hostile_client() -> None:
    """Two honest clients minimise <out, c> while a hostile one sends 3e38 grad_outputs, then
    (after the warm-up) 10^4 x larger ones, in the same batch every round. Every honest call
    succeeds, every hostile one is refused, the weights stay finite and the objective falls."""

    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(ROWS, H, generator=gen) for _ in range(2)]
    cs = [torch.randn(ROWS, H, generator=gen) / ROWS for _ in range(2)]
    async with serve_expert(
        experts=["ffn.0"],
        hidden_dim=H,
        seed=2,
        max_batch_size=3 * ROWS,
        batch_timeout_ms=60_000,
        optimizer=OptimizerConfig(lr=1e-2),
    ) as (server, client):
        # honest clients[0] and [1], hostile clients[2]: each its own channel
        others = [ExpertClient(f"127.0.0.1:{server.port}") for _ in range(2)]
        clients = [client, *others]

        async def objective() -> float:  # one full batch: the pool runs it at once
            batch = torch.cat([*xs, torch.zeros(ROWS, H)])
            (out,) = await client.forward("ffn.0", [batch], timeout=60)
            parts = zip(out.split(ROWS)[:2], cs, strict=True)
            return sum(float((o * c).sum()) for o, c in parts)

        try:
            start = await objective()
            rounds = 40  # the outlier check starts after 64 honest requests (32 rounds)
            for r in range(rounds):
                scale = 3e38 if r < 32 else 1e4
                x, g = torch.randn(ROWS, H), torch.full((ROWS, H), scale)
                calls = [
                    clients[i].backward("ffn.0", [xs[i]], [cs[i]], timeout=60) for i in range(2)
                ]
                calls.append(clients[2].backward("ffn.0", [x], [g], timeout=60))
                *honest, bad = await asyncio.gather(*calls, return_exceptions=True)
                assert all(not isinstance(o, BaseException) for o in honest), (r, honest)
                _refused(bad)
                assert _all_finite(server.backends["ffn.0"])
            end = await objective()
        finally:
            for other in others:
                await other.close()
        assert end < start - 1.0, (start, end)
        assert metric(server, "dmoe_expert_rejected_total", reason="nonfinite_step") >= 1
        assert metric(server, "dmoe_expert_rejected_total", reason="grad_norm_outlier") >= 1
        honest_ok = metric(
            server, "dmoe_expert_requests_total", expert="ffn.0", method="backward", code="OK"
        )
        assert honest_ok == 2 * rounds
        # every honest step was certified finite: none needed the copy the undo uses
        assert server.backends["ffn.0"].guard.copies == 0


@run_async
async def test_a_peer_cannot_talk_the_outlier_limit_up() -> None:
    """Round two of the ramp: after the warm-up a hostile peer alone sends 30 pairs of a probe at
    3 x the limit (refused; it reads the limit from the refusal) and a request just under it
    (accepted). Refused requests do not move the statistic and accepted ones raise it by at
    most 2 x per ~26 requests, so a request at 1000 x the honest RMS is still refused (before:
    each refused probe was recorded at the limit, which rose 20 x per ~26 of them, and it was
    accepted). An honest request is still served."""
    async with serve_expert(experts=["ffn.0"], hidden_dim=H, seed=12) as (server, client):
        gen = torch.Generator().manual_seed(0)
        for _ in range(64):  # warm-up: honest grad_outputs of RMS ~0.1
            x, g = _honest(int(torch.randint(1 << 30, (1,), generator=gen)))
            await client.backward("ffn.0", [x], [g], timeout=60)
        honest_rms = 0.1
        limit = 25 * honest_rms  # a first guess; every refusal tells the real one

        async def send(rms: float) -> Any:
            x = torch.randn(ROWS, H, generator=gen)
            g = rms * torch.randn(ROWS, H, generator=gen)
            g = g * (rms / float(g.pow(2).mean().sqrt()))
            try:
                return await client.backward("ffn.0", [x], [g], timeout=60)
            except CallError as exc:
                return exc

        first_limit = None
        for _ in range(30):
            probe = await send(3 * limit)
            _refused(probe, "--max-grad-norm-ratio")
            limit = float(probe.message.split("(limit ")[1].split(",")[0])
            first_limit = first_limit or limit
            under = await send(0.95 * limit)
            assert not isinstance(under, BaseException), under.message
        assert limit <= 8 * first_limit, (first_limit, limit)
        _refused(await send(1000 * honest_rms), "--max-grad-norm-ratio")
        x, g = _honest(99)
        await client.backward("ffn.0", [x], [g], timeout=60)
        refused = metric(server, "dmoe_expert_rejected_total", reason="grad_norm_outlier")
        assert refused == 31

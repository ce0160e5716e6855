"""Calling many experts at once over real gRPC: answered mask, outputs, gradients, waiting."""

import asyncio
import time

import pytest
import torch
from helpers import free_port, metric
from prometheus_client import CollectorRegistry

from services.expert.backend import OptimizerConfig
from services.expert.server import ExpertConfig, ExpertServer
from services.trainer.dispatch import (
    CallPolicy,
    ExpertsUnavailableError,
    call_experts,
    plan_jobs,
)
from services.trainer.metrics import TrainerMetrics
from services.trainer.remote_expert import RemoteExpert
from services.trainer.swarm import Swarm

H = 16


def start_server(swarm: Swarm, pattern: str, **extra) -> ExpertServer:
    config = ExpertConfig(
        experts=[pattern],
        hidden_dim=H,
        optimizer=OptimizerConfig(lr=0.0),  # weights never move: references stay exact
        seed=1,
        **extra,
    )
    return swarm.run(ExpertServer(config).start())


def failed(swarm: Swarm, method: str, reason: str) -> float:
    return metric(swarm.metrics, "dmoe_trainer_expert_failures_total", method=method, reason=reason)


pytestmark = pytest.mark.expert_swarm(
    {"experts": ["ffn.[0:4]"], "hidden_dim": H, "optimizer": OptimizerConfig(lr=0.0), "seed": 1},
    dht=False,
)


def test_many_experts_with_one_unreachable(swarm) -> None:
    server = swarm.servers[0]
    live = server.address
    dead = f"127.0.0.1:{free_port()}"
    torch.manual_seed(0)
    n, k = 6, 3
    choices = [[f"ffn.{(b + j) % 4}" for j in range(k - 1)] + ["ffn.9"] for b in range(n)]
    addresses = {f"ffn.{i}": live for i in range(4)} | {"ffn.9": dead}
    jobs = plan_jobs(choices, addresses)
    assert len(jobs) == 5  # one request per distinct expert
    x = torch.randn(n, H, requires_grad=True)
    policy = CallPolicy(k_min=1, forward_timeout=5.0, timeout_after_k_min=2.0)
    (outputs,), mask = call_experts(swarm, jobs, [x], k, [(H,)], policy)

    assert mask[:, : k - 1].all() and not mask[:, k - 1].any()
    assert (outputs[:, k - 1] == 0).all()
    failures = failed(swarm, "forward", "error")
    assert failures >= 1

    # outputs equal separate per-expert calls
    for job in jobs:
        if job.uid == "ffn.9":
            continue
        expert = RemoteExpert(job.uid, live, swarm=swarm)
        expected = expert(x[job.rows].detach())
        assert torch.allclose(outputs[job.rows, job.slots], expected, atol=1e-5)

    # input gradients equal the reference built from separate RemoteExpert calls
    weights = torch.rand(n, k)
    grad = torch.randn(n, H)
    ((outputs * weights.unsqueeze(-1)).sum(1) * grad).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    total = torch.zeros(n, H)
    for b in range(n):
        for j in range(k - 1):
            expert = RemoteExpert(choices[b][j], live, swarm=swarm)
            total[b] = total[b] + weights[b, j] * expert(x_ref[b : b + 1])[0]
    (total * grad).sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)


def test_fewer_than_k_min_answers_raise_or_give_zeros(swarm) -> None:
    server = swarm.servers[0]
    dead = f"127.0.0.1:{free_port()}"
    choices = [["ffn.0", "ffn.7"], ["ffn.7", "ffn.8"]]
    jobs = plan_jobs(choices, {"ffn.0": server.address, "ffn.7": dead, "ffn.8": dead})
    x = torch.randn(2, H)
    started = time.perf_counter()
    with pytest.raises(ExpertsUnavailableError, match="fewer than k_min=1"):
        call_experts(swarm, jobs, [x], 2, [(H,)], CallPolicy(forward_timeout=60.0))
    assert time.perf_counter() - started < 30.0  # refused connections end the wait early
    policy = CallPolicy(forward_timeout=5.0, allow_zero_outputs=True)
    (outputs,), mask = call_experts(swarm, jobs, [x], 2, [(H,)], policy)
    assert mask.tolist() == [[True, False], [False, False]]
    assert (outputs[1] == 0).all() and not (outputs[0, 0] == 0).all()


def test_stragglers_are_dropped_after_k_min(swarm) -> None:
    fast = swarm.servers[0]
    slow = start_server(swarm, "ffn.[4:6]", simulate_latency_ms=60_000)
    try:
        choices = [["ffn.0", "ffn.4"], ["ffn.1", "ffn.5"]]
        addresses = {"ffn.0": fast.address, "ffn.1": fast.address}
        addresses |= {"ffn.4": slow.address, "ffn.5": slow.address}
        jobs = plan_jobs(choices, addresses)
        before = failed(swarm, "forward", "timeout")
        policy = CallPolicy(k_min=1, forward_timeout=90.0, timeout_after_k_min=0.3)
        started = time.perf_counter()
        (_outputs,), mask = call_experts(swarm, jobs, [torch.randn(2, H)], 2, [(H,)], policy)
        elapsed = time.perf_counter() - started
        assert mask.tolist() == [[True, False], [True, False]]
        assert elapsed < 30.0  # did not wait for the 60 s stragglers
        after = failed(swarm, "forward", "timeout")
        assert after == before + 2
        # k_min = 2 waits for them, but never past forward_timeout
        policy = CallPolicy(k_min=2, forward_timeout=1.0, allow_zero_outputs=True)
        started = time.perf_counter()
        (_outputs,), mask = call_experts(swarm, jobs, [torch.randn(2, H)], 2, [(H,)], policy)
        assert time.perf_counter() - started >= 0.95
        assert mask.tolist() == [[True, False], [True, False]]
    finally:
        swarm.run(slow.stop(0))


def test_remote_expert_checks_schema_and_matches_backward(swarm) -> None:
    server = swarm.servers[0]
    expert = RemoteExpert("ffn.2", server.address, swarm=swarm)
    with pytest.raises(ValueError, match=r"expected \[batch, 16\]"):
        expert(torch.randn(3, H + 1))
    with pytest.raises(ValueError, match="float32"):
        expert(torch.randn(3, H, dtype=torch.float64))
    x = torch.randn(3, H, requires_grad=True)
    y = expert(x)
    assert y.shape == (3, H)
    y.pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # the finite-difference check of the remote gradient along one direction
    direction = torch.randn(3, H)
    eps = 1e-2
    with torch.no_grad():
        plus = expert(x.detach() + eps * direction).pow(2).sum()
        minus = expert(x.detach() - eps * direction).pow(2).sum()
    numeric = (plus - minus) / (2 * eps)
    assert (
        abs(float(numeric) - float((x.grad * direction).sum())) < 0.05 * abs(float(numeric)) + 1e-2
    )


def test_call_many_without_calls_is_empty() -> None:
    from services.trainer.expert_calls import call_many

    assert asyncio.run(call_many([], [], 3, k_min=1, timeout=1.0, timeout_after_k_min=0.1)) == []


CUSTOM = """
import torch
from torch import nn
from services.expert.layers import Schema, register_expert_class


def _vector(h):
    return [Schema((h,))]


@register_expert_class("inf_out", inputs=_vector, outputs=_vector)
class InfOut(nn.Module):
    def __init__(self, hidden_dim):
        super().__init__()
        self.linear = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x):
        return self.linear(x) * float("inf")
"""


def test_non_finite_outputs_are_dropped_when_detecting_anomalies(swarm, tmp_path):
    good = swarm.servers[0]
    path = tmp_path / "inf_expert.py"
    path.write_text(CUSTOM)
    bad = start_server(swarm, "bad.[0:1]", expert_cls="inf_out", custom_module=str(path))
    try:
        choices = [["ffn.0", "bad.0"], ["bad.0", "ffn.1"]]
        addresses = {"ffn.0": good.address, "ffn.1": good.address, "bad.0": bad.address}
        before = failed(swarm, "forward", "anomaly")
        policy = CallPolicy(forward_timeout=5.0, detect_anomalies=True)
        (outputs,), mask = call_experts(
            swarm, plan_jobs(choices, addresses), [torch.randn(2, H)], 2, [(H,)], policy
        )
        assert mask.tolist() == [[True, False], [False, True]]
        assert bool(torch.isfinite(outputs).all())
        after = failed(swarm, "forward", "anomaly")
        assert after == before + 1
        trusting = CallPolicy(forward_timeout=5.0, detect_anomalies=False)
        (outputs,), mask = call_experts(
            swarm, plan_jobs(choices, addresses), [torch.randn(2, H)], 2, [(H,)], trusting
        )
        assert bool(mask.all()) and not bool(torch.isfinite(outputs[0, 1]).all())
    finally:
        swarm.run(bad.stop(0))


def test_refused_forwards_are_sent_again(swarm) -> None:
    flaky = start_server(swarm, "flaky.[0:16]", simulate_failure_rate=0.3)
    try:
        choices = [[f"flaky.{i}"] for i in range(16)]
        jobs = plan_jobs(choices, {f"flaky.{i}": flaky.address for i in range(16)})
        x = torch.randn(16, H)
        once = CallPolicy(forward_timeout=5.0, allow_zero_outputs=True, transient_retries=0)
        (_outputs,), mask = call_experts(swarm, jobs, [x], 1, [(H,)], once)
        assert not bool(mask.all())  # about a third refused
        retried = failed(swarm, "forward", "retried")
        patient = CallPolicy(forward_timeout=5.0, transient_retries=20)
        (outputs,), mask = call_experts(swarm, jobs, [x], 1, [(H,)], patient)
        assert bool(mask.all())
        assert failed(swarm, "forward", "retried") > retried
        assert outputs.shape == (16, 1, H) and bool(torch.isfinite(outputs).all())
    finally:
        swarm.run(flaky.stop(0))


def test_backward_k_min_is_enforced() -> None:
    """A backward with fewer answers than ``backward_k_min`` raises (the experts that answered
    the forward are gone by the backward); with 0 the samples just get no gradient."""
    swarm = Swarm(None, metrics=TrainerMetrics(CollectorRegistry()))
    server = start_server(swarm, "bk.[0:2]")
    try:
        choices = [["bk.0", "bk.1"], ["bk.1", "bk.0"]]
        jobs = plan_jobs(choices, {"bk.0": server.address, "bk.1": server.address})
        x = torch.randn(2, H, requires_grad=True)
        strict = CallPolicy(forward_timeout=5.0, backward_timeout=2.0, backward_k_min=1)
        lenient = CallPolicy(forward_timeout=5.0, backward_timeout=2.0, backward_k_min=0)
        (out_strict,), mask = call_experts(swarm, jobs, [x], 2, [(H,)], strict)
        (out_lenient,), _ = call_experts(swarm, jobs, [x], 2, [(H,)], lenient)
        assert bool(mask.all())
        swarm.run(server.stop(0))
        with pytest.raises(ExpertsUnavailableError, match="backward_k_min=1"):
            out_strict.sum().backward()
        out_lenient.sum().backward()
        assert x.grad is not None and not bool(x.grad.any())
    finally:
        swarm.run(server.stop(0))
        swarm.close()

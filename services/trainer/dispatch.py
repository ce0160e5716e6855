"""Sending each sample's rows to its chosen experts and the gradients back: one autograd node.

Forward: one request per distinct chosen expert carrying the rows of every sample that chose
it, all sent at once (``expert_calls.call_many``). Samples left with fewer than ``k_min``
answers get a retry round with replacement experts (the caller's ``replan``). The node returns
the outputs ``[n, k, ...]`` (zeros where an expert did not answer) and the answered mask.
Backward: only the experts that answered get a Backward call with the same input rows and
their rows of the output gradient; each returns input gradients (and applies one optimizer
step on its server). An expert that fails the backward counts as a constant: its samples get
no input gradient through it. The calls run on the swarm's background loop because torch calls
``forward``/``backward`` synchronously.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc
import numpy as np
import torch

from services.trainer.expert_calls import OK, CallOutcome, call_many, remaining_timeout
from services.trainer.swarm import Swarm

# A leaf that requires grad, so the node's backward runs even when the inputs do not need one
# (a first layer fed with raw data): the experts still have to receive their gradients.
DUMMY = torch.empty(0, requires_grad=True)


class ExpertsUnavailableError(RuntimeError):
    """Fewer than ``k_min`` experts answered for some samples (and zeros are not allowed)."""


@dataclass
class ExpertJob:
    uid: str
    address: str
    rows: torch.Tensor  # sample indices, int64
    slots: torch.Tensor  # which of the sample's k choices this expert is


@dataclass
class CallPolicy:
    k_min: int = 1
    forward_timeout: float = 10.0
    timeout_after_k_min: float = 1.0
    backward_k_min: int = 1
    backward_timeout: float = 10.0
    forward_retries: int = 1
    transient_retries: int = 1
    allow_zero_outputs: bool = False
    detect_anomalies: bool = False


def plan_jobs(uids: Sequence[Sequence[str]], addresses: dict[str, str]) -> list[ExpertJob]:
    """Group ``uids[sample][slot]`` by expert: one job (one request) per distinct expert."""
    rows: dict[str, list[int]] = {}
    slots: dict[str, list[int]] = {}
    for sample, chosen in enumerate(uids):
        for slot, uid in enumerate(chosen):
            rows.setdefault(uid, []).append(sample)
            slots.setdefault(uid, []).append(slot)
    return [
        ExpertJob(uid, addresses[uid], torch.tensor(rows[uid]), torch.tensor(slots[uid]))
        for uid in rows
    ]


# Errors after which the same forward is worth sending again at once: the server refused
# before computing (overload, a blip). Forward is idempotent; Backward is never re-sent, since
# it may already have applied the expert's optimizer step.
TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


def _forward_call(
    swarm: Swarm, job: ExpertJob, inputs: torch.Tensor, timeout: float, retries: int
) -> Callable[[], Awaitable[list[torch.Tensor]]]:
    async def call() -> list[torch.Tensor]:
        deadline = time.monotonic() + timeout
        for attempt in range(retries + 1):
            try:
                return await swarm.forward(
                    job.uid,
                    job.address,
                    [inputs[job.rows]],
                    max(0.001, deadline - time.monotonic()),
                )
            except grpc.aio.AioRpcError as exc:
                if attempt == retries or exc.code() not in TRANSIENT:
                    raise
                swarm.record_failure("forward", "retried")
        raise AssertionError("unreachable")

    return call


def _record(swarm: Swarm, method: str, jobs: Sequence[ExpertJob], outcomes: list[CallOutcome]):
    for job, outcome in zip(jobs, outcomes, strict=True):
        if outcome.ok:
            swarm.backoff.success(job.uid, job.address)
            continue
        swarm.expert_failed(job.uid, job.address, method, outcome.reason, outcome.detail)
        swarm.backoff.failure(job.uid, job.address)


# replan(samples, failed uids, free slots per sample) -> [(sample, slot, uid, address)]
Replan = Callable[[list[int], set[str], list[list[int]]], list[tuple[int, int, str, str]]]


def group_assignments(assignments: Sequence[tuple[int, int, str, str]]) -> list[ExpertJob]:
    rows: dict[str, list[int]] = {}
    slots: dict[str, list[int]] = {}
    addresses: dict[str, str] = {}
    for sample, slot, uid, address in assignments:
        rows.setdefault(uid, []).append(sample)
        slots.setdefault(uid, []).append(slot)
        addresses[uid] = address
    return [
        ExpertJob(uid, addresses[uid], torch.tensor(rows[uid]), torch.tensor(slots[uid]))
        for uid in rows
    ]


class RemoteMoECall(torch.autograd.Function):
    """``(dummy, inputs [n, ...], swarm, jobs, k, out_shape, policy, replan) -> (outputs, mask)``.

    ``replan``, when given, is asked once per retry round (``policy.forward_retries``) for
    replacement experts for the samples still short of ``k_min`` answers, excluding the experts
    that just failed; the retry shares the ``forward_timeout`` budget.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        dummy: torch.Tensor,
        inputs: torch.Tensor,
        swarm: Swarm,
        jobs: list[ExpertJob],
        k: int,
        out_shape: tuple[int, ...],
        policy: CallPolicy,
        replan: Replan | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = inputs.detach()
        n = inputs.shape[0]
        outputs = torch.zeros(n, k, *out_shape, dtype=inputs.dtype)
        mask = torch.zeros(n, k, dtype=torch.bool)
        deadline = time.monotonic() + remaining_timeout(policy.forward_timeout)
        answered_jobs: list[ExpertJob] = []
        reasons: set[str] = set()
        called = 0
        rounds = 1 + (policy.forward_retries if replan is not None else 0)
        for round_ in range(rounds):
            timeout = deadline - time.monotonic()
            if not jobs or timeout <= 0:
                break
            called += len(jobs)
            need = np.maximum(policy.k_min - mask.sum(1).numpy(), 0)
            outcomes = swarm.run(
                call_many(
                    [
                        _forward_call(swarm, job, inputs, timeout, policy.transient_retries)
                        for job in jobs
                    ],
                    [job.rows for job in jobs],
                    n,
                    k_min=need,
                    timeout=timeout,
                    timeout_after_k_min=policy.timeout_after_k_min,
                    detect_anomalies=policy.detect_anomalies,
                )
            )
            _record(swarm, "forward", jobs, outcomes)
            for job, outcome in zip(jobs, outcomes, strict=True):
                if not outcome.ok or not outcome.tensors:
                    reasons.add(f"{outcome.reason}:{outcome.code}")
                    continue
                result = outcome.tensors[0]
                if tuple(result.shape) != (len(job.rows), *out_shape):
                    reasons.add("error:wrong output shape")
                    swarm.expert_failed(
                        job.uid, job.address, "forward", "error",
                        f"wrong output shape {list(result.shape)}",
                    )  # fmt: skip
                    continue
                outputs[job.rows, job.slots] = result.to(outputs.dtype)
                mask[job.rows, job.slots] = True
                answered_jobs.append(job)
            short = (mask.sum(1) < policy.k_min).nonzero().flatten().tolist()
            if not short or replan is None or round_ + 1 == rounds:
                break
            failed = {job.uid for job in jobs} - {job.uid for job in answered_jobs}
            free = [(~mask[b]).nonzero().flatten().tolist() for b in short]
            jobs = group_assignments(replan(short, failed, free))
        answered = mask.sum(1)
        if swarm.metrics is not None:
            for count, times in zip(*np.unique(answered.numpy(), return_counts=True), strict=True):
                for _ in range(int(times)):
                    swarm.metrics.experts_answered.observe(int(count))
        short_count = int((answered < policy.k_min).sum())
        if short_count and not policy.allow_zero_outputs:
            raise ExpertsUnavailableError(
                f"{short_count} of {n} samples got fewer than k_min={policy.k_min} expert answers "
                f"({called} expert calls, {len(answered_jobs)} answered; "
                f"failures: {', '.join(sorted(reasons)) or 'no live experts found'})"
            )
        ctx.save_for_backward(inputs)
        ctx.swarm, ctx.policy = swarm, policy
        ctx.jobs = answered_jobs
        ctx.mark_non_differentiable(mask)
        return outputs, mask

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        grad_outputs: torch.Tensor,
        _grad_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, ...]:
        (inputs,) = ctx.saved_tensors
        swarm: Swarm = ctx.swarm
        policy: CallPolicy = ctx.policy
        jobs: list[ExpertJob] = ctx.jobs
        grad_inputs = torch.zeros_like(inputs)
        if jobs:
            timeout = remaining_timeout(policy.backward_timeout)
            grad_outputs = grad_outputs.contiguous()
            calls = [
                (
                    lambda job=job: swarm.backward(
                        job.uid,
                        job.address,
                        [inputs[job.rows]],
                        [grad_outputs[job.rows, job.slots]],
                        timeout,
                    )
                )
                for job in jobs
            ]
            outcomes = swarm.run(
                call_many(
                    calls,
                    [job.rows for job in jobs],
                    inputs.shape[0],
                    k_min=policy.backward_k_min,
                    timeout=timeout,
                    timeout_after_k_min=policy.timeout_after_k_min,
                    detect_anomalies=policy.detect_anomalies,
                )
            )
            _record(swarm, "backward", jobs, outcomes)
            for job, outcome in zip(jobs, outcomes, strict=True):
                if outcome.reason != OK or not outcome.tensors:
                    continue
                grad = outcome.tensors[0]
                if grad.shape != (len(job.rows), *inputs.shape[1:]):
                    swarm.expert_failed(
                        job.uid, job.address, "backward", "error",
                        f"wrong gradient shape {list(grad.shape)}",
                    )  # fmt: skip
                    continue
                grad_inputs.index_add_(0, job.rows, grad.to(grad_inputs.dtype))
        return None, grad_inputs, None, None, None, None, None, None

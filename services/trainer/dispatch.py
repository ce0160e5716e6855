"""Sending each sample's rows to its chosen experts and the gradients back: one autograd node.

Forward: one request per distinct chosen expert carrying the rows of every sample that chose
it (of every input tensor: an expert may take several), all sent at once
(``expert_calls.call_many``). Samples left with fewer than ``k_min`` answers get a retry round
with replacement experts (the caller's ``replan``). The node returns, per expert output, a
tensor ``[n, k, ...]`` (zeros where an expert did not answer), and the answered mask.
Backward: only the experts that answered get a Backward call with the same input rows and
their rows of every output gradient; each returns input gradients (and applies one optimizer
step on its server). An expert that fails the backward counts as a constant: its samples get
no input gradient through it; a sample left with fewer than ``backward_k_min`` answers (of
the experts that answered its forward) fails the backward. The calls run on the swarm's
background loop because torch calls ``forward``/``backward`` synchronously.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import torch

from services.common.errors import CallError
from services.trainer.expert_calls import OK, CallOutcome, call_many, remaining_timeout
from services.trainer.options import CallPolicy
from services.trainer.swarm import Swarm

# A leaf that requires grad, so the node's backward runs even when the inputs do not need one
# (a first layer fed with raw data): the experts still have to receive their gradients.
DUMMY = torch.empty(0, requires_grad=True)

# Errors after which the same forward is worth sending again at once: the server refused
# before computing (overload, a blip). Forward is idempotent; Backward is never re-sent, since
# it may already have applied the expert's optimizer step.
TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


class ExpertsUnavailableError(RuntimeError):
    """Fewer than ``k_min`` experts answered for some samples (and zeros are not allowed), or
    fewer than ``backward_k_min`` answered their backward."""


@dataclass
class ExpertJob:
    uid: str
    address: str
    rows: torch.Tensor  # sample indices, int64
    slots: torch.Tensor  # which of the sample's k choices this expert is


# (sample, slot, uid, address): the sample's slot-th choice is that expert
Assignment = tuple[int, int, str, str]
# replan(samples, failed uids, free slots per sample) -> assignments of replacement experts
Replan = Callable[[list[int], set[str], list[list[int]]], list[Assignment]]


def group_jobs(assignments: Iterable[Assignment]) -> list[ExpertJob]:
    """One job (one request) per distinct expert, carrying every row that chose it."""
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


def plan_jobs(uids: Sequence[Sequence[str]], addresses: dict[str, str]) -> list[ExpertJob]:
    """The jobs of ``uids[sample][slot]`` (a beam search's choices)."""
    return group_jobs(
        (sample, slot, uid, addresses[uid])
        for sample, chosen in enumerate(uids)
        for slot, uid in enumerate(chosen)
    )


def _record(
    swarm: Swarm, method: str, jobs: Sequence[ExpertJob], outcomes: list[CallOutcome]
) -> None:
    for job, outcome in zip(jobs, outcomes, strict=True):
        if outcome.ok:
            swarm.backoff.success(job.uid, job.address)
            continue
        swarm.expert_failed(job.uid, job.address, method, outcome.reason, outcome.detail)
        swarm.backoff.failure(job.uid, job.address)


def _forward_call(
    swarm: Swarm, job: ExpertJob, inputs: Sequence[torch.Tensor], timeout: float, retries: int
) -> Callable[[], Awaitable[list[torch.Tensor]]]:
    async def call() -> list[torch.Tensor]:
        deadline = time.monotonic() + timeout
        rows = [x[job.rows] for x in inputs]
        for attempt in range(retries + 1):
            try:
                return await swarm.forward(
                    job.uid, job.address, rows, max(0.001, deadline - time.monotonic())
                )
            except CallError as exc:
                if attempt == retries or exc.code not in TRANSIENT:
                    raise
                swarm.record_failure("forward", "retried")
        raise AssertionError("unreachable")

    return call


def _wrong_shapes(
    tensors: Sequence[torch.Tensor], rows: int, shapes: Sequence[tuple[int, ...]]
) -> str:
    """'' when ``tensors`` are ``rows`` rows of ``shapes``, else what is wrong."""
    got = [tuple(t.shape) for t in tensors]
    want = [(rows, *shape) for shape in shapes]
    return "" if got == want else f"expected shapes {want}, got {got}"


@dataclass
class Gathered:
    """What the forward rounds collected: outputs per expert output, the answered mask."""

    outputs: list[torch.Tensor]
    mask: torch.Tensor
    answered: list[ExpertJob] = field(default_factory=list)
    reasons: set[str] = field(default_factory=set)
    called: list[ExpertJob] = field(default_factory=list)

    @classmethod
    def empty(
        cls, n: int, k: int, shapes: Sequence[tuple[int, ...]], dtype: torch.dtype
    ) -> Gathered:
        outputs = [torch.zeros(n, k, *shape, dtype=dtype) for shape in shapes]
        return cls(outputs, torch.zeros(n, k, dtype=torch.bool))

    def short(self, k_min: int) -> list[int]:
        return (self.mask.sum(1) < k_min).nonzero().flatten().tolist()

    def keep(self, swarm: Swarm, job: ExpertJob, outcome: CallOutcome) -> None:
        """One call's outcome: its rows when it answered with the right shapes."""
        if not outcome.ok or outcome.tensors is None:
            self.reasons.add(f"{outcome.reason}:{outcome.code}")
            return
        shapes = [tuple(o.shape[2:]) for o in self.outputs]
        problem = _wrong_shapes(outcome.tensors, len(job.rows), shapes)
        if problem:
            self.reasons.add("error:wrong output shape")
            swarm.expert_failed(job.uid, job.address, "forward", "error", problem)
            return
        for out, result in zip(self.outputs, outcome.tensors, strict=True):
            out[job.rows, job.slots] = result.to(out.dtype)
        self.mask[job.rows, job.slots] = True
        self.answered.append(job)

    def check(self, policy: CallPolicy) -> None:
        answered = self.mask.sum(1)
        short = int((answered < policy.k_min).sum())
        if short and not policy.allow_zero_outputs:
            raise ExpertsUnavailableError(
                f"{short} of {len(answered)} samples got fewer than k_min={policy.k_min} expert "
                f"answers ({len(self.called)} expert calls, {len(self.answered)} answered; "
                f"failures: {', '.join(sorted(self.reasons)) or 'no live experts found'})"
            )


def forward_rounds(
    swarm: Swarm,
    jobs: list[ExpertJob],
    inputs: Sequence[torch.Tensor],
    k: int,
    shapes: Sequence[tuple[int, ...]],
    policy: CallPolicy,
    replan: Replan | None,
) -> Gathered:
    """Call the jobs; give the samples still short of ``k_min`` retry rounds with the experts
    ``replan`` proposes instead of the failed ones, all within ``forward_timeout``."""
    n = inputs[0].shape[0]
    floating = next((x.dtype for x in inputs if x.is_floating_point()), torch.float32)
    gathered = Gathered.empty(n, k, shapes, floating)
    deadline = time.monotonic() + remaining_timeout(policy.forward_timeout)
    rounds = 1 + (policy.forward_retries if replan is not None else 0)
    for round_ in range(rounds):
        timeout = deadline - time.monotonic()
        if not jobs or timeout <= 0:
            break
        gathered.called.extend(jobs)
        need = np.maximum(policy.k_min - gathered.mask.sum(1).numpy(), 0)
        calls = [_forward_call(swarm, j, inputs, timeout, policy.transient_retries) for j in jobs]
        outcomes = swarm.run(
            call_many(
                calls,
                [job.rows for job in jobs],
                n,
                k_min=need,
                timeout=timeout,
                timeout_after_k_min=policy.timeout_after_k_min,
                judge=policy.judge("forward", jobs),
            )
        )
        _record(swarm, "forward", jobs, outcomes)
        for job, outcome in zip(jobs, outcomes, strict=True):
            gathered.keep(swarm, job, outcome)
        short = gathered.short(policy.k_min)
        if not short or replan is None or round_ + 1 == rounds:
            break
        failed = {job.uid for job in jobs} - {job.uid for job in gathered.answered}
        free = [(~gathered.mask[b]).nonzero().flatten().tolist() for b in short]
        jobs = group_jobs(replan(short, failed, free))
    return gathered


def backward_calls(
    swarm: Swarm,
    jobs: list[ExpertJob],
    inputs: Sequence[torch.Tensor],
    grad_outputs: Sequence[torch.Tensor],
    policy: CallPolicy,
) -> list[torch.Tensor | None]:
    """Gradients of the inputs (None for non-floating ones) through the experts that
    answered the forward; raises when a sample keeps fewer than ``backward_k_min`` of them."""
    n = inputs[0].shape[0]
    grads: list[torch.Tensor | None] = [
        torch.zeros_like(x) if x.is_floating_point() else None for x in inputs
    ]
    if not jobs:
        return grads
    timeout = remaining_timeout(policy.backward_timeout)
    grad_outputs = [g.contiguous() for g in grad_outputs]

    def call(job: ExpertJob) -> Callable[[], Awaitable[list[torch.Tensor]]]:
        return lambda: swarm.backward(
            job.uid,
            job.address,
            [x[job.rows] for x in inputs],
            [g[job.rows, job.slots] for g in grad_outputs],
            timeout,
        )

    outcomes = swarm.run(
        call_many(
            [call(job) for job in jobs],
            [job.rows for job in jobs],
            n,
            k_min=policy.backward_k_min,
            timeout=timeout,
            timeout_after_k_min=policy.timeout_after_k_min,
            judge=policy.judge("backward", jobs),
        )
    )
    _record(swarm, "backward", jobs, outcomes)
    wanted = torch.zeros(n, dtype=torch.long)  # experts that answered the sample's forward
    answered = torch.zeros(n, dtype=torch.long)
    shapes = [tuple(x.shape[1:]) for x in inputs]
    for job, outcome in zip(jobs, outcomes, strict=True):
        wanted.index_add_(0, job.rows, torch.ones_like(job.rows))
        if outcome.reason != OK or outcome.tensors is None:
            continue
        problem = _wrong_shapes(outcome.tensors, len(job.rows), shapes)
        if problem:
            swarm.expert_failed(job.uid, job.address, "backward", "error", problem)
            continue
        answered.index_add_(0, job.rows, torch.ones_like(job.rows))
        for grad, part in zip(grads, outcome.tensors, strict=True):
            if grad is not None:
                grad.index_add_(0, job.rows, part.to(grad.dtype))
    short = int((answered < torch.clamp(wanted, max=policy.backward_k_min)).sum())
    if short:
        raise ExpertsUnavailableError(
            f"{short} of {n} samples got fewer than backward_k_min={policy.backward_k_min} "
            "backward answers"
        )
    return grads


class RemoteMoECall(torch.autograd.Function):
    """``(dummy, swarm, jobs, k, shapes, policy, replan, called, *inputs) -> (*outputs, mask)``;
    use :func:`call_experts`."""

    @staticmethod
    def forward(
        ctx: Any,  # torch's FunctionCtx; this call's fields are set on it
        _dummy: torch.Tensor,
        swarm: Swarm,
        jobs: list[ExpertJob],
        k: int,
        shapes: tuple[tuple[int, ...], ...],
        policy: CallPolicy,
        replan: Replan | None,
        called: set[str],
        *inputs: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        inputs = tuple(x.detach() for x in inputs)
        gathered = forward_rounds(swarm, jobs, inputs, k, shapes, policy, replan)
        called.update(job.uid for job in gathered.called)
        if swarm.metrics is not None:
            for count in gathered.mask.sum(1).tolist():
                swarm.metrics.experts_answered.observe(int(count))
        gathered.check(policy)
        ctx.save_for_backward(*inputs)
        ctx.swarm, ctx.policy, ctx.jobs = swarm, policy, gathered.answered
        ctx.shapes = [o.shape for o in gathered.outputs]
        ctx.mark_non_differentiable(gathered.mask)
        return (*gathered.outputs, gathered.mask)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        inputs = ctx.saved_tensors
        grad_outputs = [  # the mask (last) has no gradient; an unused output gets zeros
            g if g is not None else torch.zeros(shape)
            for g, shape in zip(grads[:-1], ctx.shapes, strict=True)
        ]
        grad_inputs = backward_calls(ctx.swarm, ctx.jobs, inputs, grad_outputs, ctx.policy)
        return (None, None, None, None, None, None, None, None, *grad_inputs)


def call_experts(
    swarm: Swarm,
    jobs: list[ExpertJob],
    inputs: Sequence[torch.Tensor],
    k: int,
    shapes: Sequence[tuple[int, ...]],
    policy: CallPolicy,
    replan: Replan | None = None,
    called: set[str] | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Outputs ``[n, k, *shape]`` per expert output (``shapes``, without the batch dim), and
    the answered mask ``[n, k]``; differentiable with respect to the floating inputs.
    ``called`` receives the uid of every expert called, retry rounds included."""
    called = called if called is not None else set()
    result = RemoteMoECall.apply(
        DUMMY, swarm, jobs, k, tuple(shapes), policy, replan, called, *inputs
    )
    return list(result[:-1]), result[-1]

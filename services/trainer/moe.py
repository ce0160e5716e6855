"""Decentralized Mixture-of-Experts layers: experts on remote servers, found through the DHT.

Per forward pass (Learning@home): the gating function scores every grid coordinate; beam search
through the DHT finds each sample's ``k_best`` live experts with the highest summed scores; all
chosen experts are called at once (``dispatch.py``) and the layer waits as ``expert_calls.py``
describes; the output is the softmax-weighted average over the experts that answered, the gating
weights renormalised over those survivors. Inputs are ``[batch, h]`` or ``[batch, seq, h]``:
by default every row of the last dimension (every token) is routed on its own; with
``per_token=False`` a whole ``[seq, h]`` sample goes to experts whose input is a sequence (the
``transformer`` expert class), gated on its mean over the sequence. Experts may take more
inputs than ``x`` (``layer(x, mask)``: each extra tensor is cut by sample, or by token when
routing per token) and return several outputs (``output_shapes``); every output is averaged
with the same gating weights.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch
from torch import nn

from services.common.expert_keys import normalize_prefix
from services.trainer.beam_search import BeamSearchResult, beam_search
from services.trainer.dispatch import CallPolicy, Replan, call_experts, plan_jobs
from services.trainer.gating import (
    GridGating,
    expert_scores,
    grid_log_probs,
    switch_balancing_loss,
)
from services.trainer.swarm import Swarm

log = logging.getLogger(__name__)


class RemoteMixtureOfExperts(nn.Module):
    """A mixture layer over the grid ``uid_prefix`` with ``grid_size`` coordinates per dimension.

    ``k_best`` experts are chosen per sample. ``policy`` (:class:`CallPolicy`) says how long to
    wait and how many answers are enough: ``k_min`` of them must answer the forward within
    ``forward_timeout`` s (after ``k_min`` answers, stragglers get ``timeout_after_k_min`` s
    more), else :class:`~services.trainer.dispatch.ExpertsUnavailableError` is raised, or the
    sample gets the experts that did answer (zeros if none) when ``allow_zero_outputs``;
    ``backward_k_min`` / ``backward_timeout`` play the same roles for the backward pass.
    ``detect_anomalies`` (on by default) drops experts whose outputs or gradients are not
    finite or absurd (``answer_check.py``: over ``max_expert_value``, or an RMS over
    ``max_expert_rms_ratio`` x recent answers): a failed call, backed off. A forward
    refused with UNAVAILABLE or RESOURCE_EXHAUSTED is sent again at once up to
    ``transient_retries`` times (backwards never are: they may have applied the update).
    Samples left short of ``k_min`` get ``forward_retries`` more rounds with the next-best live
    experts (the failed ones excluded) within the same ``forward_timeout``.

    ``output_shapes``: the experts' outputs without the batch dimension, ``-1`` for a
    dimension the input gives (default: one output shaped like a routed row of ``x``, with
    ``out_features`` last).
    """

    def __init__(
        self,
        in_features: int,
        grid_size: Sequence[int],
        uid_prefix: str,
        k_best: int,
        *,
        swarm: Swarm,
        policy: CallPolicy | None = None,
        out_features: int | None = None,
        output_shapes: Sequence[Sequence[int]] | None = None,
        per_token: bool = True,
        beam_size: int | None = None,
    ) -> None:
        super().__init__()
        self.policy = policy or CallPolicy()
        if not 1 <= self.policy.k_min <= k_best:
            raise ValueError(f"need 1 <= k_min <= k_best, got {self.policy.k_min} and {k_best}")
        self.in_features = in_features
        self.out_features = out_features or in_features
        self.output_shapes = [tuple(s) for s in output_shapes] if output_shapes else None
        self.uid_prefix = normalize_prefix(uid_prefix)
        self.k_best, self.beam_size, self.per_token = k_best, beam_size, per_token
        self.swarm = swarm
        self.gating = GridGating(in_features, grid_size)
        self.experts_in_use: set[str] = set()  # answered during the last forward
        self.experts_called: set[str] = set()  # called during the last forward (retries too)

    @property
    def grid_size(self) -> tuple[int, ...]:
        return self.gating.grid_size

    def find_experts(self, grid_scores: Sequence[torch.Tensor]) -> BeamSearchResult:
        """Beam search on the swarm's loop, skipping experts in back-off."""
        started = time.perf_counter()
        backoff = self.swarm.backoff
        found = self.swarm.run(
            beam_search(
                [s.detach() for s in grid_scores],
                self.uid_prefix,
                self.k_best,
                self.swarm.children,
                beam_size=self.beam_size,
                exclude=backoff.is_skipped,
            )
        )
        skipped = backoff.skipped()
        if self.swarm.metrics is not None:
            self.swarm.metrics.beam_search.observe(time.perf_counter() - started)
            self.swarm.metrics.experts_skipped.set(len(skipped))
        if not bool(found.valid[:, 0].all()):
            self.swarm.warnings.warn(
                ("no_experts", self.uid_prefix),
                "no live expert found for some samples",
                grid=self.uid_prefix,
                samples=int((~found.valid[:, 0]).sum()),
                in_backoff=",".join(skipped[:10]),
            )
        return found

    def _samples(
        self, x: torch.Tensor, extra: Sequence[torch.Tensor]
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The routed units (rows, or whole sequences) of every input, and the gate input."""
        if self.per_token or x.ndim == 2:
            lead = x.shape[:-1]
            for t in extra:
                if tuple(t.shape[: len(lead)]) != tuple(lead):
                    raise ValueError(
                        f"extra input of shape {list(t.shape)} does not start with the routed "
                        f"dimensions {list(lead)} of x"
                    )
            samples = x.reshape(-1, self.in_features)
            rest = [t.reshape(-1, *t.shape[len(lead) :]) for t in extra]
            return [samples, *rest], samples
        for t in extra:
            if t.shape[0] != x.shape[0]:
                raise ValueError(f"extra input of {t.shape[0]} samples for {x.shape[0]}")
        return [x, *extra], x.mean(dim=1)

    def _shapes(self, samples: torch.Tensor) -> list[tuple[int, ...]]:
        row = (*samples.shape[1:-1], self.out_features)
        if self.output_shapes is None:
            return [row]
        given = samples.shape[1:]
        return [
            tuple(given[i] if d < 0 and i < len(given) else d for i, d in enumerate(shape))
            for shape in self.output_shapes
        ]

    def forward(
        self, x: torch.Tensor, *extra: torch.Tensor
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if x.ndim not in (2, 3) or x.shape[-1] != self.in_features:
            raise ValueError(
                f"expected input [batch, {self.in_features}] or [batch, seq, {self.in_features}], "
                f"got {list(x.shape)}"
            )
        inputs, gate_input = self._samples(x, extra)
        shapes = self._shapes(inputs[0])
        lead = x.shape[:-1] if self.per_token or x.ndim == 2 else x.shape[:1]
        if inputs[0].shape[0] == 0:
            outs = [x.new_zeros(*lead, *shape) for shape in shapes]
            return outs[0] if len(outs) == 1 else tuple(outs)
        grid_scores = self.gating(self._jitter(gate_input))
        found = self.find_experts(grid_scores)
        jobs = plan_jobs(found.uids, found.addresses)
        self.experts_called = set()
        outputs, mask = call_experts(
            self.swarm,
            jobs,
            inputs,
            self.k_best,
            shapes,
            self.policy,
            self._replanner(grid_scores, found),
            self.experts_called,
        )
        self.experts_in_use = {found.uids[b][j] for b, j in mask.nonzero().tolist()}
        self.routed(grid_scores, found)
        combined = [
            self.combine(grid_scores, found, out, mask).reshape(*lead, *shape)
            for out, shape in zip(outputs, shapes, strict=True)
        ]
        return combined[0] if len(combined) == 1 else tuple(combined)

    def _jitter(self, gate_input: torch.Tensor) -> torch.Tensor:
        """The gate's input (the Switch layer perturbs it while training)."""
        return gate_input

    def routed(self, grid_scores: Sequence[torch.Tensor], found: BeamSearchResult) -> None:
        """Called once per forward with the routing decision (the Switch layer's loss)."""

    def _replanner(self, grid_scores: Sequence[torch.Tensor], found: BeamSearchResult) -> Replan:
        """Replacement experts for samples whose experts failed: a beam search over those
        samples that skips the failed experts. Updates ``found`` (coords, valid, uids) in place,
        so the combination scores the experts that actually answered."""
        backoff = self.swarm.backoff

        def replan(
            samples: list[int], failed: set[str], free: list[list[int]]
        ) -> list[tuple[int, int, str, str]]:
            rows = torch.tensor(samples)
            retry = self.swarm.run(
                beam_search(
                    [s.detach()[rows] for s in grid_scores],
                    self.uid_prefix,
                    self.k_best,
                    self.swarm.children,
                    beam_size=self.beam_size,
                    exclude=lambda uid, address: uid in failed or backoff.is_skipped(uid, address),
                )
            )
            assignments = []
            for i, (sample, slots) in enumerate(zip(samples, free, strict=True)):
                taken = set(found.uids[sample])
                fresh = [j for j, uid in enumerate(retry.uids[i]) if uid not in taken]
                for slot, j in zip(slots, fresh, strict=False):
                    uid = retry.uids[i][j]
                    found.coords[sample, slot] = retry.coords[i, j]
                    found.valid[sample, slot] = True
                    row = found.uids[sample]
                    if slot < len(row):
                        row[slot] = uid
                    else:
                        row.append(uid)
                    assignments.append((sample, slot, uid, retry.addresses[uid]))
            return assignments

        return replan

    def combine(
        self,
        grid_scores: Sequence[torch.Tensor],
        found: BeamSearchResult,
        outputs: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """Softmax over the gating scores of the experts that answered; zero rows if none."""
        scores = expert_scores(grid_scores, found.coords, found.valid)
        logits = torch.where(mask, scores, torch.full_like(scores, -1e9))
        weights = torch.softmax(logits, dim=1) * mask
        weights = weights.view(*weights.shape, *([1] * (outputs.ndim - 2)))
        return (weights * outputs).sum(dim=1)


class RemoteSwitchMixtureOfExperts(RemoteMixtureOfExperts):
    """Top-1 routing (Switch Transformer, Fedus et al. 2021) with its load-balancing loss,
    router jitter and a utilisation record.

    The output is ``p(expert) * expert(x)`` where ``p`` is the softmax over the whole grid
    (a product of per-dimension softmaxes, see ``gating.grid_log_probs``), so the gating learns
    from the task loss. After each training forward, :attr:`aux_loss` holds the paper's
    balancing loss ``N * sum_i f_i * P_i`` over the grid's ``N`` experts
    (:func:`~services.trainer.gating.switch_balancing_loss`), 1 for a uniform routing; add
    ``balancing_weight * aux_loss`` to the task loss. While training, the router's input is
    multiplied by noise drawn from ``U(1 - jitter, 1 + jitter)`` (the paper's 1e-2), which
    spreads ties and near-ties over experts. :attr:`grid_utilization` is an exponential moving
    average of the fraction of samples routed to each coordinate, per dimension.
    """

    def __init__(
        self,
        in_features: int,
        grid_size: Sequence[int],
        uid_prefix: str,
        k_best: int = 1,
        *,
        utilization_alpha: float = 0.9,
        jitter: float = 0.01,
        **kwargs: object,
    ) -> None:
        super().__init__(in_features, grid_size, uid_prefix, k_best, **kwargs)  # type: ignore[arg-type]
        self.utilization_alpha = utilization_alpha
        self.jitter = jitter
        for d, g in enumerate(self.grid_size):
            self.register_buffer(f"utilization_{d}", torch.full((g,), 1.0 / g))
        self.aux_loss: torch.Tensor = torch.zeros(())

    @property
    def grid_utilization(self) -> list[torch.Tensor]:
        return [getattr(self, f"utilization_{d}") for d in range(len(self.grid_size))]

    def _jitter(self, gate_input: torch.Tensor) -> torch.Tensor:
        if not self.training or self.jitter <= 0:
            return gate_input
        noise = torch.empty_like(gate_input).uniform_(1 - self.jitter, 1 + self.jitter)
        return gate_input * noise

    def combine(
        self,
        grid_scores: Sequence[torch.Tensor],
        found: BeamSearchResult,
        outputs: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        probs = grid_log_probs(grid_scores, found.coords).exp() * mask
        # the best expert that answered (beam search sorts best first)
        first = mask.float().cumsum(1).eq(1) & mask
        weights = (probs * first).view(*probs.shape, *([1] * (outputs.ndim - 2)))
        return (weights * outputs).sum(dim=1)

    def routed(self, grid_scores: Sequence[torch.Tensor], found: BeamSearchResult) -> None:
        top1, valid = found.coords[:, 0], found.valid[:, 0]
        self.aux_loss = switch_balancing_loss(grid_scores, top1, valid)
        if self.training:
            chosen = top1[valid]
            for d, g in enumerate(self.grid_size):
                fraction = torch.bincount(chosen[:, d], minlength=g).float()
                fraction /= max(1, len(chosen))
                buf = getattr(self, f"utilization_{d}")
                buf.mul_(self.utilization_alpha).add_((1 - self.utilization_alpha) * fraction)

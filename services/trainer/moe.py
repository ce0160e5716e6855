"""Decentralized Mixture-of-Experts layers: experts on remote servers, found through the DHT.

Per forward pass (Learning@home): the gating function scores every grid coordinate; beam search
through the DHT finds each sample's ``k_best`` live experts with the highest summed scores; all
chosen experts are called at once (``dispatch.py``) and the layer waits as ``expert_calls.py``
describes; the output is the softmax-weighted average over the experts that answered, the gating
weights renormalised over those survivors. Inputs are ``[batch, h]`` or ``[batch, seq, h]``:
by default every row of the last dimension (every token) is routed on its own; with
``per_token=False`` a whole ``[seq, h]`` sample goes to experts whose input is a sequence (the
``transformer`` expert class), gated on its mean over the sequence.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch
from torch import nn

from services.trainer.beam_search import BeamSearchResult, beam_search, normalize_prefix
from services.trainer.dispatch import DUMMY, CallPolicy, RemoteMoECall, Replan, plan_jobs
from services.trainer.gating import GridGating, expert_scores, grid_log_probs
from services.trainer.swarm import Swarm

log = logging.getLogger(__name__)


class RemoteMixtureOfExperts(nn.Module):
    """A mixture layer over the grid ``uid_prefix`` with ``grid_size`` coordinates per dimension.

    ``k_best`` experts are chosen per sample; ``k_min`` of them must answer the forward within
    ``forward_timeout`` s (after ``k_min`` answers, stragglers get ``timeout_after_k_min`` s
    more), else :class:`~services.trainer.dispatch.ExpertsUnavailableError` is raised, or the
    sample gets the experts that did answer (zeros if none) when ``allow_zero_outputs``.
    ``backward_k_min`` / ``backward_timeout`` play the same roles for the backward pass.
    ``detect_anomalies`` drops experts whose outputs or gradients are not finite.
    A forward refused with UNAVAILABLE or RESOURCE_EXHAUSTED is sent again at once up to
    ``transient_retries`` times (backwards never are: they may have applied the update).
    Samples left short of ``k_min`` get ``forward_retries`` more rounds with the next-best live
    experts (the failed ones excluded) within the same ``forward_timeout``.
    """

    def __init__(
        self,
        in_features: int,
        grid_size: Sequence[int],
        uid_prefix: str,
        k_best: int,
        k_min: int = 1,
        *,
        swarm: Swarm,
        forward_timeout: float = 10.0,
        timeout_after_k_min: float = 1.0,
        backward_k_min: int = 1,
        backward_timeout: float = 10.0,
        forward_retries: int = 1,
        transient_retries: int = 1,
        allow_zero_outputs: bool = False,
        detect_anomalies: bool = False,
        out_features: int | None = None,
        per_token: bool = True,
        beam_size: int | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= k_min <= k_best:
            raise ValueError(f"need 1 <= k_min <= k_best, got k_min={k_min}, k_best={k_best}")
        self.in_features = in_features
        self.out_features = out_features or in_features
        self.uid_prefix = normalize_prefix(uid_prefix)
        self.k_best, self.beam_size, self.per_token = k_best, beam_size, per_token
        self.swarm = swarm
        self.policy = CallPolicy(
            k_min=k_min,
            forward_timeout=forward_timeout,
            timeout_after_k_min=timeout_after_k_min,
            backward_k_min=backward_k_min,
            backward_timeout=backward_timeout,
            forward_retries=forward_retries,
            transient_retries=transient_retries,
            allow_zero_outputs=allow_zero_outputs,
            detect_anomalies=detect_anomalies,
        )
        self.gating = GridGating(in_features, grid_size)
        self.experts_in_use: set[str] = set()

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim not in (2, 3) or x.shape[-1] != self.in_features:
            raise ValueError(
                f"expected input [batch, {self.in_features}] or [batch, seq, {self.in_features}], "
                f"got {list(x.shape)}"
            )
        if self.per_token or x.ndim == 2:
            samples = x.reshape(-1, self.in_features)
            gate_input = samples
        else:
            samples, gate_input = x, x.mean(dim=1)
        out_shape = (*samples.shape[1:-1], self.out_features)
        if samples.shape[0] == 0:
            return x.new_zeros(*x.shape[:-1], self.out_features)
        grid_scores = self.gating(gate_input)
        found = self.find_experts(grid_scores)
        jobs = plan_jobs(found.uids, found.addresses)
        outputs, mask = RemoteMoECall.apply(
            DUMMY,
            samples,
            self.swarm,
            jobs,
            self.k_best,
            out_shape,
            self.policy,
            self._replanner(grid_scores, found),
        )
        self.experts_in_use = {found.uids[b][j] for b, j in mask.nonzero().tolist()}
        combined = self.combine(grid_scores, found, outputs, mask)
        return combined.reshape(*x.shape[:-1], self.out_features)

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
    """Top-1 routing (Switch Transformer) with a load-balancing loss and a utilisation record.

    The output is ``p(expert) * expert(x)`` where ``p`` is the softmax over the whole grid
    (a product of per-dimension softmaxes, see ``gating.grid_log_probs``), so the gating learns
    from the task loss. After each training forward, :attr:`aux_loss` holds the balancing loss
    ``sum_d g_d * sum_c f_d[c] * P_d[c]`` (``f``: fraction of samples routed to coordinate ``c``
    of dimension ``d``, ``P``: mean gating probability), which is 1 for a uniform routing per
    dimension; add ``balancing_weight * aux_loss`` to the task loss. :attr:`grid_utilization`
    is an exponential moving average of ``f`` per dimension.
    """

    def __init__(
        self,
        in_features: int,
        grid_size: Sequence[int],
        uid_prefix: str,
        k_best: int = 1,
        k_min: int = 1,
        *,
        utilization_alpha: float = 0.9,
        **kwargs: object,
    ) -> None:
        super().__init__(in_features, grid_size, uid_prefix, k_best, k_min, **kwargs)  # type: ignore[arg-type]
        self.utilization_alpha = utilization_alpha
        for d, g in enumerate(self.grid_size):
            self.register_buffer(f"utilization_{d}", torch.full((g,), 1.0 / g))
        self.aux_loss: torch.Tensor = torch.zeros(())

    @property
    def grid_utilization(self) -> list[torch.Tensor]:
        return [getattr(self, f"utilization_{d}") for d in range(len(self.grid_size))]

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
        self._balance(grid_scores, found.coords[:, 0], found.valid[:, 0])
        return (weights * outputs).sum(dim=1)

    def _balance(
        self, grid_scores: Sequence[torch.Tensor], top1: torch.Tensor, valid: torch.Tensor
    ) -> None:
        losses = []
        for d, dim_scores in enumerate(grid_scores):
            g = dim_scores.shape[1]
            chosen = top1[valid, d]
            counts = torch.bincount(chosen, minlength=g).float()
            fraction = counts / max(1, int(valid.sum()))
            mean_prob = torch.softmax(dim_scores, dim=-1).mean(0)
            losses.append(g * (fraction * mean_prob).sum())
            if self.training:
                buf = getattr(self, f"utilization_{d}")
                buf.mul_(self.utilization_alpha).add_((1 - self.utilization_alpha) * fraction)
        self.aux_loss = torch.stack(losses).sum()

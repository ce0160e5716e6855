"""The gating function of a grid of experts: one linear score per coordinate per dimension.

A grid of ``32 x 32 x 32`` experts needs only ``96`` gating outputs instead of ``32,768``; an
expert's score is the sum of its coordinates' scores, which is what lets beam search find the
best experts dimension by dimension (see ``beam_search.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


class GridGating(nn.Module):
    """``x [n, in_features] -> [scores of dim 0 [n, g0], scores of dim 1 [n, g1], ...]``."""

    def __init__(self, in_features: int, grid_size: Sequence[int]) -> None:
        super().__init__()
        if not grid_size or any(int(g) < 1 for g in grid_size):
            raise ValueError(f"grid_size must be positive integers, got {list(grid_size)}")
        self.grid_size = tuple(int(g) for g in grid_size)
        self.proj = nn.Linear(in_features, sum(self.grid_size))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.proj(x).split(self.grid_size, dim=-1))


def expert_scores(
    grid_scores: Sequence[torch.Tensor], coords: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Differentiable scores ``[n, k]`` of the chosen experts; ``-inf`` where ``~valid``.

    ``coords[b, j, t]`` is the ``t``-th coordinate of sample ``b``'s ``j``-th expert.
    """
    safe = coords.clamp(min=0)
    total = torch.zeros(coords.shape[:2], dtype=grid_scores[0].dtype, device=coords.device)
    for t, dim_scores in enumerate(grid_scores):
        total = total + torch.gather(dim_scores, 1, safe[:, :, t])
    return total.masked_fill(~valid, float("-inf"))


def grid_log_probs(grid_scores: Sequence[torch.Tensor], coords: torch.Tensor) -> torch.Tensor:
    """``log p(expert)`` under the softmax over the whole grid, ``[n, k]``.

    The softmax of a sum of per-dimension scores over a product grid factorizes into a product
    of per-dimension softmaxes, so this needs no enumeration of the grid.
    """
    safe = coords.clamp(min=0)
    total = torch.zeros(coords.shape[:2], dtype=grid_scores[0].dtype, device=coords.device)
    for t, dim_scores in enumerate(grid_scores):
        total = total + torch.gather(torch.log_softmax(dim_scores, -1), 1, safe[:, :, t])
    return total


def switch_balancing_loss(
    grid_scores: Sequence[torch.Tensor], top1: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """The Switch Transformer's auxiliary loss ``N * sum_i f_i * P_i`` over a grid of ``N``
    experts: ``f_i`` the fraction of (valid) samples routed to expert ``i`` (``top1``, its grid
    coordinates ``[n, dims]``), ``P_i`` the mean router probability of expert ``i``, which for
    a grid is the product of its coordinates' per-dimension softmax probabilities.

    Only experts that got samples contribute (``f_i = 0`` for the others), so this costs a
    gather per routed expert instead of the full grid. Differentiable through ``P``.
    """
    n_experts = math.prod(s.shape[1] for s in grid_scores)
    chosen = top1[valid]
    if len(chosen) == 0:
        return grid_scores[0].new_zeros(())
    experts, counts = torch.unique(chosen, dim=0, return_counts=True)
    fraction = counts.float() / len(chosen)
    probs = torch.ones(int(valid.sum()), len(experts), dtype=grid_scores[0].dtype)
    for d, dim_scores in enumerate(grid_scores):
        probs = probs * torch.softmax(dim_scores[valid], dim=-1)[:, experts[:, d]]
    return n_experts * (fraction * probs.mean(0)).sum()

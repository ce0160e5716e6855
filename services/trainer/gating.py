"""The gating function of a grid of experts: one linear score per coordinate per dimension.

A grid of ``32 x 32 x 32`` experts needs only ``96`` gating outputs instead of ``32,768``; an
expert's score is the sum of its coordinates' scores, which is what lets beam search find the
best experts dimension by dimension (see ``beam_search.py``).
"""

from __future__ import annotations

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

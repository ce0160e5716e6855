"""The convergence benchmark's reference: the swarm's model trained centrally, in one process.

Same architecture as the trainer's ``mlp`` model (``services/trainer/models.py``: ``Linear ->
ReLU -> DMoE layers -> LayerNorm -> Linear``), same gating (``GridGating``, an expert's score
the sum of its coordinates' scores), same experts (the runtime's ``ffn`` class), same
combination (softmax over the chosen experts' scores), same data order for a seed. What differs
is everything the swarm adds: the experts live here, every one is always available, each step
uses the parameters the previous step left (nothing stale, nothing dropped), one Adam over all
parameters, and no RPC. Top-k is exact (every grid cell scored), which is what the swarm's beam
search finds when all experts are alive.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from services.expert.layers import FeedforwardBlock
from services.trainer.data import Dataset
from services.trainer.gating import GridGating, expert_scores


class LocalMixtureOfExperts(nn.Module):
    """Top-``k`` of a full grid of in-process ``ffn`` experts."""

    def __init__(self, hidden: int, grid_size: Sequence[int], k_best: int) -> None:
        super().__init__()
        self.gating = GridGating(hidden, grid_size)
        cells = list(itertools.product(*(range(g) for g in grid_size)))
        self.register_buffer("cells", torch.tensor(cells, dtype=torch.long), persistent=False)
        self.experts = nn.ModuleList(FeedforwardBlock(hidden) for _ in cells)
        self.k_best = min(k_best, len(cells))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid_scores = self.gating(x)
        n, cells = x.shape[0], self.cells
        everything = cells.unsqueeze(0).expand(n, -1, -1)
        all_scores = expert_scores(
            grid_scores, everything, torch.ones(everything.shape[:2], dtype=torch.bool)
        )
        top = all_scores.detach().topk(self.k_best, dim=1).indices  # [n, k] cell indices
        coords = cells[top]  # [n, k, dims]
        scores = expert_scores(grid_scores, coords, torch.ones(top.shape, dtype=torch.bool))
        weights = torch.softmax(scores, dim=1)
        out = torch.zeros_like(x)
        for e in top.unique().tolist():
            rows, slots = (top == e).nonzero(as_tuple=True)
            y = self.experts[e](x[rows])
            out = out.index_add(0, rows, weights[rows, slots].unsqueeze(1) * y)
        return out


class LocalMoEMLP(nn.Module):
    def __init__(
        self, inputs: int, hidden: int, classes: int, layers: int, grid: Sequence[int], k: int
    ) -> None:
        super().__init__()
        self.inp = nn.Linear(inputs, hidden)
        self.moe = nn.ModuleList(LocalMixtureOfExperts(hidden, grid, k) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        for layer in self.moe:
            h = layer(h)
        return self.out(self.norm(h))


@torch.no_grad()
def accuracy(model: nn.Module, dataset: Dataset, batch: int = 1000) -> float:
    model.eval()
    right = sum(int((model(x).argmax(-1) == y).sum()) for x, y in dataset.test_batches(batch))
    model.train()
    return right / len(dataset.test_y)


def train_local(
    dataset: Dataset,
    *,
    hidden: int,
    layers: int,
    grid: Sequence[int],
    k_best: int,
    lr: float,
    batch_size: int,
    updates: int,
    eval_every: int,
    seed: int,
    evaluate: Callable[[nn.Module], float] | None = None,
    decay: bool = True,
) -> dict:
    """Train ``updates`` steps (``decay``: the learning rate falls linearly to 0 at the last,
    as the swarm's trainers and experts do); the curve is ``[updates, accuracy, seconds of
    training]`` at every ``eval_every`` (evaluation time is not counted in the seconds)."""
    torch.manual_seed(seed)
    model = LocalMoEMLP(dataset.input_dim, hidden, dataset.num_classes, layers, grid, k_best)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    evaluate = evaluate or (lambda m: accuracy(m, dataset))
    curve, trained = [[0, evaluate(model), 0.0]], 0.0
    for step in range(1, updates + 1):
        started = time.perf_counter()
        x, y = dataset.batch_at((step - 1) * batch_size, batch_size)
        if decay:
            for group in optimizer.param_groups:
                group["lr"] = lr * (1 - (step - 1) / updates)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        trained += time.perf_counter() - started
        if step % eval_every == 0 or step == updates:
            curve.append([step, evaluate(model), round(trained, 3)])
    return {"model": model, "curve": curve, "train_seconds": trained}

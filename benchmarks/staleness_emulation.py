"""The delay study as an emulation: DMoE whose experts are stale against an all-stale dense model.

Learning@home's delay claim (sec. 4.2): under 1000 ms of network delay a DMoE keeps training
while the "Large FFN" baseline, every parameter of which is updated asynchronously by many
trainers, stalls. What delay does to asynchronous training is staleness: a trainer's gradient
is computed on parameters that other trainers have updated ``tau`` times since it read them.
Running 1000 ms swarms for thousands of updates does not fit the benchmark's budget on two
cores (a step takes ~8 s of waiting), so the study is emulated here, in one process, with
the benchmark's model and ``tau`` measured on the real services:

- ``dmoe``: :class:`local_moe.LocalMoEMLP`; the experts' parameters are ``tau_expert`` updates
  old when the gradient is computed (the measured load-weighted number of other trainers'
  updates an expert receives during one round trip); the trainer's own layers (input, gating,
  norm, output) are fresh, as a trainer's own copy is.
- ``dense``: the same model with one block of twice the width per layer (the same compute as
  top-4 of width ``h``: ``24 w^2`` multiply-adds per sample), every parameter ``tau_dense``
  updates old (the other trainers' updates during one round trip: the paper's all-stale
  baseline, whose parameters all live on remote servers).

Each update: read the parameters ``tau`` versions back, compute the gradient there, apply it to
the current parameters with Adam (what an asynchronous parameter server does with a late
gradient). Trade-off: one ``tau`` per model (the mean), not a distribution; averaging between
trainers is left out (the own layers are fresh instead).
"""

from __future__ import annotations

import time
from collections import deque

import torch
import torch.nn.functional as F
from local_moe import LocalMoEMLP, accuracy
from torch import nn

from services.trainer.data import Dataset


def build(model: str, dataset: Dataset, hidden: int, layers: int, grid: int, k: int) -> nn.Module:
    if model == "dense":
        return LocalMoEMLP(dataset.input_dim, 2 * hidden, dataset.num_classes, layers, [1], 1)
    return LocalMoEMLP(dataset.input_dim, hidden, dataset.num_classes, layers, [grid], k)


def stale_parameters(model: nn.Module, kind: str) -> list[nn.Parameter]:
    """What a trainer reads from remote servers: the experts (dmoe) or everything (dense)."""
    if kind == "dense":
        return list(model.parameters())
    return [p for layer in model.moe for p in layer.experts.parameters()]


def train_stale(
    dataset: Dataset,
    kind: str,
    tau: int,
    *,
    hidden: int,
    layers: int,
    grid: int,
    k_best: int,
    lr: float,
    batch_size: int,
    updates: int,
    eval_every: int,
    seed: int,
    eval_samples: int = 0,
) -> dict:
    """``updates`` asynchronous updates with gradients ``tau`` versions late; the curve is
    ``[updates, accuracy]`` on the first ``eval_samples`` test samples (0: all)."""
    torch.manual_seed(seed)
    model = build(kind, dataset, hidden, layers, grid, k_best)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    stale = stale_parameters(model, kind)
    versions: deque[list[torch.Tensor]] = deque(maxlen=max(0, tau) + 1)
    test = dataset
    if eval_samples:
        test = Dataset(dataset.name, dataset.task, dataset.train_x, dataset.train_y,
                       dataset.test_x[:eval_samples], dataset.test_y[:eval_samples],
                       dataset.num_classes)  # fmt: skip
    curve, started = [[0, accuracy(model, test)]], time.perf_counter()
    for step in range(1, updates + 1):
        versions.append([p.detach().clone() for p in stale])
        old = versions[0]  # tau versions back (fewer at the start)
        current = [p.data for p in stale]
        for p, value in zip(stale, old, strict=True):
            p.data = value
        x, y = dataset.batch_at((step - 1) * batch_size, batch_size)
        for group in optimizer.param_groups:  # linear decay to 0, as in the swarm
            group["lr"] = lr * (1 - (step - 1) / updates)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        for p, value in zip(stale, current, strict=True):
            p.data = value
        optimizer.step()
        if step % eval_every == 0 or step == updates:
            curve.append([step, accuracy(model, test)])
    final = accuracy(model, dataset)
    return {"curve": curve, "final_accuracy": final, "seconds": time.perf_counter() - started}

"""Robust aggregation of one part: the weighted mean, or CenteredClip when inputs disagree.

Each member of a group sends its slice of the part to the member that reduces it; the reducer
combines them here. Plain averaging lets one member move the result anywhere (1e30 in, 1e30/m
out). CenteredClip (Karimireddy et al. 2021; hivemind's BTARD work) bounds that: iterate
``v <- v + sum_i w_i clip(x_i - v, tau) / sum_i w_i`` where ``clip(d, tau) = d * min(1,
tau / ||d||)``, starting at the coordinate-wise median. The radius ``tau`` is
``clip_factor`` times the median distance of the inputs to that median, so it follows the
honest spread (a single outlier cannot inflate a median of 3 or more).

Exactness for honest inputs: when every input lies within ``tau`` of the weighted mean, the
mean is a fixed point of the iteration and is returned as is, so a group without outliers gets
the exact weighted mean. Otherwise the iteration runs to its fixed point. Bound (docs/averaging.md):
at the fixed point ``||v - mu_H|| <= (w_h / W_H) * tau`` for one hostile member of weight
``w_h`` against honest weight ``W_H``, while the honest inputs stay within ``tau`` of ``v``.

Weights are what members claim, so each is capped at ``weight_cap`` times the median weight:
a member claiming 1e9 samples counts as at most twice a typical member (by default).

Numpy only (no torch): the reducers of a benchmark swarm are cheap processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Aggregation:
    """How a reducer combines the inputs of its part."""

    robust: bool = True
    clip_factor: float = 3.0  # tau = clip_factor * median distance to the coordinate median
    weight_cap: float = 2.0  # a weight counts at most this times the median weight
    max_iterations: int = 20
    tolerance: float = 1e-4  # stop when a step moves v by less than this times tau


def capped_weights(weights: np.ndarray, cap: float) -> np.ndarray:
    """Weights clipped to ``cap * median`` (all equal when every weight is 0)."""
    weights = np.asarray(weights, dtype=np.float64)
    if not np.any(weights > 0):
        return np.ones_like(weights)
    if cap > 0:
        weights = np.minimum(weights, cap * float(np.median(weights)))
        if not np.any(weights > 0):  # the median was 0: most members processed nothing
            return np.ones_like(weights)
    return weights


def _median_rows(x: np.ndarray) -> np.ndarray:
    """The coordinate-wise median of the rows of ``x``, by a sorting network over rows
    (odd-even transposition: contiguous element-wise min/max, much faster than
    ``np.median(axis=0)`` on a few long rows)."""
    rows = [row.copy() for row in x]
    m = len(rows)
    for phase in range(m):
        for i in range(phase % 2, m - 1, 2):
            low = np.minimum(rows[i], rows[i + 1])
            np.maximum(rows[i], rows[i + 1], out=rows[i + 1])
            rows[i] = low
    if m % 2:
        return rows[m // 2]
    return (rows[m // 2 - 1] + rows[m // 2]) * np.float32(0.5)


def _distances(x: np.ndarray, point: np.ndarray) -> np.ndarray:
    out = np.empty(len(x))
    with np.errstate(over="ignore", invalid="ignore"):  # a 1e30 member: its distance is inf
        for i, row in enumerate(x):
            d = row - point
            out[i] = float(np.sqrt(np.dot(d, d)))
    return out


def _weighted_sum(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    acc: np.ndarray = np.zeros(
        x.shape[1], dtype=np.float64 if x.dtype == np.float64 else np.float32
    )
    for row, weight in zip(x, w, strict=True):
        if weight:
            acc += np.float32(weight) * row if acc.dtype == np.float32 else weight * row
    return acc


def aggregate(
    inputs: np.ndarray, weights: np.ndarray, how: Aggregation = Aggregation()
) -> tuple[np.ndarray, float]:
    """Combine ``inputs`` (members x elements, finite) with ``weights``; returns the result
    (float32) and the clip radius used (0.0 for a plain mean).

    Float32 arithmetic, row by row (contiguous): the mean's rounding error is a few float32
    ulps, far below float16's when the wire is compressed."""
    x = np.asarray(inputs, dtype=np.float32)
    w = capped_weights(weights, how.weight_cap if how.robust else 0.0)
    w = w / w.sum()
    mean = _weighted_sum(x, w)
    if not how.robust or len(x) < 3:
        # two members: nobody can tell which one is wrong; the mean is all there is
        return mean, 0.0
    start = _median_rows(x)
    tau = how.clip_factor * float(np.median(_distances(x, start)))
    if np.all(_distances(x, mean) <= tau):
        return mean, tau  # nobody is clipped: the exact weighted mean
    if tau <= 0.0:
        return start, tau  # most inputs agree exactly; the rest are outliers
    v = start.astype(np.float64)
    x64 = x.astype(np.float64)
    for _ in range(how.max_iterations):
        d = _distances(x64, v)
        scale = w * np.minimum(1.0, tau / np.maximum(d, 1e-300))
        step = _weighted_sum(x64, scale) - scale.sum() * v
        v = v + step
        if float(np.linalg.norm(step)) <= how.tolerance * tau:
            break
    return v.astype(np.float32), tau

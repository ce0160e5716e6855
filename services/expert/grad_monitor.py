"""Refuse a backward request whose grad_outputs dwarf the expert's recent ones.

Clipping bounds the norm of a step, not who decides its direction: a request with gradients
10^4 x larger than its batch-mates' is clipped *together* with them and the step follows it
alone, and Adam's second moment remembers it for thousands of steps. So each request is
measured before it joins a step: the root mean square of its grad_output values (its per-row
norm scaled by the row's size, so requests of any batch size or sequence length compare). It is
refused past ``ratio`` x the 90th percentile of the expert's last ``window`` requests' figures.

Why the 90th percentile and not the median: an expert's honest figures spread far below the
top (requests whose rows reached it with tiny gate weights), and the median sinks as the gates
sharpen, so honest requests land many times above it, while the 90th percentile tracks the
stable top. ``ratio`` 20 by default leaves a wide margin over the largest honest ratio measured
in training runs (the measurements: docs/expert.md, "Hostile peers").

Trade-offs. Nothing is checked during the warm-up (the first ``warmup`` requests), where
clipping alone bounds the damage. A request's figure is recorded capped at the limit it was held
to (a refused one too), and an overflowing (inf) figure not at all: a real shift of the honest
scale is accepted again after a tenth of a window instead of locking those clients out for good,
and a minority of hostile requests cannot move the percentile. The price of that liveness: a
peer sending more than a tenth of an expert's backward requests can raise its limit by up to
``ratio`` per ~``window / 10`` of them; that needs peer identities and rate limits, not a
statistic.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

import torch

WINDOW = 256
WARMUP = 64
QUANTILE = 0.9


def rms(requests: Sequence[Sequence[torch.Tensor]]) -> list[float]:
    """Root mean square of each request's floating tensors' values (inf if it overflows).

    One norm per tensor and a single ``tolist`` for the whole batch: few torch calls, each of
    which releases and re-takes the GIL. Half-precision tensors are measured in float32."""
    norms: list[torch.Tensor] = []
    counts: list[list[int]] = []
    for tensors in requests:
        sizes = []
        for t in tensors:
            if t.is_floating_point() and t.numel():
                wide = torch.float32 if t.element_size() < 4 else None
                norms.append(torch.linalg.vector_norm(t, dtype=wide))
                sizes.append(t.numel())
        counts.append(sizes)
    values = iter(torch.stack(norms).tolist() if norms else [])
    out = []
    for sizes in counts:
        squares = sum(next(values) ** 2 for _ in sizes)
        out.append(math.sqrt(squares / sum(sizes)) if sizes else 0.0)
    return out


class GradNormMonitor:
    """``screen(values)`` says which values are outliers, then records them."""

    def __init__(self, ratio: float, window: int = WINDOW, warmup: int = WARMUP) -> None:
        self.ratio = ratio
        self.warmup = warmup
        self._recent: deque[float] = deque(maxlen=window)

    def limit(self) -> float | None:
        """The largest accepted value now; None while warming up (or all recent values 0)."""
        if self.ratio <= 0 or len(self._recent) < self.warmup:
            return None
        ordered = sorted(self._recent)
        reference = ordered[int(QUANTILE * (len(ordered) - 1))]
        return self.ratio * reference if reference > 0 else None

    def screen(self, values: Sequence[float]) -> tuple[list[bool], float | None]:
        """(outlier flags, the limit they were held to). The limit comes from the requests
        before these, so a batch of large values cannot justify itself."""
        limit = self.limit()
        flags = [limit is not None and not value <= limit for value in values]
        for value in values:
            if math.isfinite(value):
                self._recent.append(value if limit is None else min(value, limit))
        return flags, limit

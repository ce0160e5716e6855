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
clipping alone bounds the damage. A refused request is not recorded at all (nor an overflowing,
inf, figure): a peer cannot talk the limit up with requests it was refused. An accepted figure
is recorded capped at ``GROWTH`` (2) x the percentile it was judged against, so accepted values
can raise the percentile by at most 2 x per ~``window / 10`` requests: an honest drift of the
scale follows (x2 per ~26 backwards is far faster than training moves), while a peer that sends
more than a tenth of an expert's requests, each just under the limit, needs ~26 requests per
doubling (1000 x the honest scale: ~260 of them) instead of 20 x per 26 when figures were
recorded at the limit. The price: a sudden honest jump of more than ``ratio`` x (a restarted
swarm with another loss scale) is refused until an operator raises ``--max-grad-norm-ratio``
or restarts the expert; one peer's share of the updates is bounded by identities and
``--max-caller-share`` (``caller_share.py``), not by a statistic.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

import torch

WINDOW = 256
WARMUP = 64
QUANTILE = 0.9
GROWTH = 2.0  # an accepted figure is recorded at most GROWTH x the reference


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

    def reference(self) -> float | None:
        """The 90th percentile of the recorded figures; None while warming up (or 0)."""
        if self.ratio <= 0 or len(self._recent) < self.warmup:
            return None
        ordered = sorted(self._recent)
        reference = ordered[int(QUANTILE * (len(ordered) - 1))]
        return reference if reference > 0 else None

    def limit(self) -> float | None:
        """The largest accepted value now; None while warming up (or all recent values 0)."""
        reference = self.reference()
        return None if reference is None else self.ratio * reference

    def screen(self, values: Sequence[float]) -> tuple[list[bool], float | None]:
        """(outlier flags, the limit they were held to). The limit comes from the requests
        before these, so a batch of large values cannot justify itself; only accepted values
        are recorded (capped, see the module docstring)."""
        reference = self.reference()
        limit = None if reference is None else self.ratio * reference
        flags = [limit is not None and not value <= limit for value in values]
        for value, outlier in zip(values, flags, strict=True):
            if outlier or not math.isfinite(value):
                continue
            self._recent.append(value if reference is None else min(value, GROWTH * reference))
        return flags, limit

"""Judging an expert's answer before the trainer uses it: non-finite or absurd is a failure.

An expert server is anybody who declared a uid, and its outputs (forward) and input gradients
(backward) flow straight into the trainer's loss, its gating and its optimizer. One NaN makes
the loss NaN, the gating weights NaN at the next step and the beam search blind for good; a
finite 1e30 overflows Adam's second moment. So every answer is judged, on tensors already in
memory (``aminmax`` and a float32 norm per tensor, one ``tolist``), and a bad one is a failed
expert like a timeout: masked, backed off, counted in
``dmoe_trainer_expert_failures_total{reason="anomaly"}`` and logged (rate-limited).

"Absurd" is defined twice, because the first answers have no reference:

- an absolute cap: any value with ``|v| > max_value`` (``--max-expert-value``, 1e5): no
  activation or gradient of a trained network is near it, and float16 compression ends at
  65504 anyway;
- a relative one: the answer's root mean square over ``ratio`` (``--max-expert-rms-ratio``,
  100) x the 90th percentile of the last 256 accepted answers of the same grid and method
  (after 64 of them; the expert's own request screen, ``services.expert.grad_monitor``, with
  the same rules: refused answers are not recorded, accepted ones at most 2 x the reference,
  so a hostile expert cannot talk the reference up, and it cannot pull it down unless it gives
  more than 90% of the answers). 100, not the expert side's 20: honest experts differ from
  each other more than one expert's requests do, and a false positive costs one answer.

Trade-off: a well-formed, finite, plausible-scale but wrong answer passes (docs/security.md,
out of scope).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from services.expert.grad_monitor import GradNormMonitor

MAX_VALUE = 1e5
RMS_RATIO = 100.0


class AnswerCheck:
    """``judge(key, tensors)``: '' when the answer is usable, else what is wrong with it."""

    def __init__(self, max_value: float = MAX_VALUE, ratio: float = RMS_RATIO) -> None:
        self.max_value = max_value
        self.ratio = ratio
        self._monitors: dict[object, GradNormMonitor] = {}

    def judge(self, key: object, tensors: Sequence[torch.Tensor]) -> str:
        floating = [t for t in tensors if t.is_floating_point() and t.numel()]
        if not floating:
            return ""
        with torch.no_grad():
            parts = []
            for t in floating:  # aminmax (NaN propagates) is ~15 x faster than an inf-norm
                low, high = torch.aminmax(t)
                parts += [
                    low.float(),
                    high.float(),
                    torch.linalg.vector_norm(t, dtype=torch.float32),
                ]
            figures = torch.stack(parts).tolist()
        extremes = [abs(v) for v in figures[0::3] + figures[1::3]]
        if not all(math.isfinite(v) for v in extremes):
            return "non-finite values"
        largest = max(extremes)
        if self.max_value > 0 and largest > self.max_value:
            return f"a value of {largest:.3g}, over --max-expert-value {self.max_value:g}"
        squares = sum(n * n for n in figures[2::3])
        if not math.isfinite(squares):  # float32 norms overflow past ~1e19 (no cap set)
            return "values whose norm overflows"
        if self.ratio <= 0:
            return ""
        rms = math.sqrt(squares / sum(t.numel() for t in floating))
        monitor = self._monitors.get(key)
        if monitor is None:
            monitor = self._monitors[key] = GradNormMonitor(self.ratio)
        (outlier,), limit = monitor.screen([rms])
        if outlier:
            return (
                f"an RMS of {rms:.3g}, over --max-expert-rms-ratio {self.ratio:g} x the 90th "
                f"percentile of recent answers (limit {limit:.3g})"
            )
        return ""

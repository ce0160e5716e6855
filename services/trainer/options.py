"""What a DMoE layer is built with: its grid and routing (``MoEOptions``) and how long it waits
for its experts (``CallPolicy``). These dataclasses are the trainer flags' defaults.

Their own module, free of torch, so ``python -m services.trainer --help`` builds its flags
from them without importing torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

# An expert answer holding a larger |value| is absurd; so is one whose RMS exceeds RMS_RATIO x
# the 90th percentile of recent honest answers (services/trainer/answer_check.py).
MAX_VALUE = 1e5
RMS_RATIO = 100.0


@dataclass
class CallPolicy:
    """How a mixture layer waits for its experts (see ``RemoteMixtureOfExperts``).

    Its defaults are the trainer's flags' defaults (``python -m services.trainer`` builds its
    parser from them): 5 s for a forward or a backward, then 0.5 s for stragglers once
    ``k_min`` experts answered.
    """

    k_min: int = 1
    forward_timeout: float = 5.0
    timeout_after_k_min: float = 0.5
    backward_k_min: int = 1
    backward_timeout: float = 5.0
    forward_retries: int = 1
    transient_retries: int = 1
    allow_zero_outputs: bool = False
    detect_anomalies: bool = True
    max_expert_value: float = MAX_VALUE
    max_expert_rms_ratio: float = RMS_RATIO
    # the running figures of honest answers (answer_check.py), shared by the layers using it;
    # made on first use, so this module (and the trainer's --help) stays free of torch
    answers: Any = field(default=None, init=False, repr=False, compare=False)

    def judge(self, method: str, jobs: Sequence[Any]) -> Callable[[int, list[Any]], str] | None:
        """How the answers of ``jobs`` (``ExpertJob``s) are judged: keyed by grid (a uid up to
        its first dot) and method; None when anomalies are not detected."""
        if not self.detect_anomalies:
            return None
        if self.answers is None:
            from services.trainer.answer_check import AnswerCheck

            self.answers = AnswerCheck(self.max_expert_value, self.max_expert_rms_ratio)
        answers = self.answers
        return lambda i, tensors: answers.judge((jobs[i].uid.split(".", 1)[0], method), tensors)


@dataclass
class MoEOptions:
    """Everything a DMoE layer needs besides its width; its defaults are the trainer's flags'."""

    grid_size: tuple[int, ...] = (4, 4)
    uid_prefix: str = "ffn"
    kind: str = "mixture"  # mixture | switch
    k_best: int = 4
    policy: CallPolicy = field(default_factory=CallPolicy)  # k_min, timeouts, retries

    def layer_prefix(self, index: int) -> str:
        base = self.uid_prefix.rstrip(".")
        return f"{base}." if index == 0 else f"{base}{index}."

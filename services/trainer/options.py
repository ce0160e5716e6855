"""What a DMoE layer is built with: its grid and routing (``MoEOptions``) and how long it waits
for its experts (``CallPolicy``). These dataclasses are the trainer flags' defaults.

Their own module, free of torch, so ``python -m services.trainer --help`` builds its flags
from them without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
    detect_anomalies: bool = False


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

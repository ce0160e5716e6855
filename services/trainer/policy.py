"""How long a mixture layer waits for its experts: one dataclass, the trainer flags' defaults.

Its own module, free of torch, so ``python -m services.trainer --help`` builds its flags from
it without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CallPolicy:
    """How a mixture layer waits for its experts (see ``RemoteMixtureOfExperts``).

    These defaults are the trainer's flags' defaults too (``python -m services.trainer``
    builds its parser from them): 5 s for a forward or backward, then 0.5 s for stragglers once
    ``k_min`` experts answered, what a swarm of CPU experts answers well within.
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


__all__ = ["CallPolicy"]

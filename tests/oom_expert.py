"""An expert class that runs out of memory on large batches (``--custom-module``), for the tests
and for ``scripts/gpu_expert_check.py``.

Expert class ``oom``: Linear -> ReLU -> Linear, like a small ``ffn``. Past ``BACKWARD_ROWS`` rows
its backward pass asks the allocator for a petabyte *after* the second layer's gradients were
accumulated (the failure a real expert meets half-way through autograd); past ``FORWARD_ROWS``
rows already its forward does. The allocation really fails, on any device: the CPU allocator
raises a ``RuntimeError`` that says it cannot allocate, CUDA's a ``torch.OutOfMemoryError``.
"""

from __future__ import annotations

import torch
from torch import nn

from services.expert.layers import Schema, register_expert_class

BACKWARD_ROWS = 16  # a batch with more rows runs out of memory in its backward pass
FORWARD_ROWS = 32  # ... and with more than this, already in its forward pass
_PETABYTE = 1 << 50


def _exhaust(device: torch.device) -> None:
    torch.empty(_PETABYTE, dtype=torch.uint8, device=device)


class _RunsOutInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def, override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def, override]
        if grad.shape[0] > BACKWARD_ROWS:
            _exhaust(grad.device)
        return grad


def _vector(h: int) -> list[Schema]:
    return [Schema((h,))]


@register_expert_class("oom", inputs=_vector, outputs=_vector)
class OutOfMemoryBlock(nn.Module):
    def __init__(self, hidden_dim: int) -> None:
        super().__init__()
        self.first = nn.Linear(hidden_dim, hidden_dim)
        self.second = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > FORWARD_ROWS:
            _exhaust(x.device)
        return self.second(_RunsOutInBackward.apply(torch.relu(self.first(x))))

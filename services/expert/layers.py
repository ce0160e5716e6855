"""Expert classes by name: the built-in blocks and user classes from ``--custom-module``.

An expert class is a ``torch.nn.Module`` factory taking ``hidden_dim`` plus the schemas of its
inputs and outputs (shape without the batch dimension, ``-1`` for a dimension of any size).
Schemas are declared rather than inferred so the server can validate a request before it is
batched, without running the module.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass(frozen=True)
class Schema:
    """One tensor argument without its batch dimension; ``-1`` marks a free dimension."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32

    def sample(self, batch: int, free_dim: int = 3) -> torch.Tensor:
        """A random tensor matching the schema (free dimensions get ``free_dim``)."""
        shape = (batch, *(free_dim if d < 0 else d for d in self.shape))
        if self.dtype == torch.bool:
            return torch.rand(shape) < 0.8
        if self.dtype.is_floating_point:
            return torch.randn(shape, dtype=self.dtype)
        return torch.randint(0, 8, shape, dtype=self.dtype)


SchemaFn = Callable[[int], list[Schema]]


@dataclass(frozen=True)
class ExpertClass:
    name: str
    build: Callable[[int], nn.Module]
    inputs: SchemaFn
    outputs: SchemaFn


_REGISTRY: dict[str, ExpertClass] = {}


def register_expert_class(
    name: str, *, inputs: SchemaFn, outputs: SchemaFn
) -> Callable[[Callable[[int], nn.Module]], Callable[[int], nn.Module]]:
    """Decorator registering ``build(hidden_dim) -> nn.Module`` as expert class ``name``.

    A custom module file (``--custom-module path.py``) uses it at import time.
    """

    def decorate(build: Callable[[int], nn.Module]) -> Callable[[int], nn.Module]:
        if name in _REGISTRY and _REGISTRY[name].build is not build:
            raise ValueError(f"expert class {name!r} is already registered")
        _REGISTRY[name] = ExpertClass(name, build, inputs, outputs)
        return build

    return decorate


def get_expert_class(name: str) -> ExpertClass:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"unknown expert class {name!r} (known: {known})") from None


def load_custom_module(path: str | Path) -> None:
    """Import a user file so its ``register_expert_class`` calls run."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"custom module {path} does not exist")
    name = f"dmoe_custom_expert_{abs(hash(str(path.resolve())))}"
    if name in sys.modules:  # already imported (several servers in one process)
        return
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot import custom module {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


def _vector(h: int) -> list[Schema]:
    return [Schema((h,))]


@register_expert_class("ffn", inputs=_vector, outputs=_vector)
class FeedforwardBlock(nn.Module):
    """Linear h->4h, LayerNorm, ReLU, Linear 4h->4h, LayerNorm, ReLU, Linear 4h->h, + input."""

    def __init__(self, hidden_dim: int) -> None:
        super().__init__()
        h = hidden_dim
        self.ffn = nn.Sequential(
            nn.Linear(h, 4 * h),
            nn.LayerNorm(4 * h),
            nn.ReLU(),
            nn.Linear(4 * h, 4 * h),
            nn.LayerNorm(4 * h),
            nn.ReLU(),
            nn.Linear(4 * h, h),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(x)


def _sequence(h: int) -> list[Schema]:
    return [Schema((-1, h))]


def _masked_sequence(h: int) -> list[Schema]:
    return [Schema((-1, h)), Schema((-1,), torch.bool)]


@register_expert_class("transformer", inputs=_masked_sequence, outputs=_sequence)
class TransformerBlock(nn.Module):
    """One pre-norm encoder block over [batch, seq, h]: self-attention then a 4h FFN.

    The second input is the attention mask ``[batch, seq]``: True for real tokens, False for
    padding, which no token attends to (a row with no real token attends to all, rather than
    to nothing, which would be NaN). No dropout, so a remote call computes exactly what a
    local one does.
    """

    def __init__(self, hidden_dim: int, num_heads: int = 0) -> None:
        super().__init__()
        h = hidden_dim
        heads = num_heads or next(n for n in (8, 4, 2, 1) if h % n == 0)
        self.norm1 = nn.LayerNorm(h)
        self.attn = nn.MultiheadAttention(h, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(h)
        self.ffn = nn.Sequential(nn.Linear(h, 4 * h), nn.GELU(), nn.Linear(4 * h, h))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        padding = ~mask
        padding = padding & ~padding.all(dim=1, keepdim=True)
        y = self.norm1(x)
        x = x + self.attn(y, y, y, key_padding_mask=padding, need_weights=False)[0]
        return x + self.ffn(self.norm2(x))


@register_expert_class("nop", inputs=_vector, outputs=_vector)
class NopExpert(nn.Module):
    """Identity without parameters: measures the runtime, not the compute."""

    def __init__(self, hidden_dim: int) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


def _dropout_inputs(h: int) -> list[Schema]:
    return [Schema((h,)), Schema((2 * h,), torch.bool)]


@register_expert_class("det_dropout", inputs=_dropout_inputs, outputs=_vector)
class DeterministicDropoutBlock(nn.Module):
    """Linear h->2h, dropout with an explicit boolean keep-mask input, Linear 2h->h.

    The mask travels with the request, so forward and the recomputed forward of backward
    drop the same units and results are reproducible anywhere.
    """

    def __init__(self, hidden_dim: int, drop_prob: float = 0.2) -> None:
        super().__init__()
        self.drop_prob = drop_prob
        self.linear_in = nn.Linear(hidden_dim, 2 * hidden_dim)
        self.linear_out = nn.Linear(2 * hidden_dim, hidden_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.linear_in(x) * mask.to(x.dtype) / (1.0 - self.drop_prob)
        return self.linear_out(hidden)


def num_parameters(module: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in module.parameters())

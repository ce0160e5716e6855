"""One hosted expert: its module, optimizer, learning-rate schedule, and the two computations.

``forward`` runs without autograd. ``backward`` recomputes the forward with autograd (the
server keeps no activations between calls, so a lost or never-sent backward costs nothing),
backpropagates the caller's output gradients, applies one optimizer step, and returns the
gradients of the inputs. Requests are validated against the declared schemas *before* they
are batched, so a bad request never mixes into a batch or touches the weights.

Values that pass validation can still be hostile (finite but huge gradients), so a step is
all-or-nothing: a gradient norm that overflows refuses it before it is taken, and a step that
leaves any parameter or optimizer-state value non-finite is undone exactly (``StepGuard``).
Either raises :class:`~services.expert.errors.StepRejected`, which the batch runner
(``batch_runner.py``) answers by isolating the culprit request. A backward that fails half-way
(out of memory in autograd or in the step) leaves no gradient behind for the next batch's step.

Tensors: ``forward`` and ``backward`` take inputs on any device (the batch runner hands them
over already on the expert's device) and return their outputs on the expert's device; moving
them back to the host is the caller's (``batch_runner.py`` stages them through pinned memory on
CUDA).
"""

from __future__ import annotations

import copy
import logging
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from services.common.tensor_codec import dtype_name
from services.expert.errors import StepRejected, invalid
from services.expert.layers import ExpertClass, Schema, num_parameters
from services.expert.step_guard import StepGuard

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "adam"  # adam | sgd
    lr: float = 1e-3
    momentum: float = 0.0  # sgd only
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warm-up from 0 to lr
    total_steps: int = 0  # > 0: linear decay to 0 at this step
    clip_grad_norm: float = 1.0  # > 0: clip the global gradient norm of each step to this


def make_optimizer(params: list[nn.Parameter], config: OptimizerConfig) -> torch.optim.Optimizer:
    """The optimizer, fused where torch supports it (one kernel over all parameters).

    The step is a fixed cost per batch, so the per-parameter loop's overhead matters most for
    the small batches a swarm produces (figures: docs/expert.md, "Batching and scheduling").
    """
    if config.name == "adam":
        kwargs: dict[str, Any] = {"lr": config.lr, "weight_decay": config.weight_decay}
        cls: Callable[..., torch.optim.Optimizer] = torch.optim.Adam
    elif config.name == "sgd":
        kwargs = {"lr": config.lr, "momentum": config.momentum, "weight_decay": config.weight_decay}
        cls = torch.optim.SGD
    else:
        raise ValueError(f"unknown optimizer {config.name!r} (adam, sgd)")
    try:
        return cls(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return cls(params, foreach=True, **kwargs)


def lr_factor(config: OptimizerConfig, step: int) -> float:
    """Multiplier of ``lr`` at ``step``: linear warm-up, then optional linear decay."""
    if config.warmup_steps > 0 and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.total_steps > 0:
        span = max(1, config.total_steps - config.warmup_steps)
        return max(0.0, 1.0 - (step - config.warmup_steps) / span)
    return 1.0


def preload_autograd() -> None:
    """Import what ``torch.autograd.backward`` imports lazily on its first call.

    With explicit output gradients, the first backward imports
    ``torch.fx.experimental.symbolic_shapes`` (and sympy), holding the GIL for a noticeable
    time (docs/expert.md), so the first Backward request would stall the event loop and every
    other request with it. The server pays it once at start-up instead.
    """
    import torch.fx.experimental.symbolic_shapes  # noqa: F401


def _as_list(out: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else list(out)


def _host_copy(value: Any) -> Any:
    """``value`` with every tensor copied into host memory; containers are rebuilt (keeping a
    state dict's ``_metadata``), other values deep-copied."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        out = type(value)((k, _host_copy(v)) for k, v in value.items())
        if hasattr(value, "_metadata"):
            out._metadata = copy.deepcopy(value._metadata)  # type: ignore[attr-defined]
        return out
    if isinstance(value, list | tuple):
        return type(value)(_host_copy(v) for v in value)
    return copy.deepcopy(value)


class ExpertBackend:
    """An expert and its training state. Not thread-safe by itself: callers hold ``lock``."""

    def __init__(
        self,
        uid: str,
        expert_class: ExpertClass,
        hidden_dim: int,
        optimizer: OptimizerConfig,
        *,
        device: str = "cpu",
        max_batch_size: int = 2048,
        max_free_dim: int = 1024,
    ) -> None:
        self.uid = uid
        self.expert_class = expert_class
        self.hidden_dim = hidden_dim
        self.device = torch.device(device)
        self.max_batch_size = max_batch_size
        self.max_free_dim = max_free_dim
        self.module = expert_class.build(hidden_dim).to(self.device).train()
        self.input_schemas: list[Schema] = expert_class.inputs(hidden_dim)
        self.output_schemas: list[Schema] = expert_class.outputs(hidden_dim)
        self.optimizer_config = optimizer
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, optimizer) if self.params else None
        self.guard = StepGuard(self.params, self.optimizer) if self.optimizer else None
        self.steps = 0
        self.num_parameters = num_parameters(self.module)
        self.lock = threading.Lock()

    # ---- validation (event loop, before batching) ----

    def validate(self, tensors: Sequence[Any], backward: bool) -> int:
        """Check count, dtype, rank, shape and batch size from metadata only; return the rows.

        ``tensors`` are anything with ``.shape`` and ``.dtype`` (``WireTensor`` on the server),
        so this runs on the event loop without a single torch call. Values are checked by
        :meth:`check_finite` on the compute thread, before the batch is formed.
        """
        schemas = self.input_schemas + (self.output_schemas if backward else [])
        if len(tensors) != len(schemas):
            what = (
                f"{len(self.input_schemas)} inputs then {len(self.output_schemas)} grad_outputs"
                if backward
                else f"{len(self.input_schemas)} inputs"
            )
            raise invalid(f"expert {self.uid} takes {what}, got {len(tensors)} tensors")
        rows: int | None = None
        for i, (tensor, schema) in enumerate(zip(tensors, schemas, strict=True)):
            name = self._name(i)
            shape = tuple(tensor.shape)
            want = "[batch, " + ", ".join("*" if d < 0 else str(d) for d in schema.shape) + "]"
            if tensor.dtype != schema.dtype:
                raise invalid(
                    f"{name}: expected dtype {dtype_name(schema.dtype)}, "
                    f"got {dtype_name(tensor.dtype)}"
                )
            if len(shape) != len(schema.shape) + 1:
                raise invalid(
                    f"{name}: expected rank {len(schema.shape) + 1} {want}, got shape {list(shape)}"
                )
            for a, w in zip(shape[1:], schema.shape, strict=True):
                if w >= 0 and a != w:
                    raise invalid(f"{name}: expected shape {want}, got {list(shape)}")
                if w < 0 and not 1 <= a <= self.max_free_dim:
                    raise invalid(
                        f"{name}: free dimension of size {a} in shape {list(shape)}; it must be "
                        f"at least 1 and at most {self.max_free_dim} (--max-free-dim)",
                        reason="free_dim_too_large" if a else "malformed",
                    )
            if rows is None:
                rows = shape[0]
            elif shape[0] != rows:
                raise invalid(f"{name}: batch dimension {shape[0]} differs from {rows}")
        rows = rows or 0
        if rows == 0:
            raise invalid("empty batch: the batch dimension must be at least 1")
        if rows > self.max_batch_size:
            raise invalid(
                f"request has {rows} rows but expert {self.uid} takes at most "
                f"{self.max_batch_size} per batch (--max-batch-size); split the request",
                reason="batch_too_large",
            )
        return rows

    def _name(self, index: int) -> str:
        n_in = len(self.input_schemas)
        return f"inputs[{index}]" if index < n_in else f"grad_outputs[{index - n_in}]"

    def check_finite(self, tensors: Sequence[torch.Tensor]) -> None:
        """Refuse NaN and infinities (compute thread, before the values join a batch).

        Fast path: NaN and infinities propagate through a sum, so a finite sum proves every
        value finite, in one vectorized reduction instead of ``isfinite(t).all()``'s bool
        tensor per element and a second reduction (far cheaper: docs/expert.md). A non-finite
        sum (a bad value, or an overflow of large finite values) falls back to the exact
        check, so large finite values are never refused.
        """
        for i, tensor in enumerate(tensors):
            if not tensor.is_floating_point() or math.isfinite(tensor.sum().item()):
                continue
            if not bool(torch.isfinite(tensor).all()):
                raise invalid(
                    f"{self._name(i)}: contains NaN or infinite values", reason="nonfinite"
                )

    # ---- compute (a scheduler worker thread, with ``lock`` held) ----

    def forward(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The outputs, on the expert's device."""
        with torch.no_grad():
            return _as_list(self.module(*(self._on_device(x) for x in inputs)))

    def backward(
        self, inputs: list[torch.Tensor], grad_outputs: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """The inputs' gradients (on the expert's device), after one optimizer step.

        Parameter gradients never outlive the call: a step, a refused step and a failure
        half-way (an out-of-memory error in autograd or in the step) all clear them, so the
        next batch's step applies only its own."""
        try:
            grads = self._input_grads(inputs, grad_outputs)
            self._step()
            return grads
        finally:
            for param in self.params:
                param.grad = None

    def _on_device(self, x: torch.Tensor) -> torch.Tensor:
        # non_blocking: from pinned host memory (batch_runner.py) the copy overlaps with the launch
        return x.to(self.device, non_blocking=True)

    def _input_grads(
        self, inputs: list[torch.Tensor], grad_outputs: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Recompute the forward with autograd and backpropagate ``grad_outputs``: the
        inputs' gradients; the parameters' accumulate in their ``.grad``."""
        leaves = [self._on_device(x).detach().requires_grad_(x.is_floating_point()) for x in inputs]
        with torch.enable_grad():
            outputs = _as_list(self.module(*leaves))
        if len(outputs) != len(grad_outputs):
            raise invalid(f"expected {len(outputs)} grad_outputs, got {len(grad_outputs)}")
        pairs = []
        for i, (out, grad) in enumerate(zip(outputs, grad_outputs, strict=True)):
            if out.shape != grad.shape:
                raise invalid(
                    f"grad_outputs[{i}]: expected shape {list(out.shape)}, got {list(grad.shape)}"
                )
            if out.requires_grad:
                pairs.append((out, self._on_device(grad)))
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return [x.grad.detach() if x.grad is not None else torch.zeros_like(x) for x in leaves]

    def _step(self) -> None:
        """One optimizer step, all or nothing; raises :class:`StepRejected` (nothing changed)."""
        if self.optimizer is None or self.guard is None:
            self.steps += 1
            return
        config = self.optimizer_config
        norm = self._grad_norm(config.clip_grad_norm)
        factor = lr_factor(config, self.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = config.lr * factor
        if not self.guard.step(norm):
            raise StepRejected(
                "these grad_outputs would make the expert's weights or optimizer state "
                "non-finite; the step was undone",
                cause="nonfinite_result",
            )
        self.steps += 1

    def warm_up(self, rows: int = 8, free_dim: int = 8) -> None:
        """One forward and one backward of random inputs, without an optimizer step.

        On a GPU the first batch loads kernels and creates the thread's cuBLAS handle, which
        can take longer than a trainer's timeout; the server pays that here before it reports
        SERVING (run it on the thread that will compute: such handles are per thread). Weights,
        buffers (e.g. batch-norm statistics), optimizer state, step count and the random
        number generators are as before."""
        rows = min(rows, self.max_batch_size)
        free_dim = min(free_dim, self.max_free_dim)
        buffers = [b.detach().clone() for b in self.module.buffers()]
        cuda = []
        if self.device.type == "cuda":
            index = self.device.index
            cuda = [index if index is not None else torch.cuda.current_device()]
        with torch.random.fork_rng(devices=cuda):
            inputs = [s.sample(rows, free_dim) for s in self.input_schemas]
            grad_outputs = [s.sample(rows, free_dim) for s in self.output_schemas]
            try:
                self.forward(inputs)
                self._input_grads(inputs, grad_outputs)
            finally:
                for param in self.params:
                    param.grad = None
                with torch.no_grad():
                    for buffer, saved in zip(self.module.buffers(), buffers, strict=True):
                        buffer.copy_(saved)
        if cuda:
            torch.cuda.synchronize(self.device)

    def _grad_norm(self, clip: float) -> float:
        """The gradients' global norm, clipped to ``clip`` when > 0; an overflowing norm
        refuses the step before anything is applied. Unlike ``clip_grad_norm_`` it skips the
        multiply (a pass over every gradient) when no clipping is needed."""
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        value = float(norm)
        if not math.isfinite(value):
            raise StepRejected(
                f"these grad_outputs make the gradient norm non-finite ({value}); "
                "the step was not applied",
                cause="nonfinite_gradient",
            )
        if clip > 0 and value + 1e-6 > clip:  # clip_grad_norm_'s coefficient clip/(norm+1e-6)
            torch.nn.utils.clip_grads_with_norm_(self.params, clip, norm, foreach=True)
            return clip
        return value

    # ---- checkpoints ----

    def state_dict(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "expert_class": self.expert_class.name,
            "hidden_dim": self.hidden_dim,
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer else None,
            "steps": self.steps,
        }

    def snapshot_state(self) -> dict[str, Any]:
        """A copy of :meth:`state_dict` in host memory that later steps do not change (caller
        holds ``lock``): checkpoints copy under the lock and write outside it, and a checkpoint
        of a GPU server loads anywhere without ``map_location``."""
        return _host_copy(self.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("expert_class") != self.expert_class.name:
            raise ValueError(
                f"checkpoint is a {state.get('expert_class')!r} expert, not "
                f"{self.expert_class.name!r}"
            )
        tensors = list(state["model"].values())
        for param_state in (state.get("optimizer") or {}).get("state", {}).values():
            tensors.extend(v for v in param_state.values() if isinstance(v, torch.Tensor))
        if not all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point()):
            # written before steps were guarded: restoring it would bring the poison back
            raise ValueError("checkpoint holds NaN or infinite weights or optimizer state")
        self.module.load_state_dict(state["model"])
        if self.optimizer is not None and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.guard is not None:
            self.guard.measure()  # the next step's certificate needs the loaded norms
        self.steps = int(state["steps"])

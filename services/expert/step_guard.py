"""All-or-nothing optimizer steps: a step that leaves any value non-finite is undone exactly.

An expert trains on gradients its peers send. Finite but huge values pass every input check and
can still overflow inside the step (Adam squares the gradient), and one NaN or inf in a weight or
in Adam's moments stays there for good. So a step either provably cannot produce a non-finite
value (it is *certified*), or it is checked after it ran and undone if it did:

- Uncertified: the parameters and every optimizer-state tensor are copied into buffers allocated
  once (``torch._foreach_copy_``), the step runs, all of them are checked (``_foreach_norm``: a
  finite norm proves every value finite; only an overflowing norm pays for the exact
  per-element check), and a step that left a non-finite value is copied back (state the step
  created, on its first step, is dropped): weights, moments and step counters bit for bit as
  before.
- Certified: only Adam and SGD (not subclasses such as AdamW) on float32/float64/bfloat16
  parameters, with lr <= 1e3, weight decay <= 1e3, momentum <= 1e3, dampening in [0, 1], Adam's
  beta1 <= 0.999, beta2 <= 0.9999 and eps >= 1e-12, and every input bounded by ``BOUND`` =
  1e10: the gradient's norm (after clipping), the parameters' norms and a bound on the state
  tensors' norms. Then the
  largest value the step computes is below 1e32 (float32 reaches 3.4e38): Adam's gradient with
  weight decay is <= (1 + 1e3) x 1e10 ~ 1e13, its square ~ 1e26 (the second moment is a convex
  mix of such values and its old value, the first moment of values up to 1e13), the
  bias-corrected step size lr / (1 - beta1^t) <= 1e6, m / (sqrt(v) + eps) <= 1e13 / 1e-12, so
  the update is <= 1e31; SGD's momentum buffer is <= 1e3 x 1e10 + 1e13 and its update
  <= 1e3 x (1e13 + 1e3 x 2e13). Seven orders of magnitude to spare: rounding cannot matter.
  No copy is taken; the parameters are still measured (their norm feeds the next certificate)
  and the state's bound is carried forward from the same arithmetic (``_state_bound``) instead
  of reading the state. Should a certified step ever leave a non-finite parameter anyway, there
  is no copy: that is logged and raised as an internal error.

Why two paths: the copy and the check of parameters and state are a noticeable share of a
backward, measuring the parameters alone a small one (figures: docs/expert.md, "Hostile
peers"). Honest training stays certified (parameter norms far below ``BOUND``, clipped
gradients <= 1; a loaded checkpoint is measured first); a hostile gradient, a hyper-parameter
out of range or an optimizer not listed takes the copy.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

BOUND = 1e10
_RANGE_OF_FLOAT32 = (torch.float32, torch.float64, torch.bfloat16)


def _in_range(group: dict[str, Any], optimizer: torch.optim.Optimizer) -> bool:
    """The group's hyper-parameters are inside the certified ranges (module docstring)."""
    numbers = {k: v for k, v in group.items() if isinstance(v, int | float)}
    lr, wd = numbers.get("lr", math.inf), numbers.get("weight_decay", 0.0)
    if not (0 <= lr <= 1e3 and 0 <= wd <= 1e3):
        return False
    if type(optimizer) is torch.optim.Adam:  # not its subclasses (AdamW decays differently)
        beta1, beta2 = group["betas"]
        return 0 <= beta1 <= 0.999 and 0 <= beta2 <= 0.9999 and numbers.get("eps", 0) >= 1e-12
    if type(optimizer) is torch.optim.SGD:
        dampening = numbers.get("dampening", 0.0)
        return 0 <= numbers.get("momentum", 0.0) <= 1e3 and 0 <= dampening <= 1
    return False


class StepGuard:
    """``step(grad_norm)`` runs ``optimizer.step()``; False: it was undone, state as before."""

    def __init__(self, params: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
        self.params: list[torch.Tensor] = list(params)
        self.optimizer = optimizer
        self.copies = 0  # steps that took the copy (tests, docs)
        self._params_norm = math.inf  # largest norm of a parameter; inf: unknown
        self._state_norm = math.inf  # a bound on the largest norm of a state tensor
        self._buffers: list[torch.Tensor] = []
        self._keys: list[tuple[int, str]] = []  # (param index, state key) copied after params
        self._stateless: list[int] = []  # params that had no state when copied
        self._norms_copied = (math.inf, math.inf)
        # the bounds assume float32's range (bfloat16 shares it); float16 ends at 65504
        self._certifiable = all(p.dtype in _RANGE_OF_FLOAT32 for p in params)
        self.measure()

    def measure(self) -> bool:
        """Check every parameter and state value finite; remember their largest norms."""
        tensors = self._live()[0]
        params, state = tensors[: len(self.params)], tensors[len(self.params) :]
        self._params_norm = _largest_norm(params)
        self._state_norm = _largest_norm(state)
        return _finite(tensors, max(self._params_norm, self._state_norm))

    def step(self, grad_norm: float) -> bool:
        """``grad_norm``: the gradient's global norm as the optimizer will see it (clipped)."""
        groups = self.optimizer.param_groups
        certified = (
            self._certifiable
            and max(grad_norm, self._params_norm, self._state_norm) <= BOUND
            and all(_in_range(group, self.optimizer) for group in groups)
        )
        if not certified:
            self._copy()
            self.optimizer.step()
            if self.measure():
                return True
            self._restore()
            return False
        state_bound = _state_bound(self.optimizer, self._state_norm, grad_norm, self._params_norm)
        self.optimizer.step()
        self._params_norm = _largest_norm(self.params)
        self._state_norm = state_bound
        if not _finite(self.params, self._params_norm):
            log.error("a certified optimizer step left non-finite values; no copy to restore")
            raise RuntimeError("optimizer step left non-finite values (certified step: a bug)")
        return True

    def _live(self) -> tuple[list[torch.Tensor], list[tuple[int, str]]]:
        """Parameters then state tensors, and the (param index, key) of each state tensor."""
        tensors: list[torch.Tensor] = list(self.params)
        keys = []
        state = self.optimizer.state
        for i, param in enumerate(self.params):
            for key, value in state.get(param, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors.append(value)
                    keys.append((i, key))
        return tensors, keys

    def _copy(self) -> None:
        live, self._keys = self._live()
        if len(live) != len(self._buffers) or any(
            b.shape != t.shape or b.dtype != t.dtype or b.device != t.device
            for b, t in zip(self._buffers, live, strict=True)
        ):  # first copy, state created since, or a checkpoint of another layout
            self._buffers = [torch.empty_like(t.detach()) for t in live]
        state = self.optimizer.state
        self._stateless = [i for i, p in enumerate(self.params) if not state.get(p)]
        self._norms_copied = (self._params_norm, self._state_norm)
        with torch.no_grad():
            torch._foreach_copy_(self._buffers, live)
        self.copies += 1

    def _restore(self) -> None:
        """Put back what :meth:`_copy` copied; drop state the step created."""
        state = self.optimizer.state
        targets: list[torch.Tensor] = list(self.params)
        targets.extend(state[self.params[i]][key] for i, key in self._keys)
        with torch.no_grad():
            torch._foreach_copy_(targets, self._buffers)
        for i in self._stateless:
            state.pop(self.params[i], None)
        self._params_norm, self._state_norm = self._norms_copied


def _largest_norm(tensors: list[torch.Tensor]) -> float:
    """The largest L2 norm among ``tensors`` (0 for none). inf if one overflows or is NaN (NaN
    would slip through ``max`` and ``<=``): then :func:`_finite` decides, and the next step is
    not certified."""
    if not tensors:
        return 0.0
    with torch.no_grad():
        largest = float(torch.stack(torch._foreach_norm(tensors)).max())
    return math.inf if math.isnan(largest) else largest


def _finite(tensors: list[torch.Tensor], largest_norm: float) -> bool:
    """Every value finite. A finite norm proves it; a norm overflows (it squares the values)
    long before the values do, so only then the exact per-element check runs."""
    if math.isfinite(largest_norm):
        return True
    with torch.no_grad():
        return all(bool(torch.isfinite(t).all()) for t in tensors)


def _state_bound(
    optimizer: torch.optim.Optimizer, state: float, grad: float, params: float
) -> float:
    """A bound on the state tensors' norms after a certified step, from the step's arithmetic:
    with the weight-decayed gradient ``g`` (norm <= grad + wd x params), Adam's moments are
    convex mixes of their old value and g or g^2 (and ||g^2|| <= ||g||^2), its step counter
    grows by one; SGD's momentum buffer becomes momentum x buffer + (1 - dampening) x g."""
    bound = state
    for group in optimizer.param_groups:
        g = grad + group.get("weight_decay", 0.0) * params
        if type(optimizer) is torch.optim.Adam:
            bound = max(bound, state + 1.0, g, g * g)
        else:
            bound = max(bound, group.get("momentum", 0.0) * state + g)
    return bound

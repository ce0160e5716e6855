"""The step guard's certificate: at the edges of every certified range, with the worst inputs
the bounds allow, real torch optimizers produce finite values without taking the copy, and the
state bound carried forward is never below the state's real norm; outside the ranges the copy
is taken."""

from __future__ import annotations

import math

import pytest
import torch

from services.expert.step_guard import BOUND, StepGuard


def _norms(optimizer: torch.optim.Optimizer) -> float:
    tensors = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return max(float(torch.linalg.vector_norm(t.double())) for t in tensors)


def _edge_case(optimizer_factory, grad: float, moment: float, second: float):  # type: ignore[no-untyped-def]
    """One parameter of 4 values with norm BOUND, state at its bounds, gradient ``grad``."""
    param = torch.nn.Parameter(torch.tensor([BOUND, 0.0, 0.0, 0.0]))
    optimizer = optimizer_factory([param])
    param.grad = torch.zeros(4)
    optimizer.step()  # creates the state; then set it to the extremes
    with torch.no_grad():
        param.copy_(torch.tensor([BOUND, 0.0, 0.0, 0.0]))
        for key, value in optimizer.state[param].items():
            if key in ("exp_avg", "momentum_buffer"):
                value.copy_(torch.tensor([moment, 0.0, 0.0, 0.0]))
            elif key == "exp_avg_sq":
                value.copy_(torch.tensor([second, 0.0, 0.0, 0.0]))
    guard = StepGuard([param], optimizer)
    param.grad = torch.tensor([grad, 0.0, 0.0, 0.0])
    return param, optimizer, guard


ADAM_EDGE = dict(lr=1e3, betas=(0.999, 0.999), eps=1e-12)
CASES = {
    # largest m / (sqrt(v) + eps): v = 0, no gradient, no weight decay
    "adam-ratio": (lambda p: torch.optim.Adam(p, **ADAM_EDGE), 0.0, BOUND, 0.0),
    "adam-ratio-negative": (lambda p: torch.optim.Adam(p, **ADAM_EDGE), 0.0, -BOUND, 0.0),
    # largest gradient with the largest weight decay
    "adam-decay": (
        lambda p: torch.optim.Adam(p, weight_decay=1e3, **ADAM_EDGE),
        BOUND,
        BOUND,
        BOUND,
    ),
    "adam-fused": (
        lambda p: torch.optim.Adam(p, weight_decay=1e3, fused=True, **ADAM_EDGE),
        -BOUND,
        BOUND,
        0.0,
    ),
    "sgd": (
        lambda p: torch.optim.SGD(p, lr=1e3, momentum=1e3, weight_decay=1e3),
        BOUND,
        BOUND,
        0.0,
    ),
    "sgd-nesterov": (
        lambda p: torch.optim.SGD(p, lr=1e3, momentum=1e3, weight_decay=1e3, nesterov=True),
        BOUND,
        BOUND,
        0.0,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_certified_edges_stay_finite_without_a_copy(case: str) -> None:
    factory, grad, moment, second = CASES[case]
    param, optimizer, guard = _edge_case(factory, grad, moment, second)
    assert guard.step(abs(grad))
    assert guard.copies == 0, "the edge case must be certified"
    assert bool(torch.isfinite(param).all())
    carried = guard._state_norm
    assert guard.measure()  # every value finite, measured exactly
    assert carried >= _norms(optimizer) * (1 - 1e-6)
    largest = float(param.detach().abs().max())
    assert math.isfinite(largest) and largest < 1e33


@pytest.mark.parametrize(
    "factory",
    [
        lambda p: torch.optim.Adam(p, lr=2e3),
        lambda p: torch.optim.Adam(p, lr=1e-3, eps=1e-13),
        lambda p: torch.optim.Adam(p, lr=1e-3, betas=(0.9999, 0.999)),
        lambda p: torch.optim.SGD(p, lr=1e-3, momentum=2e3),
        lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9, dampening=-1.0),
        lambda p: torch.optim.AdamW(p, lr=1e-3),  # not a listed optimizer
    ],
)
def test_out_of_range_takes_the_copy(factory) -> None:  # type: ignore[no-untyped-def]
    param = torch.nn.Parameter(torch.ones(4))
    guard = StepGuard([param], factory([param]))
    param.grad = torch.ones(4)
    assert guard.step(2.0) and guard.copies == 1


def test_float16_parameters_take_the_copy() -> None:
    param = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    guard = StepGuard([param], torch.optim.SGD([param], lr=1e-3))
    param.grad = torch.ones(4, dtype=torch.float16)
    assert guard.step(2.0) and guard.copies == 1


def test_large_norms_take_the_copy_and_a_loaded_state_is_measured() -> None:
    param = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.Adam([param], lr=1e-3)
    guard = StepGuard([param], optimizer)
    param.grad = torch.ones(4)
    assert guard.step(2 * BOUND) and guard.copies == 1  # a large gradient
    param.grad = torch.ones(4)
    assert guard.step(2.0) and guard.copies == 1  # certified again
    with torch.no_grad():
        optimizer.state[param]["exp_avg"].fill_(2 * BOUND)
    guard.measure()  # as after load_state_dict: the next step knows the state is large
    param.grad = torch.ones(4)
    assert guard.step(2.0) and guard.copies == 2


def test_a_non_finite_state_is_never_certified() -> None:
    """NaN in a parameter (say, loaded from elsewhere): not certified, so the step takes the
    copy, and a step that leaves the NaN is undone (returns False) rather than kept."""
    param = torch.nn.Parameter(torch.tensor([1.0, float("nan"), 0.0, 0.0]))
    guard = StepGuard([param], torch.optim.SGD([param], lr=1e-3, momentum=0.9))
    assert not guard.measure()
    param.grad = torch.ones(4)
    assert not guard.step(2.0) and guard.copies == 1

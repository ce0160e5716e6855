"""A batch that fails on the device, over real gRPC: running out of memory is RESOURCE_EXHAUSTED
naming --max-batch-size (not INTERNAL with a traceback), a backward that fails half-way leaves no
gradient behind for the next step, any other failure is INTERNAL with a message, and the server
keeps serving. The allocations really fail (tests/oom_expert.py asks for a petabyte)."""

from __future__ import annotations

import copy

import grpc
import pytest
import torch
from helpers import run_async, serve_expert
from oom_expert import BACKWARD_ROWS, FORWARD_ROWS  # registers the expert class "oom"

from services.common.errors import CallError
from services.expert.backend import ExpertBackend, OptimizerConfig
from services.expert.errors import from_exception, is_out_of_memory
from services.expert.layers import get_expert_class

H = 8
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def _oom_backend() -> ExpertBackend:
    torch.manual_seed(0)
    return ExpertBackend("oom.0", get_expert_class("oom"), H, OptimizerConfig())


def test_a_backward_that_fails_half_way_leaves_no_gradient_behind() -> None:
    """The failing backward accumulated the second layer's gradients before it ran out of
    memory; the next backward's step must apply only its own gradients."""
    backend, replica = _oom_backend(), _oom_backend()  # the same seed: the same weights
    big = torch.randn(BACKWARD_ROWS + 1, H)
    with pytest.raises(RuntimeError) as err:
        backend.backward([big], [torch.randn_like(big)])
    assert is_out_of_memory(err.value), err.value
    assert all(p.grad is None for p in backend.module.parameters())
    assert backend.steps == 0

    x, g = torch.randn(4, H), torch.randn(4, H)
    got = backend.backward([x], [g])
    want = replica.backward([x], [g])
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    for a, b in zip(backend.module.parameters(), replica.module.parameters(), strict=True):
        assert torch.equal(a, b)


@run_async
async def test_out_of_memory_is_resource_exhausted_and_the_server_keeps_serving() -> None:
    async with serve_expert(experts=["oom.0"], expert_cls="oom", hidden_dim=H, seed=1) as (
        server,
        client,
    ):
        backend = server.backends["oom.0"]
        before = copy.deepcopy(backend.module.state_dict())
        local = copy.deepcopy(backend.module)
        huge, big = torch.randn(FORWARD_ROWS + 1, H), torch.randn(BACKWARD_ROWS + 1, H)
        for call in (
            client.forward("oom.0", [huge]),
            client.backward("oom.0", [huge], [huge]),
            client.backward("oom.0", [big], [big]),
        ):
            with pytest.raises(CallError) as err:
                await call
            assert err.value.code == EXHAUSTED, err.value.message
            assert "ran out of cpu memory" in err.value.message
            assert "--max-batch-size" in err.value.message
        after = backend.module.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert backend.steps == 0
        assert all(p.grad is None for p in backend.module.parameters())
        rejected = server.registry.get_sample_value(
            "dmoe_expert_rejected_total", {"reason": "out_of_memory"}
        )
        assert rejected == 3

        x = torch.randn(4, H)
        (out,) = await client.forward("oom.0", [x])
        with torch.no_grad():
            torch.testing.assert_close(out, local(x), atol=1e-6, rtol=0)
        await client.backward("oom.0", [x], [x])
        assert backend.steps == 1


def test_any_other_failure_is_internal_with_a_message() -> None:
    error = from_exception(ValueError("a bug"), torch.device("cpu"), 4)
    assert error.code == grpc.StatusCode.INTERNAL
    assert str(error) == "ValueError: a bug" and error.reason is None
    oom = from_exception(torch.OutOfMemoryError("CUDA out of memory"), torch.device("cuda"), 9)
    assert oom.code == EXHAUSTED and oom.reason == "out_of_memory"
    assert "ran out of cuda memory computing a batch of 9 samples" in str(oom)
    assert oom.__cause__ is None  # the failed batch's tensors are not kept alive

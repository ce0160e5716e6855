"""One remote expert as a torch module: forward and backward are RPCs to its server.

The backward sends the saved inputs and the output gradients; the server recomputes its forward,
returns the input gradients and applies one optimizer step to the expert, so the expert's
parameters never live in the caller's process. Inputs are checked against the expert's Info
schema before anything is sent, so a shape mistake is a local ``ValueError`` naming the
expected schema rather than a round trip.
"""

from __future__ import annotations

import asyncio
from typing import Any

import torch
from torch import nn

from services.common.tensor_codec import WIRE_TO_TORCH
from services.proto import expert_pb2
from services.trainer.dispatch import DUMMY
from services.trainer.swarm import Swarm


def check_schema(
    inputs: tuple[torch.Tensor, ...], schemas: list[expert_pb2.TensorSchema], uid: str
) -> None:
    """Raise ``ValueError`` when ``inputs`` do not fit the schemas (shapes without batch dim)."""
    if len(inputs) != len(schemas):
        raise ValueError(f"expert {uid} takes {len(schemas)} inputs, got {len(inputs)}")
    for i, (tensor, schema) in enumerate(zip(inputs, schemas, strict=True)):
        expected = list(schema.shape)
        actual = list(tensor.shape[1:])
        dtype = WIRE_TO_TORCH.get(schema.dtype)
        shape_ok = len(expected) == len(actual) and all(
            e in (-1, a) for e, a in zip(expected, actual, strict=True)
        )
        if not shape_ok or (dtype is not None and tensor.dtype != dtype):
            raise ValueError(
                f"expert {uid} input {i}: expected [batch, {', '.join(map(str, expected))}] "
                f"of {dtype}, got {list(tensor.shape)} of {tensor.dtype}"
            )


class _RemoteCall(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,  # torch's FunctionCtx; this call's fields are set on it
        _dummy: torch.Tensor,
        expert: RemoteExpert,
        *inputs: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        inputs = tuple(t.detach() for t in inputs)
        outputs = expert.swarm.run(
            expert.swarm.forward(expert.uid, expert.address, list(inputs), expert.forward_timeout)
        )
        ctx.expert = expert
        ctx.save_for_backward(*inputs)
        return tuple(outputs)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        expert: RemoteExpert = ctx.expert
        inputs = list(ctx.saved_tensors)
        grads = expert.swarm.run(
            expert.swarm.backward(
                expert.uid,
                expert.address,
                inputs,
                [g.contiguous() for g in grad_outputs],
                expert.backward_timeout,
            )
        )
        return (None, None, *grads)


class RemoteExpert(nn.Module):
    """The expert ``uid`` served at ``address`` (``host:port``); outputs a tensor or a tuple."""

    def __init__(
        self,
        uid: str,
        address: str,
        *,
        swarm: Swarm,
        forward_timeout: float = 10.0,
        backward_timeout: float = 10.0,
        info_timeout: float = 5.0,
    ) -> None:
        super().__init__()
        self.uid, self.address, self.swarm = uid, address, swarm
        self.forward_timeout, self.backward_timeout = forward_timeout, backward_timeout
        self.info_timeout = info_timeout

    @property
    def info(self) -> expert_pb2.InfoResponse:
        """The expert's Info (fetched once, then cached by the swarm)."""
        return self.swarm.run(
            asyncio.wait_for(self.swarm.info(self.uid, self.address), self.info_timeout)
        )

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        check_schema(inputs, list(self.info.inputs), self.uid)
        outputs = _RemoteCall.apply(DUMMY, self, *inputs)
        return outputs[0] if len(outputs) == 1 else outputs

    def extra_repr(self) -> str:
        return f"uid={self.uid!r}, address={self.address!r}"

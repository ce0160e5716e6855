"""Request tensors in two steps: checked on the event loop without torch, built on a compute thread.

``parse`` validates a ``dmoe.Tensor``'s metadata (dtype, compression, shape, buffer length) in
plain Python and keeps one reference to its buffer; ``WireTensor.tensor`` turns it into a
zero-copy ``torch`` view (or decompresses it) on the compute thread. Every torch call releases
and re-takes the GIL, and on a busy server each re-take can wait for another thread's switch
interval, so the event loop makes none per request. The checks are the codec's own
(``services.common.tensor_codec.check``), so both paths accept and refuse the same messages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from services.common.tensor_codec import check, decode
from services.proto import tensor_pb2


@dataclass(frozen=True, slots=True)
class WireTensor:
    msg: tensor_pb2.Tensor
    buffer: bytes
    shape: tuple[int, ...]
    dtype: torch.dtype
    compression: int

    def tensor(self) -> torch.Tensor:
        """The tensor (compute thread): a read-only view of ``buffer`` when uncompressed."""
        if self.compression != tensor_pb2.COMPRESSION_NONE:
            return decode(self.msg)
        numel = math.prod(self.shape)
        if numel == 0:
            return torch.empty(self.shape, dtype=self.dtype)
        return torch.frombuffer(self.buffer, dtype=self.dtype).view(self.shape)


def parse(msg: tensor_pb2.Tensor) -> WireTensor:
    """Check a tensor message without torch calls; raises ``TensorDecodeError`` naming the
    problem (the codec's own ``check``)."""
    dtype, shape, _ = check(msg)
    return WireTensor(msg, msg.buffer, shape, dtype, msg.compression)

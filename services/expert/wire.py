"""Request tensors in two steps: checked on the event loop without torch, built on a compute thread.

``parse`` validates a ``dmoe.Tensor``'s metadata (dtype, compression, shape, buffer length) in
plain Python and keeps one reference to its buffer; ``WireTensor.tensor`` turns it into a
zero-copy ``torch`` view (or decompresses it) on the compute thread. Every torch call releases
and re-takes the GIL, and on a busy server each re-take can wait for another thread's switch
interval, so the event loop makes none per request. Same rules and messages as
``services.common.tensor_codec.decode``, which stays the reference implementation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from services.common.tensor_codec import WIRE_TO_TORCH, TensorDecodeError, decode, dtype_name
from services.proto import tensor_pb2

_WIRE_ITEMSIZE = {
    tensor_pb2.COMPRESSION_FLOAT16: 2,
    tensor_pb2.COMPRESSION_BFLOAT16: 2,
    tensor_pb2.COMPRESSION_UINT8: 1,
}
_ITEMSIZE = {dtype: dtype.itemsize for dtype in WIRE_TO_TORCH.values()}


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
    """Check a tensor message without torch; raises ``TensorDecodeError`` naming the problem."""
    dtype = WIRE_TO_TORCH.get(msg.dtype)
    if dtype is None:
        raise TensorDecodeError(f"unknown or unspecified dtype {msg.dtype}")
    shape = tuple(msg.shape)
    if any(d < 0 for d in shape):
        raise TensorDecodeError(f"negative dimension in shape {list(shape)}")
    compression = msg.compression
    if compression == tensor_pb2.COMPRESSION_NONE:
        itemsize = _ITEMSIZE[dtype]
    elif compression in _WIRE_ITEMSIZE:
        if not dtype.is_floating_point:
            raise TensorDecodeError(f"compressed tensor must be floating, got {dtype_name(dtype)}")
        itemsize = _WIRE_ITEMSIZE[compression]
    else:
        raise TensorDecodeError(f"unknown compression {compression}")
    buffer = msg.buffer
    expected = math.prod(shape) * itemsize
    if len(buffer) != expected:
        wire = dtype_name(dtype) if compression == tensor_pb2.COMPRESSION_NONE else "wire type"
        raise TensorDecodeError(
            f"buffer has {len(buffer)} bytes, shape {list(shape)} of {wire} needs {expected}"
        )
    return WireTensor(msg, buffer, shape, dtype, compression)

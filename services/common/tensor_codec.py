"""Tensors <-> ``dmoe.Tensor`` protobuf messages.

Encoding makes one copy (the tensor's bytes into the message); decoding makes
none for uncompressed tensors (the result is a view of the message's buffer, so
callers that write into it in place must ``clone()`` first) and one conversion
for compressed ones. Every dtype round-trips exactly with ``COMPRESSION_NONE``.

Lossy compressions, for floating tensors only, with their error bounds:

- ``COMPRESSION_FLOAT16``: relative error <= 2**-11 for |x| in [6.1e-5, 65504];
  values beyond 65504 become inf, so use it only for activations and gradients
  known to be in range.
- ``COMPRESSION_BFLOAT16``: relative error <= 2**-8, same range as float32.
- ``COMPRESSION_UINT8``: affine 8-bit quantization over [min, max] of the tensor;
  absolute error <= (max - min) / 510 per element (half a quantization step).
"""

from __future__ import annotations

import math
import warnings

import torch

from services.proto import tensor_pb2

# Decoding views the immutable message buffer; torch warns about that on every call site.
warnings.filterwarnings("ignore", message="The given buffer is not writable")

Compression = tensor_pb2.Compression

TORCH_TO_WIRE: dict[torch.dtype, tensor_pb2.DType] = {
    torch.float32: tensor_pb2.DTYPE_FLOAT32,
    torch.float16: tensor_pb2.DTYPE_FLOAT16,
    torch.bfloat16: tensor_pb2.DTYPE_BFLOAT16,
    torch.float64: tensor_pb2.DTYPE_FLOAT64,
    torch.int64: tensor_pb2.DTYPE_INT64,
    torch.int32: tensor_pb2.DTYPE_INT32,
    torch.int16: tensor_pb2.DTYPE_INT16,
    torch.int8: tensor_pb2.DTYPE_INT8,
    torch.uint8: tensor_pb2.DTYPE_UINT8,
    torch.bool: tensor_pb2.DTYPE_BOOL,
}
WIRE_TO_TORCH: dict[int, torch.dtype] = {v: k for k, v in TORCH_TO_WIRE.items()}

_LOSSY_WIRE_DTYPE: dict[int, torch.dtype] = {
    tensor_pb2.COMPRESSION_FLOAT16: torch.float16,
    tensor_pb2.COMPRESSION_BFLOAT16: torch.bfloat16,
    tensor_pb2.COMPRESSION_UINT8: torch.uint8,
}


class TensorDecodeError(ValueError):
    """A message that does not describe a valid tensor (callers answer INVALID_ARGUMENT)."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _raw_bytes(tensor: torch.Tensor) -> bytes:
    tensor = tensor.detach().contiguous().cpu()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: ship its bits as int16
        tensor = tensor.view(torch.int16)
    return tensor.numpy().tobytes()


def encode(
    tensor: torch.Tensor,
    compression: tensor_pb2.Compression = tensor_pb2.COMPRESSION_NONE,
) -> tensor_pb2.Tensor:
    """Serialize ``tensor`` (any device) into a message, optionally compressed."""
    if tensor.dtype not in TORCH_TO_WIRE:
        raise TypeError(f"dtype {tensor.dtype} cannot be sent")
    msg = tensor_pb2.Tensor(
        shape=tensor.shape,
        dtype=TORCH_TO_WIRE[tensor.dtype],
        compression=compression,
        requires_grad=tensor.requires_grad,
    )
    if compression == tensor_pb2.COMPRESSION_NONE:
        msg.buffer = _raw_bytes(tensor)
        return msg
    if not tensor.dtype.is_floating_point:
        raise TypeError(f"compression {Compression.Name(compression)} needs a floating tensor")
    if compression == tensor_pb2.COMPRESSION_UINT8:
        flat = tensor.detach().float()
        low = float(flat.min()) if flat.numel() else 0.0
        high = float(flat.max()) if flat.numel() else 0.0
        scale = (high - low) / 255.0 or 1.0
        quantized = ((flat - low) / scale).round_().clamp_(0, 255).to(torch.uint8)
        msg.buffer, msg.scale, msg.offset = _raw_bytes(quantized), scale, low
        return msg
    if compression not in _LOSSY_WIRE_DTYPE:
        raise ValueError(f"unknown compression {compression}")
    msg.buffer = _raw_bytes(tensor.detach().to(_LOSSY_WIRE_DTYPE[compression]))
    return msg


def check(msg: tensor_pb2.Tensor) -> tuple[torch.dtype, tuple[int, ...], torch.dtype]:
    """Validate a message's metadata against its buffer, in plain Python (no torch calls).

    Returns (dtype, shape, wire dtype); raises :class:`TensorDecodeError` naming what is wrong.
    """
    dtype = WIRE_TO_TORCH.get(msg.dtype)
    if dtype is None:
        raise TensorDecodeError(f"unknown or unspecified dtype {msg.dtype}")
    shape = tuple(msg.shape)
    if any(d < 0 for d in shape):
        raise TensorDecodeError(f"negative dimension in shape {list(shape)}")
    if msg.compression == tensor_pb2.COMPRESSION_NONE:
        wire = dtype
    elif msg.compression in _LOSSY_WIRE_DTYPE:
        if not dtype.is_floating_point:
            raise TensorDecodeError(f"compressed tensor must be floating, got {dtype_name(dtype)}")
        wire = _LOSSY_WIRE_DTYPE[msg.compression]
    else:
        raise TensorDecodeError(f"unknown compression {msg.compression}")
    expected = math.prod(shape) * wire.itemsize
    if len(msg.buffer) != expected:
        raise TensorDecodeError(
            f"buffer has {len(msg.buffer)} bytes, shape {list(shape)} of "
            f"{dtype_name(wire)} needs {expected}"
        )
    return dtype, shape, wire


def decode(msg: tensor_pb2.Tensor) -> torch.Tensor:
    """Rebuild the tensor; raises :class:`TensorDecodeError` naming what is wrong."""
    dtype, shape, wire = check(msg)
    numel = math.prod(shape)
    # frombuffer refuses an empty buffer
    flat = torch.frombuffer(msg.buffer, dtype=wire) if numel else torch.empty(0, dtype=wire)
    if msg.compression == tensor_pb2.COMPRESSION_UINT8:
        flat = flat.to(torch.float32).mul_(msg.scale).add_(msg.offset)
    if flat.dtype != dtype:
        flat = flat.to(dtype)
    tensor = flat.view(shape)
    if msg.requires_grad:
        tensor.requires_grad_(True)
    return tensor

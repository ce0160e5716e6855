"""Flat float32 vectors on the wire (``dmoe.Tensor``), checked as hostile input, and signed.

A chunk travels as a 1-D ``dmoe.Tensor`` of dtype float32, raw or float16-compressed
(``COMPRESSION_FLOAT16``: half the bytes, relative error <= 2**-11; a chunk with a value beyond
float16's 65504 goes as float32). Decoding
refuses anything else: another dtype or compression, a shape other than the expected length, a
buffer of the wrong size, non-finite values (a float16 overflow decodes to inf and is refused
too). Every chunk is signed by its sender over the round it belongs to and a digest of its
bytes, so a stranger who read the group from the DHT cannot contribute in a member's name.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np

from services.proto import tensor_pb2

SERVICE_NAME = "dmoe.Averager"  # rounds and state transfer share one gRPC service
CHUNK_BYTES = 1 << 20  # at most 1 MiB of values per message
FLOAT16_MAX = 65504.0
COMPRESSIONS = {"none": tensor_pb2.COMPRESSION_NONE, "float16": tensor_pb2.COMPRESSION_FLOAT16}
_WIDTH = {tensor_pb2.COMPRESSION_NONE: 4, tensor_pb2.COMPRESSION_FLOAT16: 2}


class WireError(ValueError):
    """A chunk that must be refused; the message says why (sent back to the caller)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # a metric label: shape, dtype, non_finite, ...


def chunk_elements(compression: tensor_pb2.Compression, chunk_bytes: int = CHUNK_BYTES) -> int:
    return max(1, chunk_bytes // _WIDTH[compression])


def encode(values: np.ndarray, compression: tensor_pb2.Compression) -> tensor_pb2.Tensor:
    """A 1-D float32 vector as a ``dmoe.Tensor`` (float16 on the wire when asked and every
    value fits float16's range; otherwise raw float32, which the receiver accepts too)."""
    wide = len(values) and float(np.abs(values).max()) > FLOAT16_MAX
    if compression == tensor_pb2.COMPRESSION_FLOAT16 and wide:
        compression = tensor_pb2.COMPRESSION_NONE
    wire = values.astype("<f2" if compression == tensor_pb2.COMPRESSION_FLOAT16 else "<f4")
    return tensor_pb2.Tensor(
        buffer=wire.tobytes(), shape=[len(values)], dtype=tensor_pb2.DTYPE_FLOAT32,
        compression=compression,
    )  # fmt: skip


def roundtrip(values: np.ndarray, compression: int) -> np.ndarray:
    """What the receiver decodes from ``encode(values, compression)`` (float32)."""
    fits = not len(values) or float(np.abs(values).max()) <= FLOAT16_MAX
    if compression == tensor_pb2.COMPRESSION_FLOAT16 and fits:
        return values.astype(np.float16).astype(np.float32)
    return values.astype(np.float32, copy=False)


def decode(tensor: tensor_pb2.Tensor, length: int) -> np.ndarray:
    """The float32 values of ``tensor``, which must hold exactly ``length`` finite values."""
    if tensor.dtype != tensor_pb2.DTYPE_FLOAT32:
        raise WireError("dtype", f"values must be float32, got dtype {tensor.dtype}")
    width = _WIDTH.get(tensor.compression)
    if width is None:
        raise WireError("dtype", f"compression {tensor.compression} is not none or float16")
    if list(tensor.shape) != [length]:
        raise WireError("shape", f"expected shape [{length}], got {list(tensor.shape)[:8]}")
    if len(tensor.buffer) != length * width:
        raise WireError(
            "shape", f"buffer holds {len(tensor.buffer)} bytes, expected {length * width}"
        )
    raw = np.frombuffer(tensor.buffer, dtype="<f2" if width == 2 else "<f4")
    values = raw.astype(np.float32)
    if not np.isfinite(values).all():
        raise WireError("non_finite", "values hold NaN or infinity")
    return values


def signed_message(
    run_id: str, round_: int, group: bytes, part: int, chunk: int, weight: float, buffer: bytes
) -> bytes:
    """What a chunk's signature covers."""
    return b"".join(
        (
            b"dmoe-average\0",
            hashlib.sha256(run_id.encode()).digest(),
            struct.pack("<qIId", round_, part, chunk, weight),
            group,
            hashlib.sha256(buffer).digest(),
        )
    )

import pytest
import torch

from services.common.tensor_codec import TORCH_TO_WIRE, TensorDecodeError, decode, encode
from services.proto import tensor_pb2


def _wire_round_trip(msg: tensor_pb2.Tensor) -> torch.Tensor:
    return decode(tensor_pb2.Tensor.FromString(msg.SerializeToString()))


@pytest.mark.parametrize("dtype", list(TORCH_TO_WIRE))
@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 5), (2, 0, 4), (2, 3, 4, 5)])
def test_exact_round_trip_every_dtype(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        x = torch.rand(shape, generator=gen) > 0.5
    elif dtype.is_floating_point:
        x = (torch.randn(shape, generator=gen) * 1e3).to(dtype)
    else:
        info = torch.iinfo(dtype)
        x = torch.randint(info.min, info.max, shape, generator=gen, dtype=dtype)
    y = _wire_round_trip(encode(x))
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(x, y)


def test_special_float_values_survive() -> None:
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45])
    y = _wire_round_trip(encode(x))
    assert torch.equal(torch.isnan(x), torch.isnan(y))
    assert torch.equal(x[1:], y[1:]) and torch.signbit(y[3])


def test_requires_grad_and_noncontiguous() -> None:
    x = torch.randn(4, 6).t().requires_grad_(True)
    y = _wire_round_trip(encode(x))
    assert y.requires_grad and torch.equal(x.detach(), y)


@pytest.mark.parametrize(
    ("compression", "bound"),
    [
        (tensor_pb2.COMPRESSION_FLOAT16, lambda x: x.abs() * 2**-11 + 6e-8),
        (tensor_pb2.COMPRESSION_BFLOAT16, lambda x: x.abs() * 2**-8),
        (tensor_pb2.COMPRESSION_UINT8, lambda x: (x.max() - x.min()) / 510 * (1 + 1e-5)),
    ],
)
def test_lossy_compression_within_documented_bounds(compression, bound) -> None:
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(1)) * 3
    msg = encode(x, compression)
    assert len(msg.buffer) < x.numel() * 4
    y = _wire_round_trip(msg)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert bool(((x - y).abs() <= bound(x)).all())


def test_uint8_of_constant_tensor_is_exact() -> None:
    x = torch.full((5, 5), 3.25)
    assert torch.equal(_wire_round_trip(encode(x, tensor_pb2.COMPRESSION_UINT8)), x)


def test_lossy_compression_refuses_integers() -> None:
    with pytest.raises(TypeError):
        encode(torch.arange(4), tensor_pb2.COMPRESSION_FLOAT16)


@pytest.mark.parametrize(
    "msg",
    [
        tensor_pb2.Tensor(buffer=b"\0" * 12, shape=[3], dtype=0),
        tensor_pb2.Tensor(buffer=b"\0" * 11, shape=[3], dtype=tensor_pb2.DTYPE_FLOAT32),
        tensor_pb2.Tensor(buffer=b"", shape=[-1], dtype=tensor_pb2.DTYPE_FLOAT32),
        tensor_pb2.Tensor(buffer=b"\0" * 4, shape=[2], dtype=tensor_pb2.DTYPE_INT16, compression=1),
        tensor_pb2.Tensor(
            buffer=b"\0" * 4, shape=[1], dtype=tensor_pb2.DTYPE_FLOAT32, compression=9
        ),
    ],
)
def test_bad_messages_raise_decode_error(msg: tensor_pb2.Tensor) -> None:
    with pytest.raises(TensorDecodeError):
        decode(msg)

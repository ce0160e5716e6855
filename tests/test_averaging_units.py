"""The averager's pure parts: aggregation (exactness, the bound), matchmaking, wire checks."""

from __future__ import annotations

import numpy as np
import pytest

from services.averaging.aggregate import Aggregation, aggregate, capped_weights
from services.averaging.matchmaking import Member, group_digest, groups_of, part_bounds
from services.averaging.wire import WireError, decode, encode
from services.proto import tensor_pb2


def honest(rng: np.random.Generator, members: int = 3, size: int = 5000) -> np.ndarray:
    return (1.0 + rng.standard_normal((members, size))).astype(np.float32)


def test_honest_inputs_get_the_exact_weighted_mean() -> None:
    x = honest(np.random.default_rng(0), 4)
    w = np.array([1.0, 2.0, 3.0, 4.0])
    got, tau = aggregate(x, w)
    want = (w[:, None] * x.astype(np.float64)).sum(0) / w.sum()
    assert tau > 0 and np.abs(got - want).max() < 1e-5


@pytest.mark.parametrize("attack", ["huge", "noise", "copy-far", "weight"])
def test_one_hostile_member_of_four_moves_the_result_at_most_the_bound(attack: str) -> None:
    rng = np.random.default_rng(1)
    x = honest(rng)
    hostile = {
        "huge": np.full(x.shape[1], 1e30, np.float32),
        "noise": 100 * rng.standard_normal(x.shape[1]).astype(np.float32),
        "copy-far": x[0] + 50,
        "weight": x[0] + 5,
    }[attack]
    inputs = np.vstack([x, hostile[None]])
    weights = np.array([1.0, 1.0, 1.0, 1e9])
    got, tau = aggregate(inputs, weights)
    mu = x.astype(np.float64).mean(0)
    shift = float(np.linalg.norm(got - mu))
    assert shift <= (2.0 / 3.0) * tau * (1 + 1e-3)  # w_h <= 2 median(w), W_H = 3
    r_h = x.max(0) - x.min(0)
    assert shift <= 2 * float(np.linalg.norm(r_h))  # the bound in honest terms
    plain, _ = aggregate(inputs, weights, Aggregation(robust=False))
    if attack != "huge":  # the plain mean of 1e30 overflows float32 to inf
        assert float(np.linalg.norm(plain - mu)) > shift


def test_claimed_weights_are_capped_at_twice_the_median() -> None:
    assert list(capped_weights(np.array([1.0, 1.0, 1.0, 1e9]), 2.0)) == [1, 1, 1, 2]
    assert list(capped_weights(np.zeros(3), 2.0)) == [1, 1, 1]


def members(n: int) -> list[Member]:
    return [Member(bytes([i]) * 32, f"127.0.0.1:{1000 + i}", 10) for i in range(n)]


@pytest.mark.parametrize("n", [2, 3, 5, 9, 12, 16, 64])
def test_groups_are_balanced_and_the_same_for_everyone(n: int) -> None:
    everyone = members(n)
    groups = groups_of(everyone, "run", 7, 4)
    sizes = [len(g) for g in groups]
    assert sum(sizes) == n and max(sizes) - min(sizes) <= 1 and min(sizes) >= 2
    assert max(sizes) <= 4 or len(groups) == 1
    assert groups_of(list(reversed(everyone)), "run", 7, 4) == groups  # order of the DHT reply
    assert groups_of(everyone, "run", 8, 4) != groups or n <= 4  # a new shuffle every slot


def test_group_digest_depends_on_members_and_slot() -> None:
    group = members(4)
    assert group_digest("run", 1, group) != group_digest("run", 2, group)
    assert group_digest("run", 1, group) != group_digest("run", 1, group[:3])


def test_parts_cover_the_vector() -> None:
    assert part_bounds(10, 3) == [(0, 3), (3, 6), (6, 10)]


@pytest.mark.parametrize(
    "tensor, reason",
    [
        (encode(np.array([1, np.nan, 2], np.float32), tensor_pb2.COMPRESSION_NONE), "non_finite"),
        (
            tensor_pb2.Tensor(
                buffer=np.array([np.inf, 1, 2], "<f2").tobytes(),
                shape=[3],
                dtype=tensor_pb2.DTYPE_FLOAT32,
                compression=tensor_pb2.COMPRESSION_FLOAT16,
            ),
            "non_finite",
        ),
        (encode(np.ones(4, np.float32), tensor_pb2.COMPRESSION_NONE), "shape"),
        (tensor_pb2.Tensor(buffer=b"\0" * 12, shape=[3], dtype=tensor_pb2.DTYPE_INT32), "dtype"),
        (tensor_pb2.Tensor(buffer=b"\0" * 11, shape=[3], dtype=tensor_pb2.DTYPE_FLOAT32), "shape"),
        (
            tensor_pb2.Tensor(
                buffer=b"\0" * 3,
                shape=[3],
                dtype=tensor_pb2.DTYPE_FLOAT32,
                compression=tensor_pb2.COMPRESSION_UINT8,
            ),
            "dtype",
        ),
    ],
)
def test_bad_chunks_are_refused(tensor: tensor_pb2.Tensor, reason: str) -> None:
    with pytest.raises(WireError) as refused:
        decode(tensor, 3)
    assert refused.value.reason == reason


def test_float16_round_trip_is_within_its_precision() -> None:
    x = np.random.default_rng(2).standard_normal(1000).astype(np.float32)
    got = decode(encode(x, tensor_pb2.COMPRESSION_FLOAT16), 1000)
    assert np.abs(got - x).max() <= 2**-11 * np.abs(x).max()


def test_values_beyond_float16_travel_as_float32() -> None:
    x = np.array([1e6, -2.5, 3.0], np.float32)
    tensor = encode(x, tensor_pb2.COMPRESSION_FLOAT16)
    assert tensor.compression == tensor_pb2.COMPRESSION_NONE
    assert list(decode(tensor, 3)) == list(x)

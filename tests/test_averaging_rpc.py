"""``dmoe.Averager/Reduce`` against hostile callers, on a real gRPC server: a round's state is
set up by hand (a group of two), then strangers, forgeries and bad values are sent at it."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np

from services.averaging import Aggregation, Averager, AveragerConfig
from services.averaging.matchmaking import Member, group_digest, part_bounds
from services.averaging.reduction import Reduction
from services.averaging.rounds import RoundView
from services.averaging.wire import decode, encode, signed_message
from services.common.identity import Identity
from services.common.server import start_server
from services.proto import averager_pb2, tensor_pb2

RUN, SIZE = "rpc-test", 8
FP32 = tensor_pb2.COMPRESSION_NONE


def form(averager: Averager, slot: int, group: list[Member], own: np.ndarray) -> RoundView:
    """What ``step`` sets up once its group is read: this peer reduces part 0."""
    round_ = RoundView(slot)
    round_.members, round_.digest = group, group_digest(RUN, slot, group)
    round_.position = {m.key: i for i, m in enumerate(group)}
    round_.index, round_.bounds = 0, part_bounds(SIZE, len(group))
    start, end = round_.bounds[0]
    round_.reduction = Reduction(len(group), 0, own[start:end], 1.0, 1024,
                                 time.monotonic() + 60, Aggregation(), FP32)  # fmt: skip
    round_.formed.set()
    averager._rounds[slot] = round_
    return round_


def request(signer: Identity, sender: bytes, round_: RoundView, values: np.ndarray,
            run: str = RUN, weight: float = 1.0) -> averager_pb2.ReduceRequest:  # fmt: skip
    tensor = encode(values, FP32)
    message = signed_message(run, round_.slot, round_.digest, 0, 0, weight, tensor.buffer)
    return averager_pb2.ReduceRequest(
        run_id=run, round=round_.slot, group=round_.digest, sender=sender, part=0, chunk=0,
        weight=weight, values=tensor, signature=signer.sign(message),
    )  # fmt: skip


def test_reduce_refuses_strangers_forgeries_and_bad_values() -> None:
    async def scenario() -> None:
        me, peer, stranger = Identity.generate(), Identity.generate(), Identity.generate()
        averager = Averager(AveragerConfig(run_id=RUN), size=SIZE, dht=None, identity=me,
                            address="")  # fmt: skip
        server = await start_server("trainer", averager.register, metrics_port=-1,
                                    links=[averager.link])  # fmt: skip
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        reduce = channel.unary_unary(
            "/dmoe.Averager/Reduce",
            request_serializer=averager_pb2.ReduceRequest.SerializeToString,
            response_deserializer=averager_pb2.ReduceReply.FromString,
        )

        async def refused(req: averager_pb2.ReduceRequest) -> tuple[grpc.StatusCode, str]:
            try:
                await reduce(req, timeout=10)
            except grpc.aio.AioRpcError as exc:
                return exc.code(), exc.details() or ""
            raise AssertionError("accepted")

        try:
            group = [Member(me.public_key, "127.0.0.1:1", SIZE),
                     Member(peer.public_key, "127.0.0.1:2", SIZE)]  # fmt: skip
            own, theirs = np.arange(SIZE, dtype=np.float32), np.full(SIZE, 10, np.float32)
            round_ = form(averager, 5, group, own)
            part = theirs[:4]
            code, _ = await refused(request(peer, peer.public_key, round_, part, run="other"))
            assert code == grpc.StatusCode.FAILED_PRECONDITION
            wrong_round = request(peer, peer.public_key, round_, part)
            wrong_round.round = 99
            assert (await refused(wrong_round))[0] == grpc.StatusCode.FAILED_PRECONDITION
            code, details = await refused(request(stranger, stranger.public_key, round_, part))
            assert code == grpc.StatusCode.PERMISSION_DENIED and "not a member" in details
            code, details = await refused(request(stranger, peer.public_key, round_, part))
            assert code == grpc.StatusCode.PERMISSION_DENIED and "signature" in details
            other_group = request(peer, peer.public_key, round_, part)
            other_group.group = b"\0" * 32
            assert (await refused(other_group))[0] == grpc.StatusCode.FAILED_PRECONDITION
            # none of that touched the reduction: the member's real slice gives the exact mean
            reply = await reduce(request(peer, peer.public_key, round_, part), timeout=10)
            assert list(reply.contributors) == [0, 1]
            assert list(decode(reply.values, 4)) == list((own[:4] + part) / 2)
            # a chunk sent again after the reduction gets the same result, changes nothing
            again = await reduce(request(peer, peer.public_key, round_, 2 * part), timeout=10)
            assert again.values.buffer == reply.values.buffer

            # bad values from a member: refused, and the part is reduced without it at once
            for slot, bad in ((6, np.array([1, np.nan, 2, 3], np.float32)),
                              (7, np.ones(5, np.float32))):  # fmt: skip
                round_ = form(averager, slot, group, own)
                code, _ = await refused(request(peer, peer.public_key, round_, bad))
                assert code == grpc.StatusCode.INVALID_ARGUMENT
                reduced = await asyncio.wait_for(round_.reduction.done, 5)  # type: ignore[union-attr]
                assert reduced.contributors == [0] and list(reduced.values) == list(own[:4])
            # the service is still up
            reply = await reduce(request(peer, peer.public_key, form(averager, 8, group, own),
                                         part), timeout=10)  # fmt: skip
            assert list(reply.contributors) == [0, 1]
        finally:
            await channel.close()
            await averager.close()
            await server.stop(0.1)

    asyncio.run(scenario())

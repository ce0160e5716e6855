"""The ``Reduce`` RPC: a member's chunk, checked against this peer's view of the round.

A request is refused (with a gRPC status, counted in ``dmoe_trainer_averaging_refused_total``)
unless it names this run and a round this peer formed with the same group (digest), comes from
a member, for the part this peer reduces, a chunk that exists, with a finite weight, a valid
signature and values that decode (:mod:`services.averaging.wire`). A member whose chunk was
refused for what it sent is left out of the part at once, so the reducer need not wait for
it. The reply is that chunk of the reduced part, once the part is reduced
(:mod:`services.averaging.reduction`).
"""

from __future__ import annotations

import asyncio

import grpc
import numpy as np

from services.averaging.metrics import AveragerMetrics
from services.averaging.rounds import AveragerConfig, RoundView
from services.averaging.wire import WireError, decode, encode, signed_message
from services.common.errors import StatusError
from services.common.identity import verify
from services.common.rejections import RateLimitedLog
from services.proto import averager_pb2, tensor_pb2


class ReduceHandler:
    """Answers ``Reduce`` for the rounds in ``rounds`` (the averager's, by slot; it adds a
    round before announcing it and drops it after the round's replies are due)."""

    def __init__(
        self,
        config: AveragerConfig,
        rounds: dict[int, RoundView],
        compression: tensor_pb2.Compression,
        metrics: AveragerMetrics | None,
        warn: RateLimitedLog,
    ) -> None:
        self.config = config
        self.rounds = rounds
        self.compression = compression
        self.metrics = metrics
        self._warn = warn

    def _refuse(self, reason: str, message: str, source: str) -> StatusError:
        if self.metrics is not None:
            self.metrics.refused.labels(reason).inc()
        self._warn.warn(("refused", reason, source), "averaging: refused", reason=reason,
                        source=source, detail=message[:200])  # fmt: skip
        code = grpc.StatusCode.INVALID_ARGUMENT
        if reason in ("group", "not_averaging"):
            code = grpc.StatusCode.FAILED_PRECONDITION
        elif reason in ("member", "signature"):
            code = grpc.StatusCode.PERMISSION_DENIED
        return StatusError(code, message)

    async def handle(
        self, request: averager_pb2.ReduceRequest, peer: str
    ) -> averager_pb2.ReduceReply:
        source = request.sender.hex()[:16] or peer
        if request.run_id != self.config.run_id:
            raise self._refuse("group", "another run", source)
        round_ = self.rounds.get(request.round)
        if round_ is None:
            raise self._refuse("not_averaging", f"not averaging in round {request.round}", source)
        timeout = self.config.window + self.config.settle + self.config.reduce_timeout
        try:
            await asyncio.wait_for(round_.formed.wait(), timeout)
        except TimeoutError:
            raise self._refuse("not_averaging", "round not formed in time", source) from None
        reduction = round_.reduction
        member = round_.position.get(request.sender)
        if reduction is None or request.group != round_.digest:
            if reduction is not None and member is not None and self._signed(request):
                reduction.refuse(member)  # it saw another group: do not wait for it
            raise self._refuse("group", "this peer formed another group in that round", source)
        if member is None:
            raise self._refuse("member", "the sender is not a member of this group", source)
        if request.part != round_.index:
            raise self._refuse("shape", f"this peer reduces part {round_.index}", source)
        if request.chunk >= reduction.chunks:
            raise self._refuse("shape", f"part has {reduction.chunks} chunks", source)
        weight = request.weight
        if not (np.isfinite(weight) and 0.0 <= weight <= 1e15):
            reduction.refuse(member)
            raise self._refuse("weight", "weight must be finite and in [0, 1e15]", source)
        if not self._signed(request):
            raise self._refuse("signature", "bad signature", source)
        start, end = reduction.bounds(request.chunk)
        try:
            values = decode(request.values, end - start)
        except WireError as exc:
            reduction.refuse(member)
            raise self._refuse(exc.reason, str(exc), source) from None
        if self.metrics is not None:
            self.metrics.bytes.labels("received").inc(len(request.values.buffer))
        problem = reduction.add(member, request.chunk, values, weight)
        if problem is not None:
            raise self._refuse(problem, f"chunk refused: {problem}", source)
        try:
            reduced = await asyncio.wait_for(asyncio.shield(reduction.done), timeout)
        except (TimeoutError, asyncio.CancelledError):
            raise StatusError(grpc.StatusCode.UNAVAILABLE, "the part was not reduced") from None
        reply = averager_pb2.ReduceReply(
            values=encode(reduced.values[start:end], self.compression),
            contributors=reduced.contributors,
            clip_radius=reduced.radius,
        )
        if self.metrics is not None:
            self.metrics.bytes.labels("sent").inc(len(reply.values.buffer))
        return reply

    def _signed(self, request: averager_pb2.ReduceRequest) -> bool:
        message = signed_message(
            self.config.run_id, request.round, request.group, request.part, request.chunk,
            request.weight, request.values.buffer,
        )  # fmt: skip
        return verify(request.sender, request.signature, message)

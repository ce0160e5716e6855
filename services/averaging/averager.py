"""``Averager``: average a flat float32 vector with the peers of a run (docs/averaging.md).

One round (:meth:`Averager.step`): announce in the DHT for the next matchmaking slot, read the
slot's announcements when it closes, form the same groups as every other peer
(:mod:`~services.averaging.matchmaking`), then a butterfly all-reduce: the vector is cut into
one part per member, member ``j`` reduces part ``j`` (robust aggregation,
:mod:`~services.averaging.aggregate`) from every member's slice and sends the result back.
Slices travel in chunks of at most 1 MiB, each a ``Reduce`` request over the peer link to the
reducer, whose reply is that chunk of the reduced part.

Failure semantics (the round is all or nothing for each member):
- a member that sends nothing, too little, or something invalid is left out of the parts it did
  not complete; the reducers finish at the phase deadline (or at once, for a refused member)
  without it, and the others' round succeeds;
- a part whose reducer does not answer (dead, stalled past the deadline, a different view of
  the group) or answers with anything but the right number of finite float32 values fails the
  round for whoever misses it: that member keeps its own vector exactly, and nobody ever keeps a
  half-written or non-finite one;
- every phase is bounded: the DHT calls by their timeout, the reducer by ``reduce_timeout``
  after the slot is read, the member by that plus ``reply_grace``.

Numpy and grpc only (no torch): :mod:`services.trainer.averaging` maps a model's tensors onto
the vector. The averager lives on one asyncio loop; its ``Reduce`` handler is served by the
process's gRPC server (:meth:`register`, :attr:`link`) and answered by
:mod:`services.averaging.reduce_handler` (:attr:`reducer`); the settings, results and this
peer's view of a round are :mod:`services.averaging.rounds`. Its ``DownloadState`` handler and the
state offer for newcomers are :mod:`services.averaging.state_transfer` (:attr:`state`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import numpy as np

from services.averaging.matchmaking import (
    READY_SUBKEY,
    group_digest,
    groups_of,
    members_from,
    next_slot,
    part_bounds,
    round_key,
)
from services.averaging.metrics import AveragerMetrics
from services.averaging.reduce_handler import ReduceHandler
from services.averaging.reduction import Reduced, Reduction
from services.averaging.rounds import AveragerConfig, PartResult, RoundResult, RoundView
from services.averaging.state_transfer import LayoutCheck, State, StateTransfer
from services.averaging.wire import (
    COMPRESSIONS,
    SERVICE_NAME,
    chunk_elements,
    decode,
    encode,
    signed_message,
)
from services.common.channel_cache import ChannelCache, bare_channel
from services.common.channels import channel_options
from services.common.errors import CallError
from services.common.identity import Identity
from services.common.link import (
    LinkPool,
    LinkServer,
    link_method_handler,
    protobuf_method,
)
from services.common.rejections import RateLimitedLog
from services.common.server import add_service
from services.common.tls import TLSConfig
from services.proto import averager_pb2
from services.proto.link_pb2 import LinkBatch

log = logging.getLogger(__name__)
# the settings and results are rounds.py's; imported from here too
__all__ = ["SERVICE_NAME", "Averager", "AveragerConfig", "PartResult", "RoundResult"]


class Averager:
    """Averages vectors of ``size`` float32 values with the peers of ``config.run_id``.

    ``dht``: a :class:`~services.dht.client.DHTClient` with this peer's ``identity`` (its
    ``trusted`` keys, when set, are the only peers read back). ``address``: this peer's gRPC
    server as others dial it. ``state_source``: returns ``(step, samples, [(name, array)])``
    for newcomers (:meth:`download_state`); None offers nothing.
    """

    def __init__(
        self,
        config: AveragerConfig,
        *,
        size: int,
        dht: Any,
        identity: Identity,
        address: str,
        metrics: AveragerMetrics | None = None,
        tls: TLSConfig | None = None,
        state_source: Callable[[], State] | None = None,
        max_message_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        if config.compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {sorted(COMPRESSIONS)}")
        if config.target_group_size < 2:
            raise ValueError("target_group_size must be at least 2")
        self.config = config
        self.size = int(size)
        self.dht = dht
        self.identity = identity
        self.address = address
        self.metrics = metrics
        self.compression = COMPRESSIONS[config.compression]
        self.chunk = chunk_elements(self.compression, config.chunk_bytes)
        self._tls = tls
        self._options = channel_options(max_message_bytes)
        # a channel per peer, closed 1 s after it is dropped (a failed link) or at close()
        self._channels = ChannelCache(bare_channel, self._options, tls, grace=1.0)
        self._links = LinkPool(self._open_link, self._channels.forget, 64)
        self._rounds: dict[int, RoundView] = {}
        self._warn = RateLimitedLog(log)
        self.step_of: Callable[[], int] = lambda: 0  # the step offered with the state
        self.state = StateTransfer(
            run_id=config.run_id, size=self.size, dht=dht, identity=identity,
            offer_period=config.state_offer_period, options=self._options, metrics=metrics,
            tls=tls, source=state_source, step_of=lambda: self.step_of(),
            address_of=lambda: self.address,
        )  # fmt: skip
        self.last: RoundResult | None = None
        # how this peer's slices go on the wire (a test's hostile peer replaces it)
        self.encode: Callable[[np.ndarray], Any] = lambda v: encode(v, self.compression)
        self.reducer = ReduceHandler(config, self._rounds, self.compression, metrics, self._warn)
        self.link = LinkServer(
            {"Reduce": protobuf_method(averager_pb2.ReduceRequest, self.reducer.handle)}
        )

    # ---- gRPC plumbing ---------------------------------------------------------------------
    def register(self, server: grpc.aio.Server) -> list[str]:
        """Add ``dmoe.Averager`` to ``server`` (pass :attr:`link` to ``start_server(links=)``)."""
        handlers = {
            "Reduce": grpc.unary_unary_rpc_method_handler(
                self.Reduce,
                request_deserializer=averager_pb2.ReduceRequest.FromString,
                response_serializer=averager_pb2.ReduceReply.SerializeToString,
            ),
            "DownloadState": grpc.unary_stream_rpc_method_handler(
                self.DownloadState,
                request_deserializer=averager_pb2.StateRequest.FromString,
                response_serializer=averager_pb2.StateChunk.SerializeToString,
            ),
            "Link": link_method_handler(self.Link),
        }
        return add_service(server, SERVICE_NAME, handlers)

    async def Reduce(
        self, request: averager_pb2.ReduceRequest, context: grpc.aio.ServicerContext
    ) -> averager_pb2.ReduceReply:
        # a StatusError: the guard answers
        return await self.reducer.handle(request, context.peer())

    def Link(self, batches: Any, context: grpc.aio.ServicerContext) -> Any:
        return self.link.serve(batches, context)

    def _open_link(self, address: str) -> Any:
        return self._channels.get(address).stream_stream(
            f"/{SERVICE_NAME}/Link",
            request_serializer=LinkBatch.SerializeToString,
            response_deserializer=LinkBatch.FromString,
        )()

    async def close(self) -> None:
        await self.state.close()
        for round_ in self._rounds.values():
            if round_.reduction is not None:
                round_.reduction.cancel()
        self._rounds.clear()
        await self._links.close()
        await self._channels.close()

    # ---- member side -----------------------------------------------------------------------
    async def _sleep_until(self, dht_time: float) -> None:
        delay = dht_time - self.dht.now()
        if delay > 0:
            await asyncio.sleep(delay)

    def next_slot(self) -> int:
        """The slot a :meth:`step` called now joins."""
        return next_slot(self.dht.now(), self.config.window, self.config.lead)

    async def step(
        self, vector: np.ndarray, weight: float = 1.0, slot: int | None = None
    ) -> RoundResult:
        """One round; the result's ``vector`` is the group's average (None unless ``ok``).

        The caller's ``vector`` is never modified. ``weight``: this peer's share (the samples it
        processed since its last round). ``slot``: join this one (from :meth:`next_slot`; a
        slot that closed meanwhile fails the round); default: the next one. One step at a
        time per averager."""
        vector = np.ascontiguousarray(vector, dtype=np.float32).reshape(-1)
        if len(vector) != self.size:
            raise ValueError(f"vector has {len(vector)} values, the averager {self.size}")
        if not np.isfinite(vector).all():
            raise ValueError("refusing to average a vector with NaN or infinity")
        if not (np.isfinite(weight) and weight >= 0):
            raise ValueError("weight must be finite and >= 0")
        started = time.monotonic()
        cfg = self.config
        if slot is None:
            slot = self.next_slot()
        elif self.dht.now() > (slot + 1) * cfg.window:
            result = RoundResult("failed", slot, reason="the slot closed before the round began")
            self._record(result)
            return result
        round_ = RoundView(slot)
        self._rounds[slot] = round_
        try:
            result = await self._round(round_, vector, float(weight))
        except (ConnectionError, TimeoutError, CallError, ValueError) as exc:
            result = RoundResult("failed", slot, reason=f"dht: {type(exc).__name__}: {exc}")
        finally:
            round_.formed.set()  # handlers waiting on a round that never formed give up now
            loop = asyncio.get_running_loop()
            loop.call_later(cfg.reduce_timeout + cfg.reply_grace, self._drop_round, round_)
        result.seconds = time.monotonic() - started
        result.finished_at = time.time()
        self._record(result)
        return result

    def _drop_round(self, round_: RoundView) -> None:
        if self._rounds.get(round_.slot) is round_:
            del self._rounds[round_.slot]
        if round_.reduction is not None:
            round_.reduction.cancel()

    def _record(self, result: RoundResult) -> None:
        self.last = result
        extra = {
            "outcome": result.outcome, "round": result.slot, "group_size": result.group_size,
            "seconds": round(result.seconds, 3),
        }  # fmt: skip
        if result.outcome == "failed":
            log.warning("averaging round failed: %s", result.reason, extra=extra)
        else:
            log.info("averaging round", extra=extra)
        if self.metrics is not None:
            self.metrics.rounds.labels(result.outcome).inc()
            self.metrics.duration.observe(result.seconds)
            if result.outcome == "ok":
                self.metrics.group_size.observe(result.group_size)
                self.metrics.last_round.set(result.finished_at)

    async def _round(self, round_: RoundView, vector: np.ndarray, weight: float) -> RoundResult:
        cfg, slot = self.config, round_.slot
        key = round_key(cfg.run_id, slot)
        announce = averager_pb2.AveragerAnnounce(address=self.address, size=self.size)
        expiration = (slot + 1) * cfg.window + cfg.reduce_timeout + 60.0
        stored = await self.dht.put(
            [(key, READY_SUBKEY, announce.SerializeToString(), expiration)], owned=True
        )
        if not all(stored):
            return RoundResult("failed", slot, reason="the DHT did not store the announcement")
        read_at = (slot + 1) * cfg.window + cfg.settle
        await self._sleep_until(read_at)
        found = (await self.dht.get([key], latest=True)).get(key)
        members, skipped = members_from(found, self.size)
        if skipped and self.metrics is not None:
            self.metrics.refused.labels("announcement").inc(skipped)
        me = self.identity.public_key
        if not any(m.key == me for m in members):
            return RoundResult("failed", slot, reason="own announcement not read back")
        group = next(g for g in groups_of(members, cfg.run_id, slot, cfg.target_group_size)
                     if any(m.key == me for m in g))  # fmt: skip
        keys = [m.key for m in group]
        if len(group) < 2:
            return RoundResult("alone", slot, group=keys)
        round_.members, round_.digest = group, group_digest(cfg.run_id, slot, group)
        round_.position = {k: i for i, k in enumerate(keys)}
        round_.index = round_.position[me]
        round_.bounds = part_bounds(self.size, len(group))
        # phase ends are shared: fixed from the slot on the DHT clock, not from when this peer
        # got to read it (a peer that read late still finishes with the others)
        end_reduce = read_at + cfg.reduce_timeout
        deadline = time.monotonic() + (end_reduce - self.dht.now())
        round_.replies_by = end_reduce + cfg.reply_grace
        own_start, own_end = round_.bounds[round_.index]
        round_.reduction = Reduction(
            len(group), round_.index, vector[own_start:own_end], weight, self.chunk, deadline,
            cfg.aggregation, self.compression,
        )  # fmt: skip
        round_.formed.set()
        parts = await asyncio.gather(
            *(
                self._own_part(round_.reduction)
                if j == round_.index
                else self._remote_part(round_, j, vector, weight)
                for j in range(len(group))
            )
        )
        problems = [p for p in parts if isinstance(p, str)]
        if problems:
            return RoundResult("failed", slot, group=keys, reason="; ".join(problems)[:500])
        answers = [p for p in parts if not isinstance(p, str)]
        out = np.empty_like(vector)
        results = []
        for (start, end), (values, contributors, radius) in zip(
            round_.bounds, answers, strict=True
        ):
            out[start:end] = values
            results.append(PartResult(start, end, [keys[c] for c in contributors], radius))
        suspect = self._moved_too_far(vector, out, round_.bounds, round_.index)
        if suspect is not None:
            if self.metrics is not None:
                self.metrics.refused.labels("result").inc()
            return RoundResult("failed", slot, group=keys, reason=suspect)
        return RoundResult("ok", slot, group=keys, vector=out, parts=results)

    def _moved_too_far(
        self, before: np.ndarray, after: np.ndarray, bounds: list[tuple[int, int]], own: int
    ) -> str | None:
        """A part another member reduced that moves this peer's values far more (RMS per
        value) than the other parts do: ``result_factor`` times their median. A hostile reducer
        could otherwise replace its part of everybody's vector with any finite values; with the
        check it can at most make the round fail (docs/averaging.md)."""
        factor = self.config.result_factor
        if factor <= 0 or len(bounds) < 3:
            return None
        moves = []
        for start, end in bounds:
            d = after[start:end].astype(np.float64) - before[start:end]
            moves.append(float(np.sqrt(np.dot(d, d) / max(1, end - start))))
        for part, move in enumerate(moves):
            if part == own:
                continue  # reduced here
            others = [m for q, m in enumerate(moves) if q != part]
            limit = factor * float(np.median(others))
            if move > limit:
                return f"part {part} moved {move:.3g} RMS, over {factor:g}x the others' median"
        return None

    async def _own_part(self, reduction: Reduction) -> tuple[np.ndarray, list[int], float] | str:
        try:
            reduced: Reduced = await asyncio.wait_for(
                asyncio.shield(reduction.done), self.config.reduce_timeout + 1.0
            )
        except (TimeoutError, asyncio.CancelledError):
            return "own part not reduced"
        return reduced.values, reduced.contributors, reduced.radius

    async def _remote_part(
        self, round_: RoundView, part: int, vector: np.ndarray, weight: float
    ) -> tuple[np.ndarray, list[int], float] | str:
        cfg = self.config
        reducer = round_.members[part]
        start, end = round_.bounds[part]
        chunks = max(1, -(-(end - start) // self.chunk))
        timeout = max(0.1, round_.replies_by - self.dht.now())
        calls = []
        for c in range(chunks):
            c0, c1 = start + c * self.chunk, min(end, start + (c + 1) * self.chunk)
            values = self.encode(vector[c0:c1])
            message = signed_message(cfg.run_id, round_.slot, round_.digest, part, c, weight,
                                     values.buffer)  # fmt: skip
            request = averager_pb2.ReduceRequest(
                run_id=cfg.run_id, round=round_.slot, group=round_.digest,
                sender=self.identity.public_key, part=part, chunk=c, weight=weight,
                values=values, signature=self.identity.sign(message),
            )  # fmt: skip
            if self.metrics is not None:
                self.metrics.bytes.labels("sent").inc(len(values.buffer))
            calls.append(self._links.call(reducer.address, "Reduce",
                                          request.SerializeToString(), timeout))  # fmt: skip
        replies = await asyncio.gather(*calls, return_exceptions=True)
        out = np.empty(end - start, dtype=np.float32)
        contributors: list[int] | None = None
        radius = 0.0
        for c, reply in enumerate(replies):
            if isinstance(reply, BaseException):
                code = reply.code.name if isinstance(reply, CallError) else type(reply).__name__
                return f"part {part}: {code} {reply}"[:200]
            try:
                msg = averager_pb2.ReduceReply.FromString(reply)
                c0, c1 = c * self.chunk, min(end - start, (c + 1) * self.chunk)
                out[c0:c1] = decode(msg.values, c1 - c0)
            except Exception as exc:  # a malformed reply or wrong values: refuse the result
                if self.metrics is not None:
                    self.metrics.refused.labels("result").inc()
                return f"part {part}: bad result: {exc}"[:200]
            if self.metrics is not None:
                self.metrics.bytes.labels("received").inc(len(msg.values.buffer))
            members = sorted(set(msg.contributors))
            if any(m >= len(round_.members) for m in members) or (
                contributors is not None and members != contributors
            ):
                return f"part {part}: inconsistent contributors"
            contributors, radius = members, msg.clip_radius
        return out, contributors or [], radius

    # ---- state for newcomers (services.averaging.state_transfer) ---------------------------
    def start_offering_state(self) -> None:
        """Announce this peer's state to newcomers every ``state_offer_period`` seconds."""
        self.state.start_offering()

    def DownloadState(
        self, request: averager_pb2.StateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[averager_pb2.StateChunk]:
        return self.state.serve(request, context)

    async def download_state(
        self,
        check: LayoutCheck,
        timeout: float = 60.0,
        max_bytes: int = 1 << 32,
        attempts: int = 3,
    ) -> State | None:
        """The state of a random peer of the run that offers one, or None (none answered);
        see :meth:`services.averaging.state_transfer.StateTransfer.download`."""
        return await self.state.download(check, timeout, max_bytes, attempts)

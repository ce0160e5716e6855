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
process's gRPC server (:meth:`register`, :attr:`link`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from services.averaging.aggregate import Aggregation
from services.averaging.matchmaking import (
    READY_SUBKEY,
    STATE_SUBKEY,
    Member,
    group_digest,
    groups_of,
    members_from,
    next_slot,
    parse_announce,
    part_bounds,
    round_key,
    state_key,
)
from services.averaging.metrics import AveragerMetrics
from services.averaging.reduction import Reduced, Reduction
from services.averaging.wire import (
    COMPRESSIONS,
    WireError,
    chunk_elements,
    decode,
    encode,
    signed_message,
)
from services.common.channel_cache import ChannelCache, bare_channel
from services.common.channels import aio_channel, channel_options
from services.common.errors import CallError, StatusError
from services.common.identity import Identity, verify
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
SERVICE_NAME = "dmoe.Averager"
STATE_CHUNK_BYTES = 1 << 20
MAX_STATE_SERVES = 2  # state downloads served at once


@dataclass
class AveragerConfig:
    """How a peer averages; every member of a run should use the same values."""

    run_id: str
    target_group_size: int = 8
    window: float = 2.0  # seconds per matchmaking slot (DHT clock)
    settle: float = 0.3  # read the slot this long after it closes
    lead: float = 0.3  # join a slot only this long before it closes (else the next one)
    reduce_timeout: float = 10.0  # reducers wait this long after the read for slices
    reply_grace: float = 5.0  # members wait this much longer for the reduced parts
    compression: str = "none"  # none | float16 on the wire
    aggregation: Aggregation = field(default_factory=Aggregation)
    chunk_bytes: int = 1 << 20
    state_offer_period: float = 10.0  # re-announce the state offer this often (0: never)
    # refuse a reduced part that moves this peer's values (RMS) more than this times the median
    # of the other parts' moves (groups of 3 or more; 0: off)
    result_factor: float = 10.0


@dataclass
class PartResult:
    start: int
    end: int
    contributors: list[bytes]  # public keys of the members whose slices the part holds
    radius: float


@dataclass
class RoundResult:
    """What one round gave: ``vector`` is None unless ``outcome`` is ``ok``."""

    outcome: str  # ok | alone | failed
    slot: int
    group: list[bytes] = field(default_factory=list)
    vector: np.ndarray | None = None
    parts: list[PartResult] = field(default_factory=list)
    seconds: float = 0.0
    reason: str = ""
    finished_at: float = 0.0

    @property
    def group_size(self) -> int:
        return len(self.group)


class _Round:
    """This peer's view of one slot; reducers' handlers wait on ``formed``."""

    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.formed = asyncio.Event()
        self.digest = b""
        self.members: list[Member] = []
        self.index = -1
        self.position: dict[bytes, int] = {}
        self.bounds: list[tuple[int, int]] = []
        self.reduction: Reduction | None = None
        self.replies_by = 0.0  # DHT time after which a member stops waiting for reduced parts


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
        state_source: Callable[[], tuple[int, int, list[tuple[str, np.ndarray]]]] | None = None,
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
        self.state_source = state_source
        self.compression = COMPRESSIONS[config.compression]
        self.chunk = chunk_elements(self.compression, config.chunk_bytes)
        self._tls = tls
        self._options = channel_options(max_message_bytes)
        # a channel per peer, closed 1 s after it is dropped (a failed link) or at close()
        self._channels = ChannelCache(bare_channel, self._options, tls, grace=1.0)
        self._links = LinkPool(self._open_link, self._channels.forget, 64)
        self._rounds: dict[int, _Round] = {}
        self._state_serves = 0
        self._warn = RateLimitedLog(log)
        self._offer_task: asyncio.Task[None] | None = None
        self.step_of: Callable[[], int] = lambda: 0
        self.last: RoundResult | None = None
        # how this peer's slices go on the wire (a test's hostile peer replaces it)
        self.encode: Callable[[np.ndarray], Any] = lambda v: encode(v, self.compression)
        self.link = LinkServer(
            {"Reduce": protobuf_method(averager_pb2.ReduceRequest, self._reduce)}
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
        return await self._reduce(request, context.peer())  # a StatusError: the guard answers

    def Link(self, batches: Any, context: grpc.aio.ServicerContext) -> Any:
        return self.link.serve(batches, context)

    def _open_link(self, address: str) -> Any:
        return self._channels.get(address).stream_stream(
            f"/{SERVICE_NAME}/Link",
            request_serializer=LinkBatch.SerializeToString,
            response_deserializer=LinkBatch.FromString,
        )()

    async def close(self) -> None:
        if self._offer_task is not None:
            self._offer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._offer_task
        for round_ in self._rounds.values():
            if round_.reduction is not None:
                round_.reduction.cancel()
        self._rounds.clear()
        await self._links.close()
        await self._channels.close()

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

    # ---- reducer side ----------------------------------------------------------------------
    async def _reduce(
        self, request: averager_pb2.ReduceRequest, peer: str
    ) -> averager_pb2.ReduceReply:
        source = request.sender.hex()[:16] or peer
        if request.run_id != self.config.run_id:
            raise self._refuse("group", "another run", source)
        round_ = self._rounds.get(request.round)
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
        round_ = _Round(slot)
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

    def _drop_round(self, round_: _Round) -> None:
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

    async def _round(self, round_: _Round, vector: np.ndarray, weight: float) -> RoundResult:
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
        self, round_: _Round, part: int, vector: np.ndarray, weight: float
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

    # ---- state for newcomers -----------------------------------------------------------------
    def start_offering_state(self) -> None:
        """Announce this peer's state to newcomers every ``state_offer_period`` seconds."""
        if self.state_source is not None and self.config.state_offer_period > 0:
            self._offer_task = asyncio.ensure_future(self._offer_loop())

    async def _offer_loop(self) -> None:
        period = self.config.state_offer_period
        while True:
            offer = averager_pb2.AveragerAnnounce(
                address=self.address, size=self.size, step=self.step_of()
            )
            try:
                await self.dht.put(
                    [(state_key(self.config.run_id), STATE_SUBKEY, offer.SerializeToString(),
                      self.dht.now() + 3 * period)], owned=True,
                )  # fmt: skip
            except Exception as exc:
                self._warn.warn("offer", "state offer failed", error=str(exc)[:200])
            await asyncio.sleep(period)

    async def DownloadState(
        self, request: averager_pb2.StateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[averager_pb2.StateChunk]:
        if request.run_id != self.config.run_id or self.state_source is None:
            raise StatusError(grpc.StatusCode.NOT_FOUND, "no state for that run here")
        assert self.state_source is not None
        if self._state_serves >= MAX_STATE_SERVES:  # each holds a copy of the whole state
            raise StatusError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "serving other newcomers; ask another peer"
            )
        self._state_serves += 1
        try:
            async for chunk in self._state_chunks():
                yield chunk
        finally:
            self._state_serves -= 1

    async def _state_chunks(self) -> AsyncIterator[averager_pb2.StateChunk]:
        assert self.state_source is not None
        step, samples, tensors = self.state_source()
        header = averager_pb2.StateChunk(step=step, samples_seen=samples)
        for name, array in tensors:
            header.tensors.append(averager_pb2.StateTensor(name=name, shape=list(array.shape)))
        first = True
        for name, array in tensors:
            data = np.ascontiguousarray(array, dtype="<f4").tobytes()
            del name
            for offset in range(0, max(1, len(data)), STATE_CHUNK_BYTES):
                piece = data[offset : offset + STATE_CHUNK_BYTES]
                if first:
                    header.data = piece
                    yield header
                    first = False
                else:
                    yield averager_pb2.StateChunk(data=piece)
        if first:
            yield header

    async def download_state(
        self,
        check: Callable[[list[tuple[str, tuple[int, ...]]]], str | None],
        timeout: float = 60.0,
        max_bytes: int = 1 << 32,
        attempts: int = 3,
    ) -> tuple[int, int, list[tuple[str, np.ndarray]]] | None:
        """The state of a random peer of the run that offers one, or None (none answered).

        ``check(specs)`` returns a problem for a layout this peer cannot load (names,
        shapes); such a state, a stream that breaks, more bytes than announced or non-finite
        values make it try the next peer."""
        found = (await self.dht.get([state_key(self.config.run_id)], latest=True)).get(
            state_key(self.config.run_id)
        )
        offers = []
        if isinstance(found, dict):
            for entry in found.get(STATE_SUBKEY, []):
                if entry.owner == self.identity.public_key:
                    continue
                member = parse_announce(entry.owner, entry.value)
                if member is not None and member.size == self.size:
                    offers.append(member)
        random.shuffle(offers)
        if not offers:
            if self.metrics is not None:
                self.metrics.state_downloads.labels("none").inc()
            return None
        for member in offers[:attempts]:
            try:
                state = await asyncio.wait_for(self._download(member, check, max_bytes), timeout)
            except Exception as exc:
                log.warning("state download failed", extra={"peer": member.address,
                            "error": f"{type(exc).__name__}: {exc}"[:300]})  # fmt: skip
                continue
            if self.metrics is not None:
                self.metrics.state_downloads.labels("ok").inc()
            log.info("state fetched from a peer", extra={"peer": member.address, "step": state[0]})
            return state
        if self.metrics is not None:
            self.metrics.state_downloads.labels("failed").inc()
        return None

    async def _download(
        self,
        member: Member,
        check: Callable[[list[tuple[str, tuple[int, ...]]]], str | None],
        max_bytes: int,
    ) -> tuple[int, int, list[tuple[str, np.ndarray]]]:
        channel = aio_channel(member.address, self._options, self._tls)
        try:
            call = channel.unary_stream(
                f"/{SERVICE_NAME}/DownloadState",
                request_serializer=averager_pb2.StateRequest.SerializeToString,
                response_deserializer=averager_pb2.StateChunk.FromString,
            )(averager_pb2.StateRequest(run_id=self.config.run_id))
            header: averager_pb2.StateChunk | None = None
            data = bytearray()
            total = 0
            async for chunk in call:
                if header is None:
                    header = chunk
                    specs = [(t.name, tuple(int(d) for d in t.shape)) for t in header.tensors]
                    if any(d < 0 for _, shape in specs for d in shape):
                        raise ValueError("negative dimension")
                    total = 4 * sum(int(np.prod(s)) for _, s in specs)
                    if total > max_bytes:
                        raise ValueError(f"state of {total} bytes is over the limit")
                    problem = check(specs)
                    if problem:
                        raise ValueError(f"state does not fit this model: {problem}")
                data += chunk.data
                if len(data) > total:
                    raise ValueError("more bytes than the state announced")
            if header is None or len(data) != total:
                raise ValueError(f"state ended after {len(data)} of {total} bytes")
        except grpc.aio.AioRpcError as exc:
            raise CallError.of_rpc(exc) from None
        finally:
            await channel.close()
        arrays, offset = [], 0
        for name, shape in specs:
            count = int(np.prod(shape))
            array = np.frombuffer(bytes(data[offset : offset + 4 * count]), dtype="<f4")
            offset += 4 * count
            if not np.isfinite(array).all():
                raise ValueError(f"{name} holds NaN or infinity")
            arrays.append((name, array.reshape(shape).astype(np.float32)))
        return int(header.step), int(header.samples_seen), arrays

"""State for newcomers: a peer offers its state in the DHT and serves it; a newcomer downloads it.

A peer that joins a run late starts from the state of one that trained (parameters, optimizer
statistics, step count; which tensors is the caller's choice, :mod:`services.trainer.averaging`)
rather than from its own initialisation, so its first averaging round does not drag the group
back. Offering: every ``offer_period`` seconds the peer puts its address and step under the
run's state key (:func:`~services.averaging.matchmaking.state_key`), expiring after three
periods, so a peer that leaves stops being offered soon. Serving: ``dmoe.Averager/DownloadState``
streams one header (step, samples, tensor names and shapes) then the float32 bytes in chunks of
at most 1 MiB; at most ``MAX_STATE_SERVES`` downloads at once, since each holds a copy of the
whole state. Downloading: a random offer of the right vector size, checked as hostile input
(layout, announced size, byte count, finite values); a bad one moves on to the next offer.

Kept apart from the rounds (:mod:`services.averaging.averager`): it shares the run, the DHT and
the gRPC service with them but no state, and runs rarely (once per newcomer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import numpy as np

from services.averaging.matchmaking import STATE_SUBKEY, Member, parse_announce, state_key
from services.averaging.metrics import AveragerMetrics
from services.averaging.wire import SERVICE_NAME
from services.common.channels import aio_channel
from services.common.errors import CallError, StatusError
from services.common.identity import Identity
from services.common.rejections import RateLimitedLog
from services.common.tls import TLSConfig
from services.proto import averager_pb2

log = logging.getLogger(__name__)
STATE_CHUNK_BYTES = 1 << 20
MAX_STATE_SERVES = 2  # state downloads served at once

State = tuple[int, int, list[tuple[str, np.ndarray]]]  # (step, samples seen, [(name, array)])
LayoutCheck = Callable[[list[tuple[str, tuple[int, ...]]]], str | None]


class StateTransfer:
    """Offers, serves and downloads the state of a peer of ``run_id`` (vectors of ``size``).

    ``source`` returns this peer's state when a newcomer asks (None: offers and serves
    nothing); ``address_of`` and ``step_of`` the address and step announced with the offer,
    read at each announcement (the owner may learn its address after construction).
    ``options``: the gRPC channel options a download dials with.
    """

    def __init__(
        self,
        *,
        run_id: str,
        size: int,
        dht: Any,
        identity: Identity,
        address_of: Callable[[], str],
        offer_period: float,
        options: list[tuple[str, Any]],
        metrics: AveragerMetrics | None = None,
        tls: TLSConfig | None = None,
        source: Callable[[], State] | None = None,
        step_of: Callable[[], int] = lambda: 0,
    ) -> None:
        self.run_id = run_id
        self.size = size
        self.dht = dht
        self.identity = identity
        self.address_of = address_of
        self.offer_period = offer_period
        self.metrics = metrics
        self.source = source
        self.step_of = step_of
        self._options = options
        self._tls = tls
        self._serves = 0
        self._warn = RateLimitedLog(log)
        self._offer_task: asyncio.Task[None] | None = None

    async def close(self) -> None:
        if self._offer_task is not None:
            self._offer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._offer_task

    # ---- offering ----------------------------------------------------------------------------
    def start_offering(self) -> None:
        """Announce this peer's state to newcomers every ``offer_period`` seconds."""
        if self.source is not None and self.offer_period > 0:
            self._offer_task = asyncio.ensure_future(self._offer_loop())

    async def _offer_loop(self) -> None:
        period = self.offer_period
        while True:
            offer = averager_pb2.AveragerAnnounce(
                address=self.address_of(), size=self.size, step=self.step_of()
            )
            try:
                await self.dht.put(
                    [(state_key(self.run_id), STATE_SUBKEY, offer.SerializeToString(),
                      self.dht.now() + 3 * period)], owned=True,
                )  # fmt: skip
            except Exception as exc:
                self._warn.warn("offer", "state offer failed", error=str(exc)[:200])
            await asyncio.sleep(period)

    # ---- serving -----------------------------------------------------------------------------
    async def serve(
        self, request: averager_pb2.StateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[averager_pb2.StateChunk]:
        """The ``DownloadState`` handler."""
        if request.run_id != self.run_id or self.source is None:
            raise StatusError(grpc.StatusCode.NOT_FOUND, "no state for that run here")
        if self._serves >= MAX_STATE_SERVES:  # each holds a copy of the whole state
            raise StatusError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "serving other newcomers; ask another peer"
            )
        self._serves += 1
        try:
            async for chunk in self._chunks():
                yield chunk
        finally:
            self._serves -= 1

    async def _chunks(self) -> AsyncIterator[averager_pb2.StateChunk]:
        assert self.source is not None
        step, samples, tensors = self.source()
        header = averager_pb2.StateChunk(step=step, samples_seen=samples)
        for name, array in tensors:
            header.tensors.append(averager_pb2.StateTensor(name=name, shape=list(array.shape)))
        first = True
        for _, array in tensors:
            data = np.ascontiguousarray(array, dtype="<f4").tobytes()
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

    # ---- downloading -------------------------------------------------------------------------
    async def download(
        self,
        check: LayoutCheck,
        timeout: float = 60.0,
        max_bytes: int = 1 << 32,
        attempts: int = 3,
    ) -> State | None:
        """The state of a random peer of the run that offers one, or None (none answered).

        ``check(specs)`` returns a problem for a layout this peer cannot load (names,
        shapes); such a state, a stream that breaks, more bytes than announced or non-finite
        values make it try the next peer."""
        found = (await self.dht.get([state_key(self.run_id)], latest=True)).get(
            state_key(self.run_id)
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

    async def _download(self, member: Member, check: LayoutCheck, max_bytes: int) -> State:
        channel = aio_channel(member.address, self._options, self._tls)
        try:
            call = channel.unary_stream(
                f"/{SERVICE_NAME}/DownloadState",
                request_serializer=averager_pb2.StateRequest.SerializeToString,
                response_deserializer=averager_pb2.StateChunk.FromString,
            )(averager_pb2.StateRequest(run_id=self.run_id))
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

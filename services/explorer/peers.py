"""The explorer's calls to strangers: ``Expert/Info``, ``DHT/NodeStatus``, ``Trainer/Status``.

Every call has a deadline and waits its turn behind one semaphore (``concurrency`` calls at
once, however many peers the DHT names), and replies larger than ``MAX_REPLY_BYTES`` are
refused by gRPC before they are parsed: a peer can make the explorer wait at most a
timeout and allocate at most that much. A channel is kept per address while the address is
in use; after a failed call it is set aside, so the next round dials afresh (gRPC's own
reconnect back-off would otherwise keep a restarted server looking dead for minutes), and
closed at the end of the round: closing it at once would cancel the other calls still on it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from services.common.channels import aio_channel, channel_options
from services.common.tls import TLSConfig
from services.proto import (
    dht_pb2,
    dht_pb2_grpc,
    expert_pb2,
    expert_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)

MAX_REPLY_BYTES = 1 << 20  # Info, NodeStatus and Status replies are a few hundred bytes
T = TypeVar("T")


class CallFailed(Exception):
    """A peer did not answer in time or answered with an error (``str`` says which)."""


class Peers:
    """Channels to peers and the bounded, timed calls made over them."""

    def __init__(self, timeout: float, concurrency: int, tls: TLSConfig | None = None) -> None:
        self.timeout = timeout
        self._slots = asyncio.Semaphore(max(1, concurrency))
        self._tls = tls
        self._options = channel_options(MAX_REPLY_BYTES)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._failed: list[grpc.aio.Channel] = []  # closed by end_round
        self._used: set[str] = set()

    def _channel(self, address: str) -> grpc.aio.Channel:
        self._used.add(address)
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = aio_channel(address, self._options, self._tls)
        return channel

    def _set_aside(self, address: str) -> None:
        channel = self._channels.pop(address, None)
        if channel is not None:
            self._failed.append(channel)

    async def _call(
        self, address: str, call: Callable[[grpc.aio.Channel], Awaitable[T]]
    ) -> tuple[T, float]:
        """``call(channel)`` under the semaphore and the deadline: (reply, seconds)."""
        async with self._slots:
            started = time.perf_counter()
            try:
                reply = await asyncio.wait_for(call(self._channel(address)), self.timeout + 1)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    self._set_aside(address)
                raise CallFailed(f"{exc.code().name}: {(exc.details() or '')[:200]}") from None
            except TimeoutError:
                self._set_aside(address)
                raise CallFailed("DEADLINE_EXCEEDED") from None
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # this call was cancelled, not the channel closed under it
                self._set_aside(address)
                raise CallFailed("CANCELLED: channel closed") from None
            return reply, time.perf_counter() - started

    async def info(self, address: str, uid: str) -> tuple[expert_pb2.InfoResponse, float]:
        def call(channel: grpc.aio.Channel) -> Any:
            stub = expert_pb2_grpc.ExpertStub(channel)
            return stub.Info(expert_pb2.InfoRequest(uid=uid), timeout=self.timeout)

        return await self._call(address, call)

    async def node_status(self, address: str) -> tuple[dht_pb2.NodeStatusResponse, float]:
        def call(channel: grpc.aio.Channel) -> Any:
            stub = dht_pb2_grpc.DHTStub(channel)
            return stub.NodeStatus(dht_pb2.NodeStatusRequest(), timeout=self.timeout)

        return await self._call(address, call)

    async def trainer_status(self, address: str) -> tuple[trainer_pb2.StatusResponse, float]:
        def call(channel: grpc.aio.Channel) -> Any:
            stub = trainer_pb2_grpc.TrainerStub(channel)
            return stub.Status(trainer_pb2.StatusRequest(), timeout=self.timeout)

        return await self._call(address, call)

    async def end_round(self) -> None:
        """Close the channels set aside after failures and those of addresses no call used
        this round (peers that left)."""
        for address in [a for a in self._channels if a not in self._used]:
            self._set_aside(address)
        failed, self._failed = self._failed, []
        for channel in failed:
            await channel.close()
        self._used.clear()

    async def close(self) -> None:
        for address in list(self._channels):
            self._set_aside(address)
        await self.end_round()

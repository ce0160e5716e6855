"""Admission limits of one gRPC server: in flight in total, and per calling IP.

Every call is admitted (or refused with a :class:`Refused` reason) before its handler runs:

- ``max_concurrent_rpcs``: calls being served at once by this server, all callers together;
  past it a flood cannot queue unbounded work and memory behind the event loop;
- per peer, keyed by the caller's IP address (:func:`peer_key`):
  ``max_peer_rps`` / ``max_peer_burst`` (a token bucket: a steady rate, plus a burst a busy
  honest caller may spend at once), ``max_peer_streams`` (streaming calls open at once; they
  live long and hold memory) and ``max_peer_bytes_in_flight`` (serialized request bytes held
  by the calls being served, each chunk of a stream counted as it arrives).

Why the IP and not ``ip:port``: every new connection gets a fresh ephemeral port, so a
per-port limit multiplies by the connections a caller opens (free); a limit per IP costs an
attacker real addresses. The price: processes behind one address (NAT, or a whole swarm on
127.0.0.1 as in the benchmarks) share one budget, hence defaults far above what one host of
this project sends honestly. IPv6 addresses are exact (not grouped by /64: containers on one
Docker network share a /64), IPv4-mapped IPv6 counts as the IPv4 address.

The peer table is bounded (``max_peers``): when full, peers with no call in flight whose
bucket has refilled are forgotten (they carry no state a fresh entry lacks), then the idle
ones seen longest ago. Callers with calls in flight are never forgotten; their number is
bounded by ``max_concurrent_rpcs``. A limit of 0 disables it.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, fields
from typing import NamedTuple

from services.common.addresses import peer_host

_KEY_CACHE = 8192  # peer strings (ip:port) remembered -> key; cleared when full


@dataclass(frozen=True)
class ServerLimits:
    """What one server admits; 0 turns a limit off. Flags: :func:`add_limit_flags`."""

    max_concurrent_rpcs: int = 1024
    max_peer_rps: float = 1000.0
    max_peer_burst: int = 2000
    max_peer_streams: int = 64
    max_peer_bytes_in_flight: int = 1 << 30
    max_peers: int = 4096  # callers remembered at once (not a flag)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not (value >= 0 and math.isfinite(value)):  # NaN fails the comparison
                raise ValueError(f"{f.name} must be a finite number >= 0 (0: no limit)")
        if self.max_peers < 1:
            raise ValueError("max_peers must be >= 1")

    @property
    def burst(self) -> float:
        """Tokens a bucket holds: ``max_peer_burst``, or one second's worth when 0."""
        return float(self.max_peer_burst or max(1.0, self.max_peer_rps))

    @classmethod
    def unlimited(cls) -> ServerLimits:
        return cls(**{f.name: 0 for f in fields(cls) if f.name != "max_peers"})

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerLimits:
        """The limits the ``service_parser`` flags ask for."""
        return cls(
            max_concurrent_rpcs=args.max_concurrent_rpcs,
            max_peer_rps=args.max_peer_rps,
            max_peer_burst=args.max_peer_burst,
            max_peer_streams=args.max_peer_streams,
            max_peer_bytes_in_flight=args.max_peer_bytes_in_flight,
        )


def peer_key(peer: str) -> str:
    """The caller's IP from ``context.peer()``: ``ipv4:10.1.2.3:5000`` -> ``10.1.2.3``,
    ``ipv6:%5B::1%5D:5000`` -> ``::1``; other transports (``unix:...``) keep the whole string."""
    return peer_host(peer) or peer


class Refused(NamedTuple):
    """Why a call is not admitted: ``reason`` (a metric label) and the caller's message."""

    reason: str
    message: str


class Peer:
    """One caller's token bucket and what its calls in flight hold."""

    __slots__ = ("bytes", "calls", "key", "stamp", "streams", "tokens")

    def __init__(self, key: str, tokens: float, now: float) -> None:
        self.key = key
        self.tokens = tokens
        self.stamp = now
        self.calls = 0
        self.streams = 0
        self.bytes = 0


class Admission:
    """Admits calls under :class:`ServerLimits`; single event loop, so no locks.

    ``admit`` before a handler, ``release`` after it with the same size and kind, ``grow``
    for each further chunk of a request stream (released with the call).
    """

    def __init__(self, limits: ServerLimits) -> None:
        self.limits = limits
        self.in_flight = 0
        self._peers: dict[str, Peer] = {}
        self._keys: dict[str, str] = {}
        self._sweep_at = limits.max_peers
        self._burst = limits.burst
        self._refill_s = self._burst / limits.max_peer_rps if limits.max_peer_rps else 0.0

    def admit(self, peer: str, size: int, stream: bool) -> Peer | Refused:
        limits = self.limits
        if limits.max_concurrent_rpcs and self.in_flight >= limits.max_concurrent_rpcs:
            return Refused(
                "concurrency",
                f"server busy: {self.in_flight} calls in flight, the limit "
                f"(--max-concurrent-rpcs); retry later",
            )
        now = time.monotonic()
        state = self._state(peer, now)
        rate = limits.max_peer_rps
        if rate:
            tokens = state.tokens + (now - state.stamp) * rate
            if tokens > self._burst:
                tokens = self._burst
            state.stamp = now
            if tokens < 1.0:
                state.tokens = tokens
                return Refused(
                    "peer_rate",
                    f"too many calls from {state.key}: over {rate:g}/s after a burst of "
                    f"{self._burst:g} (--max-peer-rps, --max-peer-burst); retry later",
                )
            state.tokens = tokens - 1.0
        else:
            state.stamp = now
        if stream and limits.max_peer_streams and state.streams >= limits.max_peer_streams:
            return Refused(
                "peer_streams",
                f"{state.key} has {state.streams} streaming calls open, the limit "
                f"(--max-peer-streams); finish one first",
            )
        refused = self._bytes_over(state, size)
        if refused is not None:
            return refused
        state.calls += 1
        state.streams += stream
        state.bytes += size
        self.in_flight += 1
        return state

    def charge(self, peer: str, count: int) -> Refused | None:
        """Take ``count`` rate tokens from ``peer`` for work that was refused, not admitted (a
        link's junk frames): the bucket may go into debt, up to a minute of the rate, so a
        flood is paid for by the calls its sender cannot make next. Refused when in debt."""
        rate = self.limits.max_peer_rps
        if not rate:
            return None
        now = time.monotonic()
        state = self._state(peer, now)
        tokens = min(self._burst, state.tokens + (now - state.stamp) * rate)
        state.tokens = max(-60.0 * rate, tokens - count)
        state.stamp = now
        if state.tokens >= 0:
            return None
        return Refused(
            "peer_rate",
            f"too many calls from {state.key}: over {rate:g}/s after a burst of "
            f"{self._burst:g} (--max-peer-rps, --max-peer-burst); retry later",
        )

    def grow(self, state: Peer, size: int) -> Refused | None:
        """Count ``size`` more request bytes held by a call of ``state`` (a stream's chunk)."""
        refused = self._bytes_over(state, size)
        if refused is None:
            state.bytes += size
        return refused

    def release(self, state: Peer, size: int, stream: bool) -> None:
        state.calls -= 1
        state.streams -= stream
        state.bytes -= size
        self.in_flight -= 1

    def peers(self) -> int:
        return len(self._peers)

    def _bytes_over(self, state: Peer, size: int) -> Refused | None:
        limit = self.limits.max_peer_bytes_in_flight
        if not limit or state.bytes + size <= limit:
            return None
        return Refused(
            "peer_bytes",
            f"{state.key} would hold {state.bytes + size} request bytes in calls in flight, "
            f"over the limit of {limit} (--max-peer-bytes-in-flight); retry when calls finish",
        )

    def _state(self, peer: str, now: float) -> Peer:
        """The bucket of ``peer``'s host, made on first sight."""
        key = self._keys.get(peer)
        if key is None:
            key = self._key(peer)
        state = self._peers.get(key)
        return self._add(key, now) if state is None else state

    def _key(self, peer: str) -> str:
        if len(self._keys) >= _KEY_CACHE:
            self._keys.clear()
        key = self._keys[peer] = peer_key(peer)
        return key

    def _add(self, key: str, now: float) -> Peer:
        if len(self._peers) >= self._sweep_at:
            self._sweep(now)
        state = self._peers[key] = Peer(key, self._burst, now)
        return state

    def _sweep(self, now: float) -> None:
        """Forget idle peers: first those whose bucket is full again, then the oldest."""
        peers, cap = self._peers, self.limits.max_peers
        idle = [p for p in peers.values() if p.calls == 0]
        rate = self.limits.max_peer_rps
        for state in idle:  # a bucket in debt (charge) refills for longer
            debt = max(0.0, -state.tokens) / rate if rate else 0.0
            if now - state.stamp >= self._refill_s + debt:
                del peers[state.key]
        target = cap * 3 // 4
        if len(peers) > target:
            idle = sorted((p for p in idle if p.key in peers), key=lambda p: p.stamp)
            for state in idle[: len(peers) - target]:
                del peers[state.key]
        # callers with calls in flight stay; sweep again only after cap / 4 more arrivals
        self._sweep_at = max(cap, len(peers) + max(1, cap // 4))

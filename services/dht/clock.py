"""DHT time: this host's clock, compared with the peers' and corrected when it is off.

Expirations in the DHT are absolute UNIX times, so a node whose clock runs 30 s ahead sees
every 30-second declaration as already expired: it refuses to store it and drops it from
every answer, silently. So
- each ping reply carries the peer's ``dht_time``; the offset ``peer_time - midpoint of the
  round trip`` is kept per peer;
- each Store carries the sender's ``dht_time``: a sender whose clock is off by more than
  ``max_skew`` is logged once an hour and counted, and the entries it stores here are kept
  only as long as its own clock says (``keep_until``: expiration minus its offset), so a
  peer running ahead cannot make records outlive their owners' intent;
- when the median offset of at least three pinged *hosts* exceeds ``max_skew``, *this* node is
  the one that is off: it warns once and adds the median (capped at ``max_correction``) to its
  clock. Offsets are kept per host (the address without its port: the latest sample of any
  port there), so peers sharing one address count once: seven fake peers on seven ports of one
  IP are one vote (:mod:`services.dht.diversity`). A host whose peer fails a call is forgotten,
  samples older than ``max_age`` too, and below three hosts there is no correction, so a shift
  does not outlive the peers that caused it. A few hostile hosts cannot move the median; a
  hostile majority of the hosts this node pinged could move it by at most ``max_correction``.
  The price: a swarm on one host (all peers on 127.0.0.1) never corrects its clock.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from services.common.rejections import RateLimitedLog
from services.dht.diversity import host_of

log = logging.getLogger(__name__)


class DHTClock:
    def __init__(
        self,
        max_skew: float = 10.0,
        max_correction: float = 300.0,
        max_peers: int = 256,
        source: Callable[[], float] = time.time,
        max_age: float = 3600.0,
    ) -> None:
        self.source = source  # the host clock (tests replace it to play a skewed host)
        self.max_skew = max_skew
        self.max_correction = max_correction
        self.max_peers = max_peers
        self.max_age = max_age
        self.correction = 0.0
        self.on_skewed: Callable[[], None] = lambda: None  # a peer found beyond max_skew
        # peer host -> (raw offset vs this host's clock, time.monotonic() of the sample)
        self._offsets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._warn = RateLimitedLog(log, interval=3600.0)

    def now(self) -> float:
        return self.source() + self.correction

    def observe(self, address: str, peer_time: float, sent: float, received: float) -> None:
        """A ping to ``address`` left at ``sent`` and came back at ``received`` (host
        clock, :attr:`source`) carrying the peer's ``peer_time``."""
        if not math.isfinite(peer_time):
            return
        host = host_of(address)
        self._offsets[host] = (peer_time - (sent + received) / 2, time.monotonic())
        self._offsets.move_to_end(host)
        while len(self._offsets) > self.max_peers:
            self._offsets.popitem(last=False)
        self._recompute()

    def forget(self, address: str) -> None:
        """The peer at ``address`` failed: its host's sample no longer counts."""
        if self._offsets.pop(host_of(address), None) is not None:
            self._recompute()

    def _recompute(self) -> None:
        oldest = time.monotonic() - self.max_age
        while self._offsets and next(iter(self._offsets.values()))[1] < oldest:
            self._offsets.popitem(last=False)  # ordered by sample time
        if len(self._offsets) < 3:
            self.correction = 0.0  # too few hosts to tell who is off
            return
        median = statistics.median(offset for offset, _ in self._offsets.values())
        correction = 0.0
        if abs(median) > self.max_skew:
            correction = max(-self.max_correction, min(self.max_correction, median))
        if correction and abs(correction - self.correction) > self.max_skew:
            self._warn.warn(
                "self",
                "this host's clock differs from its DHT peers' median; correcting DHT time "
                "(fix the host clock, e.g. NTP)",
                correction_s=round(correction, 3),
            )
        self.correction = correction

    def sender_offset(self, address: str, sender_time: float) -> float:
        """A request from ``address`` says its clock read ``sender_time`` (0: not said): the
        offset when it exceeds ``max_skew`` (logged once an hour per peer, counted), else 0."""
        if not sender_time or not math.isfinite(sender_time):
            return 0.0
        offset = sender_time - self.now()
        if abs(offset) <= self.max_skew:
            return 0.0
        if self._warn.warn(
            ("peer", address),
            "peer clock differs from this node's DHT time; its entries are kept only as long "
            "as its clock says",
            peer=address,
            offset_s=round(offset, 3),
        ):
            self.on_skewed()
        return offset


class ReplyClock:
    """The DHT's time as a client sees it, from the ``dht_time`` its replies carry.

    One reply is a poor sample: the offset ``dht_time - midpoint of the round trip`` is off
    by up to half the round trip, and a ``Put`` that replicates for a second swings it by
    half a second. Following every sample made :meth:`now` jitter, so an expert's renewal
    could carry an *earlier* expiration than the declaration before it, and the DHT refused
    it as stale. So, as the nodes do, the offset is the median of the last ``window``
    samples and is applied only when it exceeds ``max_skew`` (a host off by less keeps its
    own clock, monotone); once applied it stays applied until the median falls under half
    of ``max_skew``, so a host near the threshold does not flip between two times.
    """

    def __init__(
        self, max_skew: float = 10.0, window: int = 8, source: Callable[[], float] = time.time
    ) -> None:
        self.source = source  # the host clock (tests replace it)
        self.max_skew = max_skew
        self.offset = 0.0  # applied: the DHT's clock minus this host's
        self._samples: deque[float] = deque(maxlen=window)

    def now(self) -> float:
        return self.source() + self.offset

    def observe(self, dht_time: float, sent: float) -> None:
        """A reply to a request sent at ``sent`` (host clock) carried ``dht_time``."""
        if not dht_time or not math.isfinite(dht_time):
            return
        self._samples.append(dht_time - (sent + self.source()) / 2)
        median = statistics.median(self._samples)
        threshold = self.max_skew / 2 if self.offset else self.max_skew
        self.offset = median if abs(median) > threshold else 0.0

"""Hostile or broken input, made visible: a counter per reason and a rate-limited warning.

Every service counts what it refuses in ``dmoe_<service>_rejected_total{reason}`` and logs it
at warning level, at most once per (reason, source) per ``interval`` seconds, with how many
were suppressed since. An attacker that sends a million bad requests costs one log line a
minute per source instead of filling the disk, and an operator still sees that it happens.
Reasons are a small fixed vocabulary (a label), sources are free text (log only, never a label).
"""

from __future__ import annotations

import logging
import time
import weakref
from collections import OrderedDict

from prometheus_client import CollectorRegistry, Counter

from services.common.errors import clip


class RateLimitedLog:
    """``warn(key, message, **fields)`` logs at most once per ``interval`` s per key."""

    def __init__(
        self, logger: logging.Logger, interval: float = 60.0, max_keys: int = 4096
    ) -> None:
        self.logger = logger
        self.interval = interval
        self.max_keys = max_keys
        self._last: OrderedDict[object, tuple[float, int]] = OrderedDict()

    def warn(self, key: object, message: str, /, **fields: object) -> bool:
        """Log now, or count the line as suppressed; True when it was logged."""
        now = time.monotonic()
        last, suppressed = self._last.get(key, (float("-inf"), 0))
        if now - last < self.interval:
            self._last[key] = (last, suppressed + 1)
            return False
        self._last[key] = (now, 0)
        self._last.move_to_end(key)
        while len(self._last) > self.max_keys:
            self._last.popitem(last=False)
        if suppressed:
            fields["suppressed_since_last"] = suppressed
        self.logger.warning(message, extra=fields)
        return True


# registry -> service -> its Rejections: one counter per registry, shared by the server's guard
# and the service's own checks (a second Counter of the same name would not register)
_SHARED: weakref.WeakKeyDictionary[CollectorRegistry, dict[str, Rejections]] = (
    weakref.WeakKeyDictionary()
)


class Rejections:
    """Counts and logs refused input: ``dmoe_<service>_rejected_total{reason}``.

    :meth:`of` returns the instance already made for a registry and service, so the common
    server's guard and a service's handlers can both count into one counter.
    """

    def __init__(
        self,
        service: str,
        registry: CollectorRegistry | None,
        logger: logging.Logger,
        interval: float = 60.0,
    ) -> None:
        self.counter = Counter(
            f"dmoe_{service}_rejected",
            "Input refused as malformed, hostile or over a limit, by reason",
            ["reason"],
            registry=registry,
        )
        self.log = RateLimitedLog(logger, interval)
        self._children: dict[str, object] = {}
        if registry is not None:
            _SHARED.setdefault(registry, {})[service] = self

    @classmethod
    def of(
        cls, service: str, registry: CollectorRegistry | None, logger: logging.Logger
    ) -> Rejections:
        """The ``Rejections`` of ``service`` in ``registry``, made on first use."""
        held = _SHARED.get(registry, {}).get(service) if registry is not None else None
        return held if held is not None else cls(service, registry, logger)

    def reject(self, reason: str, message: str, /, source: str = "", **fields: object) -> None:
        child = self._children.get(reason)
        if child is None:
            child = self._children[reason] = self.counter.labels(reason)
        child.inc()  # type: ignore[attr-defined]
        # a peer's text in a log line is cut (the key too: it is kept in memory)
        source = clip(source, 200)
        fields = {k: clip(v) if isinstance(v, str) else v for k, v in fields.items()}
        self.log.warn((reason, source), clip(message), reason=reason, source=source, **fields)

    def count(self, reason: str) -> float:
        """The counter's value for ``reason`` (tests, status RPCs)."""
        return self.counter.labels(reason)._value.get()

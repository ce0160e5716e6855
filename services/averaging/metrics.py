"""Prometheus metrics of the averager (``dmoe_trainer_averaging_*``), optional: a library user
without a registry records nothing."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

OUTCOMES = ("ok", "alone", "failed")


class AveragerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry if registry is not None else CollectorRegistry()
        self.rounds = Counter(
            "dmoe_trainer_averaging_rounds",
            "Averaging rounds by outcome: ok (averaged with >= 1 peer), alone (no peer in the "
            "slot), failed (kept the local vector: a member or the DHT failed)",
            ["outcome"],
            registry=registry,
        )
        for outcome in OUTCOMES:
            self.rounds.labels(outcome)
        self.group_size = Histogram(
            "dmoe_trainer_averaging_group_size",
            "Members of the groups this trainer averaged in",
            buckets=(1, 2, 3, 4, 5, 6, 8, 12, 16, 32, 64),
            registry=registry,
        )
        self.duration = Histogram(
            "dmoe_trainer_averaging_round_duration_seconds",
            "Time from announcing to the averaged vector (matchmaking wait included)",
            buckets=(0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120),
            registry=registry,
        )
        self.bytes = Counter(
            "dmoe_trainer_averaging_bytes",
            "Bytes of values sent and received by the all-reduce, by direction",
            ["direction"],
            registry=registry,
        )
        self.refused = Counter(
            "dmoe_trainer_averaging_refused",
            "Chunks or peers refused, by reason (group, member, signature, shape, dtype, "
            "non_finite, duplicate, weight, result)",
            ["reason"],
            registry=registry,
        )
        self.last_round = Gauge(
            "dmoe_trainer_averaging_last_round_timestamp_seconds",
            "UNIX time of the last round that averaged with at least one peer",
            registry=registry,
        )
        self.state_downloads = Counter(
            "dmoe_trainer_averaging_state_downloads",
            "State downloads by outcome (ok, failed, none: no peer offered a state)",
            ["outcome"],
            registry=registry,
        )

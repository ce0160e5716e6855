"""The explorer's Prometheus metrics: ``dmoe_explorer_*`` (bounded labels only)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

ROUND_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ExplorerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.rounds = Counter(
            "dmoe_explorer_rounds", "Rounds of looking at the swarm, by outcome", ["outcome"],
            registry=registry,
        )  # fmt: skip
        self.round_duration = Histogram(
            "dmoe_explorer_round_duration_seconds", "Time one round took", buckets=ROUND_BUCKETS,
            registry=registry,
        )  # fmt: skip
        self.last_update = Gauge(
            "dmoe_explorer_last_update_timestamp_seconds", "When the last round finished",
            registry=registry,
        )  # fmt: skip
        self.experts = Gauge(
            "dmoe_explorer_experts", "Experts of the grids shown, by state", ["state"],
            registry=registry,
        )  # fmt: skip
        self.servers = Gauge(
            "dmoe_explorer_servers", "Expert servers seen, by state", ["state"], registry=registry
        )
        self.trainers = Gauge(
            "dmoe_explorer_trainers", "Trainers announced, by state", ["state"], registry=registry
        )
        self.dht_nodes = Gauge(
            "dmoe_explorer_dht_nodes", "DHT nodes asked, by state", ["state"], registry=registry
        )
        self.http_requests = Counter(
            "dmoe_explorer_http_requests", "HTTP requests by route and status code",
            ["route", "code"], registry=registry,
        )  # fmt: skip

    def observe(self, snapshot: dict[str, Any]) -> None:
        for gauge, rows, key in (
            (self.experts, snapshot["experts"], "alive"),
            (self.servers, snapshot["servers"], "reachable"),
            (self.trainers, snapshot["trainers"], "reachable"),
            (self.dht_nodes, snapshot["dht_nodes"], "reachable"),
        ):
            up = sum(bool(r[key]) for r in rows)
            gauge.labels("up").set(up)
            gauge.labels("down").set(len(rows) - up)
        self.last_update.set(snapshot["updated"])

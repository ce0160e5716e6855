"""Prometheus metrics of one DHT node, in the server's per-instance registry.

Incoming RPCs are already counted by the common server bootstrap
(``dmoe_dht_rpc_requests_total{method,code}``, ``dmoe_dht_rpc_duration_seconds{method}``);
this module adds what only the node knows. Gauges are computed at scrape time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.guard import LATENCY_BUCKETS

if TYPE_CHECKING:
    from services.dht.node import DHTNode

METRIC_NAMES = (
    "dmoe_dht_routing_table_peers",
    "dmoe_dht_stored_records",
    "dmoe_dht_stored_bytes",
    "dmoe_dht_cached_records",
    "dmoe_dht_blacklisted_peers",
    "dmoe_dht_joined",
    "dmoe_dht_outgoing_rpcs_total",
    "dmoe_dht_outgoing_rpc_duration_seconds",
    "dmoe_dht_lookup_rounds",
    "dmoe_dht_lookup_rpcs",
    "dmoe_dht_republished_entries_total",
    "dmoe_dht_handed_off_entries_total",
    "dmoe_dht_peer_verifications_total",
    "dmoe_dht_clock_correction_seconds",
    "dmoe_dht_skewed_peers_total",
    "dmoe_dht_rejected_total",
)


class NullMetrics:
    """Metrics sink for nodes that export nothing (large in-process swarms)."""

    def rpc(self, method: str, code: str, seconds: float) -> None:
        pass

    def lookup(self, operation: str, rounds: int, rpcs: int) -> None:
        pass

    def republished(self, count: int) -> None:
        pass

    def handed_off(self, count: int) -> None:
        pass

    def verification(self, outcome: str) -> None:
        pass

    def skewed_peer(self) -> None:
        pass


class NodeMetrics(NullMetrics):
    """The node's own metrics; pass as ``DHTNode(metrics=...)`` then :meth:`bind`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self.outgoing = Counter(
            "dmoe_dht_outgoing_rpcs",
            "Peer RPCs this node sent, by method and status code",
            ["method", "code"],
            registry=registry,
        )
        self.outgoing_duration = Histogram(
            "dmoe_dht_outgoing_rpc_duration_seconds",
            "Round-trip time of peer RPCs this node sent, by method",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.rounds = Histogram(
            "dmoe_dht_lookup_rounds",
            "Rounds (waves of parallel RPCs) per key lookup, by operation",
            ["method"],
            buckets=(0, 1, 2, 3, 4, 5, 6, 8, 10, 15, 20),
            registry=registry,
        )
        self.rpcs = Histogram(
            "dmoe_dht_lookup_rpcs",
            "Find RPCs (for a store also its conditional Store RPCs) per key lookup, by operation",
            ["method"],
            buckets=(0, 1, 2, 5, 10, 20, 30, 50, 75, 100, 200),
            registry=registry,
        )
        self.republished_total = Counter(
            "dmoe_dht_republished_entries",
            "Entries this node republished to the nearest nodes",
            registry=registry,
        )
        self.handed_off_total = Counter(
            "dmoe_dht_handed_off_entries",
            "Entries this node stored on new contacts that became their replicas",
            registry=registry,
        )
        self.skewed = Counter(
            "dmoe_dht_skewed_peers",
            "Peers found with a clock off by more than --max-clock-skew (once per peer and hour)",
            registry=registry,
        )
        self.verifications = Counter(
            "dmoe_dht_peer_verifications",
            "Signed pings that checked a peer's id, by outcome (proved, refused)",
            ["outcome"],
            registry=registry,
        )

    def bind(self, node: DHTNode) -> None:
        """Create the scrape-time gauges reading ``node``."""
        registry = self.registry
        Gauge(
            "dmoe_dht_routing_table_peers", "Contacts in the routing table", registry=registry
        ).set_function(lambda: len(node.table))
        Gauge(
            "dmoe_dht_stored_records", "Entries held as a replica", registry=registry
        ).set_function(lambda: len(node.storage))
        Gauge(
            "dmoe_dht_stored_bytes",
            "Bytes charged for replica entries (values and overhead; --max-storage-bytes)",
            registry=registry,
        ).set_function(lambda: node.storage.bytes)
        Gauge(
            "dmoe_dht_cached_records", "Entries held as a cached copy", registry=registry
        ).set_function(lambda: len(node.cache))
        Gauge(
            "dmoe_dht_blacklisted_peers", "Peer addresses banned right now", registry=registry
        ).set_function(lambda: len(node.blacklist))
        Gauge(
            "dmoe_dht_joined", "1 once the node has joined the DHT", registry=registry
        ).set_function(lambda: 1 if node.joined.is_set() else 0)
        Gauge(
            "dmoe_dht_clock_correction_seconds",
            "Seconds added to this host's clock: its DHT peers' median offset, when off",
            registry=registry,
        ).set_function(lambda: node.clock.correction)

    def rpc(self, method: str, code: str, seconds: float) -> None:
        children = self._children.get((method, code))
        if children is None:  # labels() takes a lock and checks names: once per pair
            children = (self.outgoing.labels(method, code), self.outgoing_duration.labels(method))
            self._children[(method, code)] = children
        children[0].inc()
        children[1].observe(seconds)

    def lookup(self, operation: str, rounds: int, rpcs: int) -> None:
        self.rounds.labels(operation).observe(rounds)
        self.rpcs.labels(operation).observe(rpcs)

    def republished(self, count: int) -> None:
        if count:
            self.republished_total.inc(count)

    def handed_off(self, count: int) -> None:
        self.handed_off_total.inc(count)

    def verification(self, outcome: str) -> None:
        self.verifications.labels(outcome).inc()

    def skewed_peer(self) -> None:
        self.skewed.inc()

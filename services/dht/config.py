"""Tunables of one DHT node, shared by the node, the peer protocol and the service."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NodeConfig:
    """Kademlia parameters, limits and timers (seconds).

    Node lookups (bootstrap, bucket refresh) keep a beam of ``k``; store and get lookups
    keep a beam of ``value_beam`` (default ``num_replicas``): they only need the replica
    set to have answered, and in a small swarm a beam of k would ask every node each
    time (about twice the RPCs of the smaller beam in benchmark mode A: docs/dht.md).

    Expirations are capped at ``max_ttl`` past the node's DHT time (see
    :mod:`services.dht.clock`), so nobody parks a record for years.

    ``rpc_timeout`` is short on purpose: a peer that is dead or overloaded costs at most
    that much once, and is then blacklisted for ``blacklist_base`` s, doubling per failure
    up to ``blacklist_max``.
    """

    k: int = 20
    alpha: int = 3
    num_replicas: int = 5
    value_beam: int = 0  # beam of store/get lookups; 0: num_replicas
    depth_modulo: int = 5
    rpc_timeout: float = 1.5
    max_key_bytes: int = 512
    max_subkey_bytes: int = 512
    max_value_bytes: int = 64 * 1024
    max_records: int = 100_000
    max_cache_records: int = 10_000
    max_storage_bytes: int = 256 << 20  # replica entries, values and overhead (entry_size)
    max_cache_bytes: int = 64 << 20
    source_share: float = 0.25  # one source IP holds at most this share of records and bytes
    unowned_share: float = 0.5  # unowned entries hold at most this share of the records
    max_keys_per_request: int = 4096
    lookup_rpcs_per_beam: int = 6  # a key's lookup asks at most this x its beam peers
    max_lookup_rounds: int = 16  # ... in at most this many rounds
    max_reply_bytes: int = 16 << 20  # entries in one Get/Find reply; past it RESOURCE_EXHAUSTED
    blacklist_base: float = 1.0
    blacklist_max: float = 60.0
    refresh_interval: float = 600.0
    republish_interval: float = 60.0
    maintenance_interval: float = 1.0
    bootstrap_backoff_max: float = 5.0
    seed_ping_interval: float = 15.0  # re-ping the initial peers this often
    max_ttl: float = 86_400.0  # expirations further than this past the node's clock: refused
    max_clock_skew: float = 10.0  # peers' clocks beyond this are logged and not trusted
    max_clock_correction: float = 300.0  # most this node corrects its own clock by
    max_verifications: int = 32  # identity pings in flight (peers proving their id)
    verify_retry: float = 30.0  # an address that failed to prove its id is not asked again sooner
    simulate_clock_offset: float = 0.0  # play a host clock this far off (tests, chaos drills)

    def __post_init__(self) -> None:
        for name in ("k", "alpha", "num_replicas", "depth_modulo", "max_records"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.value_beam and self.value_beam < self.num_replicas:
            raise ValueError("value_beam must be 0 or >= num_replicas")
        if not (0 < self.source_share <= 1 and 0 < self.unowned_share <= 1):
            raise ValueError("source_share and unowned_share must be in (0, 1]")
        if self.rpc_timeout <= 0:
            raise ValueError("rpc_timeout must be > 0")
        if self.max_ttl <= 0 or self.max_clock_skew <= 0:
            raise ValueError("max_ttl and max_clock_skew must be > 0")

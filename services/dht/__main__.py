"""``python -m services.dht``: run one Kademlia DHT node (peer + client-facing gRPC)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from services.common.flags import announce_host, peer_list, service_parser
from services.common.identity import default_identity_path, load_trusted_keys, resolve_identity
from services.common.limits import ServerLimits
from services.common.logs import setup_logging
from services.common.server import run_until_signal
from services.common.tls import TLSConfig, tls_from_args
from services.dht.config import NodeConfig
from services.dht.server import start_node

log = logging.getLogger("services.dht")


def build_parser() -> argparse.ArgumentParser:
    defaults = NodeConfig()
    parser = service_parser(
        "dht",
        "A Kademlia DHT node: peer RPCs (dmoe.DHTPeer) and Put/Get for other services (dmoe.DHT).",
        port=31330,
        metrics_port=9330,
    )
    dht = parser.add_argument_group("dht")
    dht.add_argument(
        "--initial-peers",
        type=peer_list,
        default=[],
        help="host:port of nodes to join through (comma/space separated; DNS names allowed, "
        "resolved at each attempt; retried with backoff until one answers)",
    )
    dht.add_argument(
        "--state-file",
        default=None,
        help="keep the routing table's contacts here (written at shutdown, read at start): a "
        "restarted node rejoins the swarm it knew, even without --initial-peers",
    )
    dht.add_argument(
        "--trusted-keys",
        default=None,
        help="file of public keys (one per line, hex or base64, # comments): store only "
        "entries owned by these keys (a private swarm); unset: any owner, unowned too",
    )
    dht.add_argument("--k", type=int, default=defaults.k, help="bucket size and lookup beam")
    dht.add_argument("--alpha", type=int, default=defaults.alpha, help="parallel RPCs per lookup")
    dht.add_argument(
        "--num-replicas", type=int, default=defaults.num_replicas, help="copies of each value"
    )
    dht.add_argument(
        "--depth-modulo",
        type=int,
        default=defaults.depth_modulo,
        help="b: buckets whose depth is not a multiple of b may split",
    )
    dht.add_argument(
        "--value-beam",
        type=int,
        default=defaults.value_beam,
        help="beam of store/get lookups (0: num_replicas); node lookups use k",
    )
    dht.add_argument(
        "--rpc-timeout", type=float, default=defaults.rpc_timeout, help="deadline of one peer RPC"
    )
    limits = parser.add_argument_group("limits")
    limits.add_argument("--max-key-bytes", type=int, default=defaults.max_key_bytes)
    limits.add_argument("--max-subkey-bytes", type=int, default=defaults.max_subkey_bytes)
    limits.add_argument("--max-value-bytes", type=int, default=defaults.max_value_bytes)
    limits.add_argument(
        "--max-records", type=int, default=defaults.max_records, help="entries held as replica"
    )
    limits.add_argument(
        "--max-cache-records", type=int, default=defaults.max_cache_records,
        help="entries held as cached copies (oldest evicted)",
    )  # fmt: skip
    limits.add_argument("--max-keys-per-request", type=int, default=defaults.max_keys_per_request)
    limits.add_argument(
        "--max-storage-bytes", type=int, default=defaults.max_storage_bytes,
        help="bytes of replica entries held (values and overhead)",
    )  # fmt: skip
    limits.add_argument(
        "--max-cache-bytes", type=int, default=defaults.max_cache_bytes,
        help="bytes of cached copies held (soonest-expiring evicted)",
    )  # fmt: skip
    limits.add_argument(
        "--source-share", type=float, default=defaults.source_share,
        help="share of --max-records and --max-storage-bytes one source IP may hold",
    )  # fmt: skip
    limits.add_argument(
        "--unowned-share", type=float, default=defaults.unowned_share,
        help="share of --max-records unowned (unsigned) entries may hold; signed entries "
        "evict them when full",
    )  # fmt: skip
    limits.add_argument(
        "--max-reply-bytes", type=int, default=defaults.max_reply_bytes,
        help="bytes of entries in one Get/Find reply (past it RESOURCE_EXHAUSTED)",
    )  # fmt: skip
    limits.add_argument(
        "--lookup-rpcs-per-beam", type=int, default=defaults.lookup_rpcs_per_beam,
        help="a key's lookup asks at most this many times its beam of peers",
    )  # fmt: skip
    limits.add_argument(
        "--max-lookup-rounds", type=int, default=defaults.max_lookup_rounds,
        help="a key's lookup runs at most this many rounds",
    )  # fmt: skip
    limits.add_argument(
        "--max-ttl",
        type=float,
        default=defaults.max_ttl,
        help="refuse expirations further than this past the node's clock (s)",
    )
    limits.add_argument(
        "--max-clock-skew",
        type=float,
        default=defaults.max_clock_skew,
        help="peers whose clock is off by more are logged and not trusted beyond it; this "
        "node corrects its own clock when its peers' median is (s)",
    )
    timers = parser.add_argument_group("timers")
    timers.add_argument("--refresh-interval", type=float, default=defaults.refresh_interval,
                        help="refresh buckets untouched this long (s)")  # fmt: skip
    timers.add_argument("--republish-interval", type=float, default=defaults.republish_interval,
                        help="republish records nobody re-stored this long (s)")  # fmt: skip
    timers.add_argument("--seed-ping-interval", type=float, default=defaults.seed_ping_interval,
                        help="ping the initial peers again this often (s)")  # fmt: skip
    timers.add_argument("--blacklist-base", type=float, default=defaults.blacklist_base,
                        help="first ban of a failing peer (s), doubled per failure")  # fmt: skip
    timers.add_argument("--blacklist-max", type=float, default=defaults.blacklist_max,
                        help="longest ban (s)")  # fmt: skip
    return parser


def config_from(args: argparse.Namespace) -> NodeConfig:
    return NodeConfig(
        k=args.k,
        alpha=args.alpha,
        num_replicas=args.num_replicas,
        value_beam=args.value_beam,
        seed_ping_interval=args.seed_ping_interval,
        depth_modulo=args.depth_modulo,
        rpc_timeout=args.rpc_timeout,
        max_key_bytes=args.max_key_bytes,
        max_subkey_bytes=args.max_subkey_bytes,
        max_value_bytes=args.max_value_bytes,
        max_records=args.max_records,
        max_cache_records=args.max_cache_records,
        max_keys_per_request=args.max_keys_per_request,
        max_storage_bytes=args.max_storage_bytes,
        max_cache_bytes=args.max_cache_bytes,
        source_share=args.source_share,
        unowned_share=args.unowned_share,
        max_reply_bytes=args.max_reply_bytes,
        lookup_rpcs_per_beam=args.lookup_rpcs_per_beam,
        max_lookup_rounds=args.max_lookup_rounds,
        refresh_interval=args.refresh_interval,
        republish_interval=args.republish_interval,
        blacklist_base=args.blacklist_base,
        blacklist_max=args.blacklist_max,
        max_ttl=args.max_ttl,
        max_clock_skew=args.max_clock_skew,
    )


async def serve(args: argparse.Namespace, tls: TLSConfig | None = None) -> None:
    identity = resolve_identity(
        args.identity_file, default_identity_path("dht", args.port) if args.port else None
    )
    trusted = load_trusted_keys(args.trusted_keys) if args.trusted_keys else None
    running = await start_node(
        config_from(args),
        initial_peers=args.initial_peers,
        host=args.host,
        port=args.port,
        announce_host=announce_host(args.host, args.announce_host),
        metrics_port=args.metrics_port,
        max_message_bytes=args.max_message_bytes,
        identity=identity,
        trusted=trusted,
        tls=tls,
        state_file=args.state_file,
        limits=ServerLimits.from_args(args),
    )
    log.info(
        "dht node started",
        extra={
            "address": running.address,
            "port": running.server.port,
            "metrics_port": running.server.metrics_port,
            "node_id": running.node.info.node_id.hex(),
            "public_key": identity.hex,
            "trusted_keys": len(trusted) if trusted is not None else "any",
            "initial_peers": ",".join(args.initial_peers),
        },
    )
    await run_until_signal(lambda: running.stop(args.shutdown_grace))
    log.info("dht node stopped")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config_from(args)
    except ValueError as exc:
        parser.error(str(exc))
    tls = tls_from_args(args, parser)
    setup_logging(args.log_level, args.log_format)
    try:
        asyncio.run(serve(args, tls))
    except (OSError, ValueError) as exc:  # identity or trusted-keys file unusable, port taken
        log.error("cannot start: %s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m services.dht``: run one Kademlia DHT node (peer + client-facing gRPC)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from services.common.config import announce_host, peer_list, service_parser
from services.common.limits import ServerLimits
from services.common.logs import setup_logging
from services.common.server import run_until_signal
from services.dht.config import NodeConfig
from services.dht.server import start_node

log = logging.getLogger("services.dht")


def _node_id(text: str) -> int:
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise argparse.ArgumentTypeError("node id must be 40 hex digits") from None
    if len(raw) != 20:
        raise argparse.ArgumentTypeError("node id must be 40 hex digits")
    return int.from_bytes(raw, "big")


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
        "--node-id", type=_node_id, default=None, help="40 hex digits (default random)"
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
        refresh_interval=args.refresh_interval,
        republish_interval=args.republish_interval,
        blacklist_base=args.blacklist_base,
        blacklist_max=args.blacklist_max,
    )


async def serve(args: argparse.Namespace) -> None:
    running = await start_node(
        config_from(args),
        initial_peers=args.initial_peers,
        host=args.host,
        port=args.port,
        announce_host=announce_host(args.host, args.announce_host),
        metrics_port=args.metrics_port,
        max_message_bytes=args.max_message_bytes,
        node_id=args.node_id,
        limits=ServerLimits.from_args(args),
    )
    log.info(
        "dht node started",
        extra={
            "address": running.address,
            "port": running.server.port,
            "metrics_port": running.server.metrics_port,
            "node_id": running.node.info.node_id.hex(),
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
    setup_logging(args.log_level, args.log_format)
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

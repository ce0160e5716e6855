"""``python -m services.explorer``: a web page showing the swarm as the DHT sees it."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable
from typing import Any

from services.common.announcements import PREFIX_RE
from services.common.flags import peer_list, service_parser
from services.common.identity import load_trusted_keys
from services.common.limits import ServerLimits
from services.common.logs import setup_logging
from services.common.server import run_until_signal
from services.common.tls import TLSConfig, tls_from_args
from services.explorer.collect import Limits
from services.explorer.service import Explorer, ExplorerConfig

log = logging.getLogger("services.explorer")


def prefix_list(text: str) -> list[str]:
    prefixes = [p.rstrip(".") for p in text.replace(",", " ").split() if p]
    for prefix in prefixes:
        if not PREFIX_RE.match(prefix):
            raise argparse.ArgumentTypeError(f"prefix {prefix!r} is not an expert uid's name")
    return prefixes


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    defaults, limits = ExplorerConfig(initial_peers=[]), Limits()
    parser = service_parser(
        "explorer",
        "A web page (and /api/swarm, JSON) showing the swarm as the DHT sees it: each grid's "
        "experts alive or dead, expert servers, trainers, DHT nodes. Reads only public data.",
        port=31360,
        metrics_port=9360,
    )
    g = parser.add_argument_group("explorer")
    g.add_argument("--initial-peers", "--dht-peers", type=peer_list, default=[],
                   help="DHT nodes host:port, ... (comma/space separated)")  # fmt: skip
    g.add_argument("--http-port", type=int, default=defaults.http_port,
                   help="port of the web page and /api/swarm; 0 picks a free one")  # fmt: skip
    g.add_argument("--http-host", default=None,
                   help="address the web page binds (default: --host)")  # fmt: skip
    g.add_argument("--prefixes", type=prefix_list, default=[],
                   help="grids to show besides those servers announce, e.g. ffn,ffn1")  # fmt: skip
    g.add_argument("--update-period", type=_positive(float), default=defaults.period,
                   help="seconds between looks at the swarm (and page refreshes)")  # fmt: skip
    g.add_argument("--trusted-keys", default=None,
                   help="file of public keys (one per line, hex or base64, # comments): show "
                   "only what these keys declare and announce; unset: anyone's")  # fmt: skip
    g.add_argument("--rpc-timeout", type=_positive(float), default=defaults.rpc_timeout,
                   help="deadline of each call to a peer, s")  # fmt: skip
    g.add_argument("--poll-concurrency", type=_positive(int), default=defaults.concurrency,
                   help="calls to peers in flight at once")  # fmt: skip
    b = parser.add_argument_group("bounds (what one round looks at)")
    b.add_argument("--max-grids", type=_positive(int), default=limits.max_grids)
    b.add_argument("--max-cells", type=_positive(int), default=limits.max_cells,
                   help="experts per grid; a larger grid shows only the experts found")  # fmt: skip
    b.add_argument("--max-servers", type=_positive(int), default=limits.max_servers)
    b.add_argument("--max-trainers", type=_positive(int), default=limits.max_trainers)
    b.add_argument("--max-dht-nodes", type=_positive(int), default=limits.max_dht_nodes)
    b.add_argument("--max-probes", type=_positive(int), default=limits.max_probes,
                   help="Expert/Info calls per round, all servers together (rotating)")  # fmt: skip
    return parser


def config_from(args: argparse.Namespace, tls: TLSConfig | None = None) -> ExplorerConfig:
    return ExplorerConfig(
        initial_peers=args.initial_peers,
        prefixes=args.prefixes,
        period=args.update_period,
        rpc_timeout=args.rpc_timeout,
        concurrency=args.poll_concurrency,
        limits=Limits(
            max_grids=args.max_grids,
            max_cells=args.max_cells,
            max_servers=args.max_servers,
            max_trainers=args.max_trainers,
            max_dht_nodes=args.max_dht_nodes,
            max_probes=args.max_probes,
        ),
        host=args.host,
        port=args.port,
        http_host=args.http_host,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        max_message_bytes=args.max_message_bytes,
        tls=tls,
        server_limits=ServerLimits.from_args(args),
    )


async def serve(config: ExplorerConfig, grace: float) -> None:
    explorer = await Explorer(config).start()
    await run_until_signal(lambda: explorer.stop(grace))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.initial_peers:
        parser.error("give --initial-peers (or DMOE_INITIAL_PEERS): the DHT is what it shows")
    tls = tls_from_args(args, parser)
    setup_logging(args.log_level, args.log_format)
    try:
        config = config_from(args, tls)
        config.trusted = load_trusted_keys(args.trusted_keys) if args.trusted_keys else None
        asyncio.run(serve(config, args.shutdown_grace))
    except (OSError, ValueError) as exc:  # a port taken, a trusted-keys file unusable
        log.error("cannot start: %s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m services.expert``: host experts, serve forward/backward, train, declare."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from services.common.flags import peer_list, service_parser
from services.common.limits import ServerLimits
from services.common.logs import setup_logging
from services.common.server import run_until_signal
from services.common.tls import tls_from_args
from services.expert.backend import OptimizerConfig
from services.expert.device import device_name, resolve_device
from services.expert.faults import LATENCY_DISTRIBUTIONS
from services.expert.server import ExpertConfig, ExpertServer

log = logging.getLogger("services.expert")


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    # every default is the dataclass's: one place to change one, for flags and in-process servers
    defaults, optimizer_defaults = ExpertConfig(), OptimizerConfig()
    parser = service_parser(
        "expert",
        "Hosts experts: batched remote forward/backward over gRPC, one optimizer per expert, "
        "DHT declarations, checkpoints.",
        port=31340,
        metrics_port=9340,
    )
    g = parser.add_argument_group("experts")
    g.add_argument(
        "--experts",
        default=",".join(defaults.experts),
        help="uids or grid patterns, comma/space separated, e.g. 'ffn.[0:4].[0:8]' or 'ffn.0.3'",
    )
    g.add_argument(
        "--num-experts",
        type=int,
        default=defaults.num_experts,
        help="host this many uids sampled at random from --experts, skipping declared ones",
    )
    g.add_argument(
        "--expert-cls",
        default=defaults.expert_cls,
        help="expert class: ffn, transformer, nop, det_dropout, custom",
    )
    g.add_argument("--hidden-dim", type=int, default=defaults.hidden_dim, help="expert hidden size")
    g.add_argument(
        "--custom-module",
        default=defaults.custom_module,
        help="python file registering expert classes",
    )
    g.add_argument(
        "--device",
        type=device_name,
        default=defaults.device,
        help="cpu, cuda[:n], or auto: CUDA when torch sees a GPU, else the CPU "
        "(an explicit cuda without one stops the server at start)",
    )
    g.add_argument(
        "--seed", type=int, default=defaults.seed, help="seed for weight init (expert i: seed+i)"
    )
    o = parser.add_argument_group("optimizer")
    o.add_argument(
        "--optimizer", default=optimizer_defaults.name, choices=["adam", "sgd"], help="optimizer"
    )
    o.add_argument("--lr", type=float, default=optimizer_defaults.lr, help="learning rate")
    o.add_argument(
        "--momentum", type=float, default=optimizer_defaults.momentum, help="SGD momentum"
    )
    o.add_argument(
        "--weight-decay", type=float, default=optimizer_defaults.weight_decay, help="weight decay"
    )
    o.add_argument(
        "--warmup-steps",
        type=int,
        default=optimizer_defaults.warmup_steps,
        help="linear warm-up steps",
    )
    o.add_argument(
        "--total-steps",
        type=int,
        default=optimizer_defaults.total_steps,
        help="> 0: linear decay to 0 at this step",
    )
    o.add_argument(
        "--clip-grad-norm",
        type=float,
        default=optimizer_defaults.clip_grad_norm,
        help="clip each step's global gradient norm to this; a step whose norm overflows is "
        "refused and its culprit request isolated. 1.0 is the usual choice for Adam (which is "
        "insensitive to the gradient's scale, so honest steps change little) and bounds what "
        "any batch can do to the weights and to Adam's moments (0: off)",
    )
    o.add_argument(
        "--max-grad-norm-ratio",
        type=float,
        default=defaults.max_grad_norm_ratio,
        help="refuse a backward whose grad_outputs RMS exceeds this many times the 90th "
        "percentile of the expert's last 256 backward requests (checked from the 65th on), "
        "so that no single request steers the expert (0: off)",
    )
    o.add_argument(
        "--max-caller-share",
        type=float,
        default=0.0,
        help="refuse a backward from a caller (IP) that sent this share of the expert's last "
        "--caller-share-window backward requests, so that no caller trains an expert alone; "
        "off by default: a one-host swarm is one caller (0: off)",
    )
    o.add_argument(
        "--caller-share-window",
        type=int,
        default=256,
        help="backward requests per expert over which --max-caller-share is counted",
    )
    b = parser.add_argument_group("batching")
    b.add_argument(
        "--max-batch-size",
        type=int,
        default=defaults.max_batch_size,
        help="samples per batch at most",
    )
    b.add_argument(
        "--min-batch-size",
        type=int,
        default=defaults.min_batch_size,
        help="an expert's queue holding this many samples runs at once; with fewer it waits "
        "for more until its oldest request has waited --batch-timeout-ms, then runs anyway "
        "(0: --max-batch-size, i.e. wait up to the timeout for a full batch)",
    )
    b.add_argument(
        "--batch-timeout-ms",
        type=float,
        default=defaults.batch_timeout_ms,
        help="the longest a request waits for others to batch with (see --min-batch-size)",
    )
    b.add_argument(
        "--max-queue-samples",
        type=int,
        default=defaults.max_queue_samples,
        help="samples queued per expert and method before RESOURCE_EXHAUSTED (0: 8 x max batch)",
    )
    b.add_argument(
        "--max-queue-bytes",
        type=int,
        default=defaults.max_queue_bytes,
        help="bytes of tensor data queued per expert and method before RESOURCE_EXHAUSTED "
        "(two of the largest requests; an empty queue takes any request)",
    )
    b.add_argument(
        "--max-free-dim",
        type=int,
        default=defaults.max_free_dim,
        help="largest size of a free schema dimension, e.g. a transformer expert's sequence "
        "length (INVALID_ARGUMENT past it)",
    )
    b.add_argument(
        "--compute-threads",
        type=int,
        default=defaults.compute_threads,
        help="batches run at once (0: auto)",
    )
    b.add_argument(
        "--torch-threads",
        type=int,
        default=defaults.torch_threads,
        help="intra-op threads each (0: auto)",
    )
    b.add_argument(
        "--switch-interval-ms",
        type=float,
        default=defaults.switch_interval_ms,
        help="Python thread switch interval: how long a compute thread may wait for the GIL "
        "after each torch call (CPython's default is 5; 0 keeps it)",
    )
    b.add_argument(
        "--max-stream-bytes",
        type=int,
        default=defaults.max_stream_bytes,
        help="largest request accepted over the streaming RPCs, refused on its first chunk "
        "(unary requests are bounded by --max-message-bytes)",
    )
    b.add_argument(
        "--max-receive-bytes",
        type=int,
        default=defaults.max_receive_bytes,
        help="bytes all streamed requests being received may hold together before "
        "RESOURCE_EXHAUSTED (at least --max-stream-bytes)",
    )
    d = parser.add_argument_group("dht")
    d.add_argument(
        "--initial-peers",
        "--dht-peers",
        dest="initial_peers",
        type=peer_list,
        default=[],
        help="DHT nodes host:port, ... (--dht-peers is an alias)",
    )
    d.add_argument("--no-dht", action="store_true", help="do not declare experts in a DHT")
    d.add_argument(
        "--update-period",
        type=float,
        default=defaults.update_period,
        help="seconds between declarations",
    )
    c = parser.add_argument_group("checkpoints")
    c.add_argument(
        "--checkpoint-dir",
        default=defaults.checkpoint_dir,
        help="where checkpoints live (unset: none)",
    )
    c.add_argument(
        "--checkpoint-every",
        type=float,
        default=defaults.checkpoint_every,
        help="seconds between saves",
    )
    c.add_argument(
        "--checkpoint-keep",
        type=int,
        default=defaults.checkpoint_keep,
        help="checkpoints kept per expert",
    )
    s = parser.add_argument_group("failure injection (simulated swarms)")
    s.add_argument(
        "--simulate-failure-rate",
        type=_probability,
        default=defaults.simulate_failure_rate,
        help="probability that a forward/backward fails with UNAVAILABLE",
    )
    s.add_argument(
        "--simulate-latency-ms",
        type=float,
        default=defaults.simulate_latency_ms,
        help="delay added to each forward/backward reply (its mean with 'exp')",
    )
    s.add_argument(
        "--simulate-latency-distribution",
        choices=LATENCY_DISTRIBUTIONS,
        default=defaults.simulate_latency_distribution,
        help="fixed: every reply --simulate-latency-ms late; exp: an exponential draw per call "
        "with that mean (the Learning@home paper's delays)",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> ExpertConfig:
    return ExpertConfig(
        experts=[args.experts],
        num_experts=args.num_experts,
        expert_cls=args.expert_cls,
        hidden_dim=args.hidden_dim,
        custom_module=args.custom_module,
        optimizer=OptimizerConfig(
            name=args.optimizer,
            lr=args.lr,
            momentum=args.momentum,
            weight_decay=args.weight_decay,
            warmup_steps=args.warmup_steps,
            total_steps=args.total_steps,
            clip_grad_norm=args.clip_grad_norm,
        ),
        max_grad_norm_ratio=args.max_grad_norm_ratio,
        max_caller_share=args.max_caller_share,
        caller_share_window=args.caller_share_window,
        max_queue_bytes=args.max_queue_bytes,
        max_free_dim=args.max_free_dim,
        device=args.device,
        seed=args.seed,
        max_batch_size=args.max_batch_size,
        min_batch_size=args.min_batch_size,
        batch_timeout_ms=args.batch_timeout_ms,
        max_queue_samples=args.max_queue_samples,
        compute_threads=args.compute_threads,
        torch_threads=args.torch_threads,
        switch_interval_ms=args.switch_interval_ms,
        host=args.host,
        announce_host=args.announce_host,
        port=args.port,
        metrics_port=args.metrics_port,
        max_message_bytes=args.max_message_bytes,
        max_stream_bytes=args.max_stream_bytes,
        max_receive_bytes=args.max_receive_bytes,
        dht_peers=[] if args.no_dht else args.initial_peers,
        update_period=args.update_period,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every,
        checkpoint_keep=args.checkpoint_keep,
        simulate_failure_rate=args.simulate_failure_rate,
        simulate_latency_ms=args.simulate_latency_ms,
        simulate_latency_distribution=args.simulate_latency_distribution,
        identity_file=args.identity_file,
        limits=ServerLimits.from_args(args),
    )


async def _run(config: ExpertConfig, grace: float) -> None:
    server = await ExpertServer(config).start()
    await run_until_signal(lambda: server.stop(grace))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    tls = tls_from_args(args, parser)
    setup_logging(args.log_level, args.log_format)
    if not args.no_dht and not args.initial_peers:
        parser.error(
            "give --initial-peers (or DMOE_INITIAL_PEERS), or --no-dht to run without a DHT"
        )
    try:
        requested, args.device = args.device, resolve_device(args.device)
        log.info("compute device", extra={"requested": requested, "device": args.device})
        config = config_from_args(args)
        config.tls = tls
        from services.expert import uid as uids

        uids.grid_size(uids.split_patterns(config.experts))  # bad patterns fail before loading
        asyncio.run(_run(config, args.shutdown_grace))
    except (ValueError, OSError) as exc:  # bad flags, patterns, checkpoints, identity; no DHT
        log.error("cannot start: %s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

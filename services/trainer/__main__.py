"""``python -m services.trainer``: train a model with DMoE layers on a swarm of experts."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import secrets
import signal
import sys
import threading
from typing import Any

from services.common.config import parse_bool, peer_list, service_parser
from services.common.logs import setup_logging
from services.common.tls import tls_from_args
from services.proto import tensor_pb2
from services.trainer.options import CallPolicy, MoEOptions

log = logging.getLogger("services.trainer")

_COMPRESSIONS = {
    "none": tensor_pb2.COMPRESSION_NONE,
    "float16": tensor_pb2.COMPRESSION_FLOAT16,
    "bfloat16": tensor_pb2.COMPRESSION_BFLOAT16,
    "uint8": tensor_pb2.COMPRESSION_UINT8,
}


def grid(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.lower().replace(",", "x").split("x") if d)
    except ValueError:
        raise argparse.ArgumentTypeError(f"grid {text!r} is not like 4x4 or 32x32x32") from None
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"grid {text!r} needs positive sizes")
    return dims


def resolve_seed(flag: int | None, saved: dict[str, Any] | None) -> tuple[int, str]:
    """The trainer's seed and where it came from: ``--seed``; else the checkpoint being resumed
    (so a restarted trainer keeps its batch order and continues exactly); else a fresh draw
    from the OS (not from the clock: trainers started together must differ)."""
    if flag is not None:
        return flag, "flag"
    if saved is not None and isinstance(saved.get("seed"), int):
        return saved["seed"], "checkpoint"
    return secrets.randbits(31), "drawn"


def run_id(text: str) -> str:
    if text and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", text):
        raise argparse.ArgumentTypeError("a run id is 1-64 letters, digits, '-' or '_'")
    return text


def default_run_id(args: argparse.Namespace) -> str:
    """The same for trainers started with the same model, data and grid flags."""
    shape = [args.model_module or args.model, args.dataset, args.hidden_dim, args.num_layers,
             args.heads, args.final_norm, args.seq_len, args.uid_prefix, list(args.grid),
             args.moe_kind]  # fmt: skip
    digest = hashlib.sha256(json.dumps(shape).encode()).hexdigest()[:12]
    prefix = re.sub(r"[^A-Za-z0-9_-]", "-", args.uid_prefix)[:40] or "run"
    return f"{prefix}-{digest}"


def build_parser() -> argparse.ArgumentParser:
    # the flags' defaults are the dataclasses' (what in-process layers use)
    layer, policy = MoEOptions(), CallPolicy()
    parser = service_parser(
        "trainer",
        "Train a model whose hidden layers are Decentralized Mixture-of-Experts layers: "
        "experts are found through the DHT and called over gRPC.",
        port=31350,
        metrics_port=9350,
    )
    swarm = parser.add_argument_group("swarm")
    swarm.add_argument(
        "--initial-peers", "--dht-peers", type=peer_list, default=[], help="DHT nodes, host:port"
    )
    swarm.add_argument(
        "--uid-prefix",
        default=layer.uid_prefix,
        help="expert grid of layer 0 (layer i: <prefix><i>)",
    )
    swarm.add_argument(
        "--grid", type=grid, default=layer.grid_size, help="grid size per dimension, e.g. 4x4"
    )
    swarm.add_argument(
        "--moe-kind", choices=["mixture", "switch"], default=layer.kind, help="layer type"
    )
    swarm.add_argument("--k-best", type=int, default=layer.k_best, help="experts chosen per sample")
    swarm.add_argument("--k-min", type=int, default=policy.k_min, help="answers each sample needs")
    swarm.add_argument(
        "--forward-timeout", type=float, default=policy.forward_timeout, help="seconds per forward"
    )
    swarm.add_argument(
        "--timeout-after-k-min",
        type=float,
        default=policy.timeout_after_k_min,
        help="extra wait for stragglers, seconds",
    )
    swarm.add_argument(
        "--transient-retries", type=int, default=policy.transient_retries,
        help="re-sends of a forward refused with UNAVAILABLE/RESOURCE_EXHAUSTED",
    )  # fmt: skip
    swarm.add_argument(
        "--forward-retries", type=int, default=policy.forward_retries,
        help="rounds with replacement experts for samples short of k-min",
    )  # fmt: skip
    swarm.add_argument(
        "--backward-k-min",
        type=int,
        default=policy.backward_k_min,
        help="backward answers per sample",
    )
    swarm.add_argument(
        "--backward-timeout",
        type=float,
        default=policy.backward_timeout,
        help="seconds per backward",
    )
    swarm.add_argument(
        "--allow-zero-outputs", type=parse_bool, default=policy.allow_zero_outputs,
        help="zeros instead of an error when fewer than k-min experts answer",
    )  # fmt: skip
    swarm.add_argument(
        "--detect-anomalies", type=parse_bool, default=policy.detect_anomalies,
        help="treat a non-finite or absurd expert answer (outputs, gradients) as a failed call",
    )  # fmt: skip
    swarm.add_argument(
        "--max-expert-value", type=float, default=policy.max_expert_value,
        help="an expert answer holding a larger |value| is absurd (0: no cap)",
    )  # fmt: skip
    swarm.add_argument(
        "--max-expert-rms-ratio", type=float, default=policy.max_expert_rms_ratio,
        help="an expert answer whose RMS exceeds this x the 90th percentile of recent answers "
        "(grid and method) is absurd (0: no relative check)",
    )  # fmt: skip
    swarm.add_argument(
        "--dht-cache-ttl", type=float, default=2.0, help="seconds DHT answers are reused"
    )
    swarm.add_argument(
        "--dht-negative-cache-ttl", type=float, default=10.0,
        help="seconds an empty DHT answer (a prefix with no live expert) is reused",
    )  # fmt: skip
    swarm.add_argument(
        "--backoff-base", type=float, default=1.0, help="first back-off of a failing expert, s"
    )
    swarm.add_argument("--backoff-max", type=float, default=60.0, help="longest back-off, s")
    swarm.add_argument(
        "--trusted-keys",
        default=None,
        help="file of public keys (one per line, hex or base64, # comments): use only experts "
        "declared by these keys (a private swarm); unset: any server's declarations",
    )
    swarm.add_argument(
        "--announce-period", type=float, default=10.0,
        help="seconds between announcements of this trainer under _dmoe.trainers in the DHT, "
        "for the swarm explorer (0: none)",
    )  # fmt: skip
    swarm.add_argument(
        "--compression",
        choices=list(_COMPRESSIONS),
        default="none",
        help="tensor compression on the wire",
    )
    avg = parser.add_argument_group("averaging (docs/averaging.md)")
    avg.add_argument(
        "--average", type=parse_bool, default=True,
        help="average this trainer's own parameters (not the experts) with the trainers of its "
        "run, and download the state from one of them at start",
    )  # fmt: skip
    avg.add_argument(
        "--run-id", type=run_id, default="",
        help="trainers of one run average together; default derived from the model, data set "
        "and expert grid flags, so identical trainers share it",
    )  # fmt: skip
    avg.add_argument(
        "--target-group-size", type=int, default=8, help="trainers per averaging group (>= 2)"
    )
    avg.add_argument(
        "--average-every", type=int, default=10,
        help="local steps between the starts of two rounds (a round runs in the background)",
    )  # fmt: skip
    avg.add_argument(
        "--average-period", type=float, default=5.0,
        help="matchmaking slot, seconds of the DHT clock: trainers ready in the same slot "
        "average together; a round starts at most once per slot",
    )  # fmt: skip
    avg.add_argument(
        "--average-timeout", type=float, default=10.0,
        help="seconds reducers wait for the members' parts after a slot closes",
    )  # fmt: skip
    avg.add_argument(
        "--average-compression", choices=["none", "float16"], default="none",
        help="values on the wire while averaging",
    )  # fmt: skip
    avg.add_argument(
        "--robust-averaging", type=parse_bool, default=True,
        help="CenteredClip instead of a plain mean (bounds what one hostile member can do)",
    )  # fmt: skip
    avg.add_argument(
        "--clip-factor", type=float, default=3.0,
        help="CenteredClip radius, in median distances of the inputs to their median",
    )  # fmt: skip
    avg.add_argument(
        "--load-state", type=parse_bool, default=True,
        help="without a checkpoint to resume, download parameters, optimizer state and step "
        "from a peer of the run before training",
    )  # fmt: skip
    avg.add_argument(
        "--redownload-after", type=int, default=10,
        help="after this many rounds in a row without averaging (alone or failed), download "
        "the state from a peer of the run when one offers it; 0 never",
    )  # fmt: skip
    model = parser.add_argument_group("model and data")
    model.add_argument(
        "--model", choices=["mlp", "transformer"], default="mlp", help="architecture"
    )
    model.add_argument(
        "--model-module", default=None, help="a .py defining build_model(swarm, dataset, moe)"
    )
    model.add_argument(
        "--hidden-dim", type=int, default=64, help="width of the DMoE layers (= experts')"
    )
    model.add_argument("--num-layers", type=int, default=1, help="DMoE layers")
    model.add_argument(
        "--final-norm", type=parse_bool, default=False,
        help="mlp: LayerNorm before the output layer (the Learning@home paper's MNIST model)",
    )  # fmt: skip
    model.add_argument("--heads", type=int, default=2, help="attention heads (transformer)")
    model.add_argument(
        "--dataset", choices=["digits", "mnist", "text"], default="digits", help="data"
    )
    model.add_argument("--data-path", default=None, help="MNIST IDX directory or text file")
    model.add_argument("--seq-len", type=int, default=64, help="sequence length (text)")
    train = parser.add_argument_group("training")
    train.add_argument(
        "--steps", type=int, default=0, help="steps to train; 0 trains until stopped"
    )
    train.add_argument("--batch-size", type=int, default=64, help="samples per step")
    train.add_argument(
        "--lr", type=float, default=1e-3, help="Adam learning rate of local parameters"
    )
    train.add_argument(
        "--lr-decay", type=parse_bool, default=False,
        help="decay the learning rate linearly to 0 at --steps",
    )  # fmt: skip
    train.add_argument(
        "--balancing-weight", type=float, default=0.01, help="switch balancing loss weight"
    )
    train.add_argument("--eval-every", type=int, default=50, help="evaluate every N steps; 0 never")
    train.add_argument("--eval-batch-size", type=int, default=512, help="samples per eval batch")
    train.add_argument(
        "--seed", type=int, default=None,
        help="initialisation and batch-order seed; unset: the resumed checkpoint's, or drawn at "
        "random (and logged), so trainers of one swarm differ",
    )  # fmt: skip
    train.add_argument(
        "--split-seed", type=int, default=0,
        help="train/test split seed (digits): the same for every trainer, so test sets agree",
    )  # fmt: skip
    train.add_argument(
        "--train-samples", type=int, default=0,
        help="train on the first N training samples (each trainer holds its data in memory); "
        "0: all",
    )  # fmt: skip
    train.add_argument(
        "--eval-samples", type=int, default=0,
        help="evaluate on the first N test samples; 0: the whole test set",
    )  # fmt: skip
    train.add_argument("--checkpoint-dir", default=None, help="where to checkpoint and resume from")
    train.add_argument("--checkpoint-every", type=int, default=100, help="checkpoint every N steps")
    train.add_argument(
        "--history-file", default=None, help="JSON file rewritten at each evaluation"
    )
    train.add_argument(
        "--log-every", type=int, default=50, help="log a line every N steps (no tty)"
    )
    train.add_argument(
        "--max-consecutive-failures", type=int, default=0,
        help="exit with status 1 after this many skipped steps in a row; 0 never",
    )  # fmt: skip
    train.add_argument(
        "--failure-pause", type=float, default=0.5, help="pause after a skipped step, s"
    )
    return parser


def _announcer(
    args: argparse.Namespace, swarm: Any, address: str, dataset: str, run_id: str
) -> Any:
    """Start announcing this trainer in the DHT (services/trainer/announce.py), under the run id
    its averager uses."""
    from services import __version__
    from services.common.announcements import TrainerAnnouncement
    from services.trainer.announce import TrainerAnnouncer

    model = os.path.basename(args.model_module) if args.model_module else args.model
    announcement = TrainerAnnouncement(
        run_id=run_id, address=address, model=model[:64], dataset=dataset,
        uid_prefix=args.uid_prefix, grid=args.grid, version=__version__,
    )  # fmt: skip
    announcer = TrainerAnnouncer(swarm._dht_client(), announcement, args.announce_period)
    swarm.run(announcer.start())
    return announcer


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    tls = tls_from_args(args, parser)
    if not args.initial_peers and not args.model_module:
        parser.error(
            "--initial-peers (or DMOE_INITIAL_PEERS) is required: the DHT finds the experts"
        )
    setup_logging(args.log_level, args.log_format)

    import torch
    from prometheus_client import CollectorRegistry

    from services.common.config import announce_host
    from services.common.identity import (
        default_identity_path,
        load_trusted_keys,
        resolve_identity,
    )
    from services.common.limits import ServerLimits
    from services.common.server import start_server
    from services.trainer import checkpoint
    from services.trainer.backoff import Backoff
    from services.trainer.data import load_dataset
    from services.trainer.dispatch import CallPolicy
    from services.trainer.metrics import TrainerMetrics
    from services.trainer.models import MoEOptions, build_model
    from services.trainer.progress import Progress
    from services.trainer.service import TrainerServicer, registrar
    from services.trainer.swarm import Swarm
    from services.trainer.train import TooManyFailures, Trainer

    try:
        trusted = load_trusted_keys(args.trusted_keys) if args.trusted_keys else None
        identity = resolve_identity(
            args.identity_file, default_identity_path("trainer", args.port) if args.port else None
        )
    except (OSError, ValueError) as exc:
        log.error("cannot start: %s", exc)
        return 2
    saved = checkpoint.load(args.checkpoint_dir) if args.checkpoint_dir else None
    seed, source = resolve_seed(args.seed, saved)
    log.info("seed", extra={"seed": seed, "source": source, "split_seed": args.split_seed})
    torch.manual_seed(seed)
    dataset = load_dataset(
        args.dataset,
        args.data_path,
        seed=args.split_seed,
        order_seed=seed,
        seq_len=args.seq_len,
        test_samples=args.eval_samples,
        train_samples=args.train_samples,
    )
    registry = CollectorRegistry()
    metrics = TrainerMetrics(registry)
    swarm = Swarm(
        args.initial_peers,
        cache_ttl=args.dht_cache_ttl,
        negative_cache_ttl=args.dht_negative_cache_ttl,
        backoff=Backoff(args.backoff_base, args.backoff_max),
        metrics=metrics,
        max_message_bytes=args.max_message_bytes,
        compression=_COMPRESSIONS[args.compression],
        trusted=trusted,
        identity=identity,
        tls=tls,
    )
    options = MoEOptions(
        grid_size=args.grid,
        uid_prefix=args.uid_prefix,
        kind=args.moe_kind,
        k_best=args.k_best,
        policy=CallPolicy(
            k_min=args.k_min,
            forward_timeout=args.forward_timeout,
            timeout_after_k_min=args.timeout_after_k_min,
            backward_k_min=args.backward_k_min,
            backward_timeout=args.backward_timeout,
            forward_retries=args.forward_retries,
            transient_retries=args.transient_retries,
            allow_zero_outputs=args.allow_zero_outputs,
            detect_anomalies=args.detect_anomalies,
            max_expert_value=args.max_expert_value,
            max_expert_rms_ratio=args.max_expert_rms_ratio,
        ),
    )
    model = build_model(
        args.model,
        swarm,
        dataset,
        options,
        hidden=args.hidden_dim,
        layers=args.num_layers,
        heads=args.heads,
        model_module=args.model_module,
        final_norm=args.final_norm,
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    trainer = Trainer(
        model,
        dataset,
        optimizer,
        batch_size=args.batch_size,
        steps=args.steps,
        eval_every=args.eval_every,
        eval_batch_size=args.eval_batch_size,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every,
        metrics=metrics,
        progress=Progress(args.steps or None, args.log_every),
        balancing_weight=args.balancing_weight,
        failure_pause=args.failure_pause,
        max_consecutive_failures=args.max_consecutive_failures,
        history_file=args.history_file,
        lr_decay=args.lr_decay,
    )
    try:
        resumed = trainer.restore(saved)
    except ValueError as exc:
        log.error("cannot resume: %s", exc)
        swarm.close()
        return 2
    averager = None
    run = args.run_id or default_run_id(args)  # whom it averages with, and what it announces
    if args.average and args.initial_peers:
        from services.averaging import Aggregation, AveragerConfig
        from services.averaging.metrics import AveragerMetrics
        from services.trainer.averaging import BackgroundAveraging, TensorAverager

        try:
            config = AveragerConfig(
                run_id=run, target_group_size=args.target_group_size,
                window=args.average_period, reduce_timeout=args.average_timeout,
                compression=args.average_compression,
                aggregation=Aggregation(robust=args.robust_averaging, clip_factor=args.clip_factor),
            )  # fmt: skip
            averager = TensorAverager(
                list(model.parameters()), swarm, config, optimizer=optimizer,
                metrics=AveragerMetrics(registry), lock=trainer.param_lock,
                step_of=lambda: (trainer.state.step, trainer.state.samples_seen),
            )  # fmt: skip
        except ValueError as exc:
            log.error("cannot start: %s", exc)
            swarm.close()
            return 2
        trainer.averaging = BackgroundAveraging(
            averager, args.average_every, args.redownload_after, changed=trainer.guard.measure
        )
    servicer = TrainerServicer(
        trainer, args.model_module or args.model, dataset.name, identity.public_key, run
    )

    def register(server: Any) -> list[str]:
        names = registrar(servicer)(server)
        return names + (averager.averager.register(server) if averager else [])

    running = swarm.run(
        start_server(
            "trainer",
            register,
            host=args.host,
            port=args.port,
            metrics_port=args.metrics_port,
            max_message_bytes=args.max_message_bytes,
            registry=registry,
            tls=tls,
            limits=ServerLimits.from_args(args),
            links=[averager.averager.link] if averager else [],
        )
    )
    address = f"{announce_host(args.host, args.announce_host)}:{running.port}"
    if averager is not None:
        from services.trainer.averaging import digest

        averager.averager.address = address
        if args.load_state and not resumed:
            before = digest(averager.tensors)
            got = averager.download_state()
            if got is None:
                log.warning("no peer of the run offered its state: training from scratch",
                            extra={"run_id": run})  # fmt: skip
            else:  # the peer's step is reported; --steps keeps counting this trainer's own
                trainer.guard.measure()  # the step guard's certificate needs the new norms
                log.info("state downloaded", extra={
                    "run_id": run, "peer_step": got[0], "parameters_before": before,
                    "parameters": digest(averager.tensors)})  # fmt: skip
        averager.offer_state()
    swarm.run(running.set_serving(True))
    announcer = None
    if args.announce_period > 0 and args.initial_peers:
        announcer = _announcer(args, swarm, address, dataset.name, run)
    log.info(
        "trainer serving",
        extra={
            "address": address,
            "port": running.port,
            "metrics_port": running.metrics_port,
            "model": args.model,
            "dataset": dataset.name,
            "resumed_step": trainer.state.step,
            "seed": seed,
            "public_key": identity.hex,
            "trusted_keys": len(trusted) if trusted is not None else "any",
            "run_id": run if averager is not None else None,
            "parameters": digest_of(model),
        },
    )
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal received, stopping after this step", extra={"signal": signum})
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    code = 0
    try:
        state = trainer.train(stop)
        log.info(
            "training finished",
            extra={
                "step": state.step,
                "test_accuracy": state.test_accuracy,
                "test_loss": state.test_loss,
                "failed_steps": state.failed_steps,
            },
        )
    except TooManyFailures as exc:
        log.error("giving up: %s", exc)
        code = 1
    finally:
        try:
            if announcer is not None:
                swarm.run(announcer.stop(), timeout=5)
            if averager is not None:
                averager.close()
            swarm.run(running.stop(args.shutdown_grace), timeout=args.shutdown_grace + 5)
        finally:
            swarm.close()
    return code


def digest_of(model: Any) -> str:
    from services.trainer.averaging import digest

    return digest(list(model.parameters()))


if __name__ == "__main__":
    sys.exit(main())

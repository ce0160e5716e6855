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

from services.common.logs import setup_logging
from services.common.tls import tls_from_args
from services.trainer.flags import COMPRESSIONS, build_parser

log = logging.getLogger("services.trainer")


def resolve_seed(flag: int | None, saved: dict[str, Any] | None) -> tuple[int, str]:
    """The trainer's seed and where it came from: ``--seed``; else the checkpoint being resumed
    (so a restarted trainer keeps its batch order and continues exactly); else a fresh draw
    from the OS (not from the clock: trainers started together must differ)."""
    if flag is not None:
        return flag, "flag"
    if saved is not None and isinstance(saved.get("seed"), int):
        return saved["seed"], "checkpoint"
    return secrets.randbits(31), "drawn"


def default_run_id(args: argparse.Namespace) -> str:
    """The same for trainers started with the same model, data and grid flags."""
    shape = [args.model_module or args.model, args.dataset, args.hidden_dim, args.num_layers,
             args.heads, args.final_norm, args.seq_len, args.uid_prefix, list(args.grid),
             args.moe_kind]  # fmt: skip
    digest = hashlib.sha256(json.dumps(shape).encode()).hexdigest()[:12]
    prefix = re.sub(r"[^A-Za-z0-9_-]", "-", args.uid_prefix)[:40] or "run"
    return f"{prefix}-{digest}"


def run_init_seed(run_id: str) -> int:
    """The seed of a fresh model's initial parameters when it averages: drawn from the run id,
    so trainers of one run that start together (none has a state to download yet) start from
    the same model and averaging mixes one model's copies, not unrelated ones. Their data order
    still follows ``--seed``."""
    return int.from_bytes(hashlib.sha256(f"dmoe-init:{run_id}".encode()).digest()[:4], "big") >> 1


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

    from services.common.flags import announce_host
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
        compression=COMPRESSIONS[args.compression],
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
    run = args.run_id or default_run_id(args)  # whom it averages with, and what it announces
    averaging = bool(args.average and args.initial_peers)
    if args.init_seed is not None:
        init_seed, init_from = args.init_seed, "flag"
    elif averaging:
        init_seed, init_from = run_init_seed(run), "run id"
    else:
        init_seed, init_from = seed, "seed"
    torch.manual_seed(init_seed)  # the initial model; data order and the rest follow --seed
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
    torch.manual_seed(seed)
    log.info("initial parameters", extra={"init_seed": init_seed, "from": init_from})
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
        lr_decay_steps=args.lr_decay_steps,
    )
    try:
        resumed = trainer.restore(saved)
    except ValueError as exc:
        log.error("cannot resume: %s", exc)
        swarm.close()
        return 2
    averager = None
    if averaging:
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

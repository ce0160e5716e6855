"""An expert server assembled: backends, pools, batch runners, the scheduler, gRPC, checkpoints,
DHT declarations.

Per expert: an ``ExpertBackend`` (module, optimizer), and per method (forward, backward) a
``TaskPool`` (the queue) with its ``BatchRunner`` (how a batch runs), both registered with the
one ``DeviceScheduler``; the ``ExpertServicer`` validates requests and submits them to the pools.

``ExpertServer.start(config)`` is what ``python -m services.expert`` runs and what tests run in
process (many instances can live in one process: each has its own metrics registry).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from services.common.identity import Identity, default_identity_path, resolve_identity
from services.common.limits import ServerLimits
from services.common.rejections import Rejections
from services.common.server import RunningServer, start_server
from services.common.tls import TLSConfig
from services.expert import assignment
from services.expert import uid as uids
from services.expert.backend import ExpertBackend, OptimizerConfig, preload_autograd
from services.expert.batch_runner import BatchRunner
from services.expert.checkpoints import Checkpointer
from services.expert.declare import Declarer
from services.expert.faults import with_faults
from services.expert.grad_monitor import GradNormMonitor
from services.expert.grid_declaration import GridAnnouncer
from services.expert.layers import get_expert_class, load_custom_module
from services.expert.metrics import ExpertMetrics
from services.expert.scheduler import DeviceScheduler, default_parallelism
from services.expert.service import ExpertServicer
from services.expert.task_pool import BACKWARD, FORWARD, TaskPool

log = logging.getLogger(__name__)


@dataclass
class ExpertConfig:
    experts: list[str] = field(default_factory=lambda: ["ffn.[0:4]"])
    num_experts: int = 0  # > 0: sample this many free uids from the patterns
    expert_cls: str = "ffn"
    hidden_dim: int = 1024
    custom_module: str | None = None
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    device: str = "cpu"
    seed: int | None = None
    max_batch_size: int = 2048
    min_batch_size: int = 0  # a pool holding this many samples runs at once; 0: max_batch_size
    batch_timeout_ms: float = 1.0  # the longest a request waits for company (task_pool.py)
    max_queue_samples: int = 0  # 0: 8 x max_batch_size
    max_queue_bytes: int = 128 * 1024 * 1024  # per expert and method: two largest requests
    max_free_dim: int = 1024  # largest size of a free (-1) schema dimension
    max_grad_norm_ratio: float = 20.0  # 0: no outlier check (grad_monitor.py)
    max_caller_share: float = 0.0  # 0: off (caller_share.py)
    caller_share_window: int = 256
    compute_threads: int = 0  # 0: automatic
    torch_threads: int = 0  # 0: automatic
    switch_interval_ms: float = 0.5  # Python's GIL switch interval for the process; 0: keep
    host: str = "127.0.0.1"
    announce_host: str | None = None
    port: int = 0
    metrics_port: int | None = None
    max_message_bytes: int = 64 * 1024 * 1024
    max_stream_bytes: int = 64 * 1024 * 1024
    max_receive_bytes: int = 256 * 1024 * 1024  # all streams being received, together
    dht_peers: list[str] = field(default_factory=list)
    update_period: float = 15.0
    checkpoint_dir: str | None = None
    checkpoint_every: float = 60.0
    checkpoint_keep: int = 3
    hostname: str | None = None  # names <checkpoint_dir>/hosts/<hostname>.json; None: this host
    simulate_failure_rate: float = 0.0
    simulate_latency_ms: float = 0.0
    simulate_latency_distribution: str = "fixed"  # or "exp": Exp-distributed with that mean
    identity_file: str | None = None  # None: <checkpoint_dir>/identity/<hostname>.key, if any
    tls: TLSConfig | None = None  # the gRPC port and the DHT client (services.common.tls)
    limits: ServerLimits = field(default_factory=ServerLimits)  # what the gRPC server admits


async def _declared_in_dht(client: Any, candidates: list[str]) -> set[str]:
    """The candidates another server declared (an owned entry: unowned values anyone can
    write, so they do not make a uid taken)."""
    found = await client.get(candidates, latest=False)
    mine = client.identity.public_key if client.identity is not None else b""
    return {
        uid
        for uid in candidates
        if isinstance(found.get(uid), dict)
        and any(v.owner and v.owner != mine for values in found[uid].values() for v in values)
    }


class ExpertServer:
    def __init__(self, config: ExpertConfig) -> None:
        self.config = config
        self.registry = CollectorRegistry()
        self.metrics = ExpertMetrics(self.registry)
        self.rejections = Rejections("expert", self.registry, log)
        self.backends: dict[str, ExpertBackend] = {}
        self.pools: dict[tuple[str, str], TaskPool] = {}
        self.scheduler: DeviceScheduler | None = None
        self.running: RunningServer | None = None
        self.declarer: Declarer | None = None
        self.checkpointer: Checkpointer | None = None
        self.dht: Any = None
        self._checkpoint_task: asyncio.Task[None] | None = None
        self._serving_task: asyncio.Task[None] | None = None
        self._stopped = False
        self.identity: Identity | None = None

    def _identity(self) -> Identity:
        """The server's key: it owns the experts' DHT declarations. Kept beside the
        checkpoints by default, so a restarted container keeps owning its declarations."""
        cfg = self.config
        default = None
        if cfg.checkpoint_dir:
            default = assignment.identity_path(Path(cfg.checkpoint_dir), cfg.hostname)
        elif cfg.port:
            default = default_identity_path("expert", cfg.port)
        return resolve_identity(cfg.identity_file, default)

    @property
    def port(self) -> int:
        assert self.running is not None
        return self.running.port

    @property
    def address(self) -> str:
        from services.common.flags import announce_host

        return f"{announce_host(self.config.host, self.config.announce_host)}:{self.port}"

    async def _choose_uids(self) -> list[str]:
        cfg = self.config
        patterns = uids.split_patterns(cfg.experts)
        if cfg.num_experts > 0:
            path = (
                assignment.assignment_path(Path(cfg.checkpoint_dir), cfg.hostname)
                if cfg.checkpoint_dir
                else None
            )
            if path is not None:
                kept = assignment.load(path, patterns, cfg.num_experts)
                if kept is not None:
                    log.info("hosting the experts chosen before", extra={"path": str(path)})
                    return kept
            check = (lambda c: _declared_in_dht(self.dht, c)) if self.dht is not None else None
            rng = random.Random(cfg.seed) if cfg.seed is not None else None
            chosen = await uids.choose_free_uids(patterns, cfg.num_experts, check, rng=rng)
            if path is not None:
                await asyncio.to_thread(assignment.save, path, chosen)
            return chosen
        chosen = uids.expand(patterns)
        if not chosen:
            raise ValueError("no experts to host: give --experts")
        return chosen

    def _build_backends(self, chosen: list[str]) -> None:
        import torch

        cfg = self.config
        preload_autograd()
        if cfg.custom_module:
            load_custom_module(cfg.custom_module)
        expert_class = get_expert_class(cfg.expert_cls)
        for i, uid in enumerate(chosen):
            if cfg.seed is not None:
                torch.manual_seed(cfg.seed + i)
            self.backends[uid] = ExpertBackend(
                uid,
                expert_class,
                cfg.hidden_dim,
                cfg.optimizer,
                device=cfg.device,
                max_batch_size=cfg.max_batch_size,
                max_free_dim=cfg.max_free_dim,
            )

    async def start(self) -> ExpertServer:
        cfg = self.config
        if cfg.max_receive_bytes < cfg.max_stream_bytes:
            raise ValueError(
                f"--max-receive-bytes ({cfg.max_receive_bytes}) must be at least "
                f"--max-stream-bytes ({cfg.max_stream_bytes}), or no largest request fits"
            )
        if not 0 <= cfg.min_batch_size <= cfg.max_batch_size:
            raise ValueError(
                f"--min-batch-size ({cfg.min_batch_size}) must be between 0 and "
                f"--max-batch-size ({cfg.max_batch_size})"
            )
        if cfg.switch_interval_ms > 0:
            # Each torch call in a compute thread releases the GIL; getting it back waits for
            # the event loop to yield it, at worst a whole switch interval (5 ms by default).
            sys.setswitchinterval(cfg.switch_interval_ms / 1000.0)
        self.identity = await asyncio.to_thread(self._identity)
        if cfg.dht_peers:
            from services.dht.client import DHTClient

            self.dht = DHTClient(
                list(cfg.dht_peers), timeout=5.0, identity=self.identity, tls=cfg.tls
            )
        chosen = await self._choose_uids()
        await asyncio.to_thread(self._build_backends, chosen)
        backends = list(self.backends.values())
        if cfg.checkpoint_dir:
            self.checkpointer = Checkpointer(
                backends, Path(cfg.checkpoint_dir), cfg.checkpoint_keep
            )
            await asyncio.to_thread(self.checkpointer.restore)

        workers, threads = default_parallelism(cfg.device, len(backends))
        self.scheduler = DeviceScheduler(
            cfg.device,
            workers=cfg.compute_threads or workers,
            torch_threads=cfg.torch_threads or threads,
        )
        bound = cfg.max_queue_samples or 8 * cfg.max_batch_size
        for backend in backends:
            self.metrics.add_expert(backend.uid)
            for method in (FORWARD, BACKWARD):
                pool = TaskPool(
                    backend.uid,
                    method,
                    max_batch_size=cfg.max_batch_size,
                    min_batch_size=cfg.min_batch_size,
                    batch_timeout=cfg.batch_timeout_ms / 1000.0,
                    max_queue_samples=max(bound, cfg.max_batch_size),
                    max_queue_bytes=cfg.max_queue_bytes,
                    metrics=self.metrics,
                    on_ready=self.scheduler.ready,
                )
                monitor = (
                    GradNormMonitor(cfg.max_grad_norm_ratio)
                    if method == BACKWARD and cfg.max_grad_norm_ratio > 0 and backend.optimizer
                    else None  # an expert without parameters learns nothing to poison
                )
                self.scheduler.add(pool, BatchRunner(backend, method, self.metrics, monitor))
                self.pools[(backend.uid, method)] = pool
        self.scheduler.start()
        if self.scheduler.device.type == "cuda":
            await self._warm_up(backends)

        servicer = ExpertServicer(
            self.backends,
            self.pools,
            self.metrics,
            rejections=self.rejections,
            max_message_bytes=cfg.max_message_bytes,
            max_stream_bytes=cfg.max_stream_bytes,
            max_receive_bytes=cfg.max_receive_bytes,
            public_key=self.identity.public_key,
            max_caller_share=cfg.max_caller_share,
            caller_share_window=cfg.caller_share_window,
        )
        if cfg.simulate_failure_rate > 0 or cfg.simulate_latency_ms > 0:
            servicer.handle = with_faults(
                servicer.handle,
                cfg.simulate_failure_rate,
                cfg.simulate_latency_ms,
                cfg.seed,
                cfg.simulate_latency_distribution,
            )
        self.running = await start_server(
            "expert",
            servicer.register,
            host=cfg.host,
            port=cfg.port,
            metrics_port=cfg.metrics_port,
            max_message_bytes=cfg.max_message_bytes,
            registry=self.registry,
            tls=cfg.tls,
            limits=cfg.limits,
            links=[servicer.link],
        )
        log.info(
            "expert server listening",
            extra={
                "port": self.port,
                "metrics_port": self.running.metrics_port,
                "experts": len(backends),
                "workers": self.scheduler.workers,
                "torch_threads": self.scheduler.torch_threads,
                "public_key": self.identity.hex,
            },
        )
        if self.checkpointer is not None and cfg.checkpoint_every > 0:
            self._checkpoint_task = asyncio.create_task(self._checkpoint_loop())
        if self.dht is not None:
            self.declarer = Declarer(
                self.dht, list(self.backends), self.address, cfg.update_period, self.metrics,
                extra=self._grid_announcer(bound).items,
            )  # fmt: skip
            self.declarer.start()
            self._serving_task = asyncio.create_task(self._serving_after_declaration())
        else:
            await self.running.set_serving(True)
        return self

    def _grid_announcer(self, max_queue_samples: int) -> GridAnnouncer:
        """What this server announces under ``_dmoe.grids`` (grid_declaration.py)."""
        cfg, samples = self.config, self.metrics.samples

        def processed() -> float:
            return sum(s.value for m in samples.collect() for s in m.samples
                       if s.name.endswith("_total"))  # fmt: skip

        return GridAnnouncer(
            uids.split_patterns(cfg.experts),
            list(self.backends),
            self.address,
            tls=cfg.tls is not None,
            expert_cls=cfg.expert_cls,
            max_batch_size=cfg.max_batch_size,
            max_queue_samples=max(max_queue_samples, cfg.max_batch_size),
            queued=lambda: sum(pool.queued_rows for pool in self.pools.values()),
            processed=processed,
        )

    async def _warm_up(self, backends: list[ExpertBackend]) -> None:
        """A forward and backward of every expert on every compute thread, before SERVING: a
        GPU's first batch loads kernels and libraries (cuBLAS), which can take longer than a
        trainer's timeout. No optimizer step: weights and state stay as they are. A failure is
        logged, not fatal (the expert may still serve real inputs). Skipped on the CPU, where
        the first batch costs little more than the next."""
        assert self.scheduler is not None
        started = time.perf_counter()

        def warm_up() -> None:
            for backend in backends:
                with backend.lock:
                    backend.warm_up()

        try:
            await self.scheduler.on_each_thread(warm_up)
        except Exception as exc:  # e.g. a custom module that random inputs do not suit
            log.warning(
                "warm-up failed; the first batch will load what it needs",
                extra={"device": self.config.device, "error": repr(exc)},
            )
            return
        seconds = round(time.perf_counter() - started, 2)
        log.info("experts warmed up", extra={"device": self.config.device, "seconds": seconds})

    async def _serving_after_declaration(self) -> None:
        assert self.declarer is not None and self.running is not None
        await self.declarer.first_success.wait()
        if not self._stopped:
            await self.running.set_serving(True)
            log.info("experts declared in the DHT; serving", extra={"address": self.address})

    async def checkpoint_now(self, force: bool = False) -> None:
        if self.checkpointer is None:
            return
        written, failed = await asyncio.to_thread(self.checkpointer.save_all, force)
        if written:
            self.metrics.checkpoints.inc(written)
        if failed:
            self.metrics.checkpoint_failures.inc(failed)
        self.metrics.checkpointed(dict(self.checkpointer.saved_at))

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.checkpoint_every)
            await self.checkpoint_now()

    async def stop(self, grace: float = 5.0) -> None:
        """Stop declaring, finish in-flight calls, refuse queued ones, checkpoint, close."""
        if self._stopped:
            return
        self._stopped = True
        if self.declarer is not None:
            await self.declarer.stop()
        for task in (self._checkpoint_task, self._serving_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.running is not None:
            await self.running.stop(grace)
        if self.scheduler is not None:
            await self.scheduler.close()
        await self.checkpoint_now()
        if self.dht is not None:
            await self.dht.close()
        log.info("expert server stopped")

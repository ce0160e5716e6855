"""Prometheus metrics of the expert runtime, created in the server's own registry.

Names follow docs/conventions.md (``dmoe_expert_<what>_<unit>``); labels are the bounded ``expert``,
``method`` (forward/backward), ``code`` and ``reason``. Per-RPC counts and durations by gRPC
method already come from the common bootstrap; these add the per-expert and batching view.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.guard import LATENCY_BUCKETS

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
REQUEST_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64)


class ExpertMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "dmoe_expert_requests",
            "Forward/backward requests by expert, method and status code",
            ["expert", "method", "code"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "dmoe_expert_requests_in_flight",
            "Forward/backward requests accepted and not yet answered",
            ["method"],
            registry=registry,
        )
        self.queued_rows = Gauge(
            "dmoe_expert_queued_samples",
            "Samples waiting in an expert's pool",
            ["expert", "method"],
            registry=registry,
        )
        self.queued_bytes = Gauge(
            "dmoe_expert_queued_bytes",
            "Bytes of tensor data waiting in an expert's pool (bounded by --max-queue-bytes)",
            ["expert", "method"],
            registry=registry,
        )
        self.receive_bytes = Gauge(
            "dmoe_expert_stream_receive_bytes",
            "Bytes of streamed requests received and not yet parsed, over all streams "
            "(bounded by --max-receive-bytes)",
            registry=registry,
        )
        self.queue_wait = Histogram(
            "dmoe_expert_queue_wait_seconds",
            "Time from a request entering its pool to its batch starting",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_rows = Histogram(
            "dmoe_expert_batch_size_samples",
            "Samples per computed batch",
            ["method"],
            buckets=ROW_BUCKETS,
            registry=registry,
        )
        self.batch_requests = Histogram(
            "dmoe_expert_batch_requests",
            "Requests merged into one computed batch",
            ["method"],
            buckets=REQUEST_BUCKETS,
            registry=registry,
        )
        self.compute = Histogram(
            "dmoe_expert_compute_seconds",
            "Compute time of one batch (concatenate, run, split, encode replies)",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.latency = Histogram(
            "dmoe_expert_request_duration_seconds",
            "Whole forward/backward request latency in the server, decode to encoded reply",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.samples = Counter(
            "dmoe_expert_samples",
            "Samples processed by expert and method",
            ["expert", "method"],
            registry=registry,
        )
        self.steps = Counter(
            "dmoe_expert_optimizer_steps",
            "Optimizer steps applied by expert",
            ["expert"],
            registry=registry,
        )
        self.steps_rejected = Counter(
            "dmoe_expert_steps_rejected",
            "Optimizer steps refused (nonfinite_gradient: nothing applied) or undone "
            "(nonfinite_result), by expert; each is followed by a retry without the culprit",
            ["expert", "reason"],
            registry=registry,
        )
        self.checkpoints = Counter(
            "dmoe_expert_checkpoints", "Checkpoints written", registry=registry
        )
        self.checkpoint_failures = Counter(
            "dmoe_expert_checkpoint_failures",
            "Checkpoint writes that failed",
            registry=registry,
        )
        self.last_checkpoint = Gauge(
            "dmoe_expert_last_checkpoint_timestamp_seconds",
            "UNIX time of the expert's last successful checkpoint (0: none yet)",
            ["expert"],
            registry=registry,
        )
        self._oldest_checkpoint = time.time()
        self.checkpoint_age = Gauge(
            "dmoe_expert_checkpoint_age_seconds",
            "Seconds since the oldest of the experts' latest checkpoints (or since start)",
            registry=registry,
        )
        self.checkpoint_age.set_function(lambda: time.time() - self._oldest_checkpoint)
        self.declarations = Counter(
            "dmoe_expert_dht_declarations",
            "Successful DHT declaration rounds",
            registry=registry,
        )
        self.declaration_failures = Counter(
            "dmoe_expert_dht_declaration_failures",
            "Failed DHT declaration rounds, by reason",
            ["reason"],
            registry=registry,
        )

    def add_expert(self, uid: str) -> None:
        """Create the expert's label sets at 0, so every hosted expert has its series from the
        first scrape (dashboards count ``dmoe_expert_optimizer_steps_total`` series as experts
        hosted) and ``rate()`` sees the first increment."""
        self.steps.labels(uid)
        self.last_checkpoint.labels(uid)
        for method in ("forward", "backward"):
            self.samples.labels(uid, method)
            self.requests.labels(uid, method, "OK")
            self.queued_rows.labels(uid, method)
            self.queued_bytes.labels(uid, method)

    def checkpointed(self, times: dict[str, float]) -> None:
        """Record the latest checkpoint time of each expert."""
        for uid, stamp in times.items():
            self.last_checkpoint.labels(uid).set(stamp)
        if times:
            self._oldest_checkpoint = min(times.values())

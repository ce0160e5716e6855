"""Prometheus metrics of a trainer and of the DMoE layers it runs.

Created in a per-instance registry (``RunningServer.registry``) so several trainers can live
in one process. The client library takes them optionally: a model used outside the trainer
service passes none and records nothing.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.guard import LATENCY_BUCKETS


class TrainerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry if registry is not None else CollectorRegistry()
        self.registry = registry
        self.steps = Counter("dmoe_trainer_steps", "Optimizer steps taken", registry=registry)
        self.steps_skipped = Counter(
            "dmoe_trainer_steps_skipped",
            "Steps skipped with parameters and optimizer state untouched, by reason: "
            "nonfinite_loss, nonfinite_gradient, nonfinite_result",
            ["reason"],
            registry=registry,
        )
        self.samples = Counter(
            "dmoe_trainer_samples", "Training samples processed", registry=registry
        )
        self.train_loss = Gauge(
            "dmoe_trainer_train_loss", "Loss of the last training step", registry=registry
        )
        self.test_loss = Gauge("dmoe_trainer_test_loss", "Loss of the last eval", registry=registry)
        self.test_accuracy = Gauge(
            "dmoe_trainer_test_accuracy_ratio", "Accuracy of the last eval", registry=registry
        )
        self.expert_call = Histogram(
            "dmoe_trainer_expert_call_duration_seconds",
            "Latency of one expert call as seen by the trainer, by method",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.expert_failures = Counter(
            "dmoe_trainer_expert_failures",
            "Failed expert calls by method and reason: timeout, error, anomaly (dropped), "
            "retried (a refused forward sent again)",
            ["method", "reason"],
            registry=registry,
        )
        self.experts_answered = Histogram(
            "dmoe_trainer_experts_answered",
            "Experts that answered the forward, per sample",
            buckets=(0, 1, 2, 3, 4, 6, 8, 16, 32),
            registry=registry,
        )
        self.beam_search = Histogram(
            "dmoe_trainer_beam_search_duration_seconds",
            "Time to find the best live experts for a batch (DHT lookups included)",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.experts_skipped = Gauge(
            "dmoe_trainer_experts_skipped",
            "Experts currently in back-off after failures",
            registry=registry,
        )

"""The training loop: steps, periodic evaluation, checkpoints, and riding out a flaky swarm.

A step whose DMoE layers cannot get enough expert answers (or cannot reach the DHT) is skipped,
not fatal: the trainer pauses briefly and tries again, since experts come and go. The loop checks
the stop event between steps, so SIGTERM costs at most one step (bounded by the layers'
timeouts) before the final checkpoint.

Every step is all or nothing, as on the experts: a non-finite loss skips it before any expert
gets a backward, a non-finite gradient norm skips it before the optimizer runs, and the
optimizer step goes through ``services.expert.step_guard.StepGuard`` (certified, or copied and
undone when it leaves a non-finite value), so no expert, buggy or hostile, can leave NaN or inf
in the trainer's parameters or Adam's moments. Skipped steps count in
``dmoe_trainer_steps_skipped_total{reason}`` and as failed steps. A checkpoint holding a
non-finite value is never written (nor restored).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from services.common.errors import CallError
from services.common.files import atomic_write
from services.expert.step_guard import StepGuard
from services.trainer import checkpoint
from services.trainer.data import Dataset
from services.trainer.dispatch import ExpertsUnavailableError
from services.trainer.metrics import TrainerMetrics
from services.trainer.models import aux_loss, experts_in_use
from services.trainer.progress import Progress

log = logging.getLogger(__name__)

# What a flaky swarm can throw at a step: too few experts, no DHT, a stuck call.
SWARM_ERRORS: tuple[type[BaseException], ...] = (
    ExpertsUnavailableError,
    ConnectionError,
    TimeoutError,
    CallError,
)


@dataclass
class TrainerState:
    step: int = 0
    samples_seen: int = 0
    last_loss: float = math.nan
    test_loss: float = math.nan
    test_accuracy: float = math.nan
    last_eval_step: int = -1
    failed_steps: int = 0
    state: str = "starting"
    experts_in_use: list[str] = field(default_factory=list)
    experts_called: list[str] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)
    steps_per_second: float = 0.0


class TooManyFailures(RuntimeError):
    pass


class NonFiniteStep(RuntimeError):
    """The step was skipped before the optimizer ran, or undone: parameters and optimizer
    state are as before. ``reason``: ``nonfinite_loss``, ``nonfinite_gradient``,
    ``nonfinite_result``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# What skips a step without stopping the trainer.
SKIPPED: tuple[type[BaseException], ...] = (*SWARM_ERRORS, NonFiniteStep)


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        dataset: Dataset,
        optimizer: torch.optim.Optimizer,
        *,
        batch_size: int = 64,
        steps: int = 0,
        eval_every: int = 50,
        eval_batch_size: int = 512,
        checkpoint_dir: str | None = None,
        checkpoint_every: int = 100,
        metrics: TrainerMetrics | None = None,
        progress: Progress | None = None,
        balancing_weight: float = 0.01,
        failure_pause: float = 0.5,
        max_consecutive_failures: int = 0,
        history_file: str | None = None,
        eval_attempts: int = 3,
        lr_decay: bool = False,
        lr_decay_steps: int = 0,
        averaging: Any = None,
    ) -> None:
        self.model, self.dataset, self.optimizer = model, dataset, optimizer
        self.batch_size, self.steps = batch_size, steps
        self.eval_every, self.eval_batch_size = eval_every, eval_batch_size
        self.checkpoint_dir, self.checkpoint_every = checkpoint_dir, checkpoint_every
        self.metrics = metrics
        self.progress = progress
        self.balancing_weight = balancing_weight
        self.failure_pause = failure_pause
        self.max_consecutive_failures = max_consecutive_failures
        self.history_file = history_file
        self.eval_attempts = max(1, eval_attempts)
        # linear decay to 0 at ``lr_decay_steps`` (else at ``steps``): a trainer that runs until
        # stopped (``steps`` 0) can still decay over the part of a run it is expected to do
        self.decay_steps = lr_decay_steps or (steps if lr_decay else 0)
        self.lr_decay = self.decay_steps > 0
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.guard = StepGuard(self.params, optimizer)
        self.state = TrainerState()
        self.started = time.time()
        self._step_times: deque[float] = deque(maxlen=20)
        self._lock = threading.Lock()
        # held while parameters change (optimizer step, an averaged delta) or are read for a
        # newcomer downloading the state from another thread
        self.param_lock = threading.Lock()
        # ``after_step(step, samples_seen)`` after every step: background averaging
        # (services.trainer.averaging.BackgroundAveraging), None without
        self.averaging = averaging

    # ---- loss ----------------------------------------------------------------------------
    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Mean loss and the number of correct predictions."""
        logits = self.model(x)
        if self.dataset.task == "lm":
            logits, y = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
        loss = F.cross_entropy(logits, y)
        return loss, int((logits.argmax(-1) == y).sum())

    # ---- steps ---------------------------------------------------------------------------
    def train_step(self) -> float:
        self.model.train()
        x, y = self.dataset.batch_at(self.state.samples_seen, self.batch_size)
        if self.lr_decay:  # linear to 0 at the last step; derived from the step, so resumable
            factor = max(0.0, 1.0 - self.state.step / self.decay_steps)
            for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
                group["lr"] = base * factor
        self.optimizer.zero_grad(set_to_none=True)
        loss, _correct = self._loss(x, y)
        total = loss + self.balancing_weight * aux_loss(self.model)
        value = float(loss.detach())
        if not math.isfinite(float(total.detach())):
            raise self._skip("nonfinite_loss", f"loss is {value}: no backward, no step")
        total.backward()
        with self.param_lock:
            self._step()
        with self._lock:
            self.state.step += 1
            self.state.samples_seen += len(x)
            self.state.last_loss = value
            self.state.experts_in_use, self.state.experts_called = experts_in_use(self.model)
        if self.metrics is not None:
            self.metrics.steps.inc()
            self.metrics.samples.inc(len(x))
            self.metrics.train_loss.set(value)
        return value

    def _step(self) -> None:
        """The optimizer step, all or nothing (module docstring)."""
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = float(torch.nn.utils.get_total_norm(grads, foreach=True)) if grads else 0.0
        if not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise self._skip("nonfinite_gradient", f"gradient norm is {norm}: no step")
        if not self.guard.step(norm):
            raise self._skip("nonfinite_result", "the step left non-finite values: undone")

    def _skip(self, reason: str, message: str) -> NonFiniteStep:
        if self.metrics is not None:
            self.metrics.steps_skipped.labels(reason).inc()
        return NonFiniteStep(reason, message)

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        self.model.eval()
        total_loss, correct, count = 0.0, 0, 0
        for x, y in self.dataset.test_batches(self.eval_batch_size):
            loss, right = self._eval_batch(x, y)
            n = y.numel()
            total_loss += float(loss) * n
            correct += right
            count += n
        self.model.train()
        test_loss, accuracy = total_loss / count, correct / count
        with self._lock:
            self.state.test_loss, self.state.test_accuracy = test_loss, accuracy
            self.state.last_eval_step = self.state.step
            self.state.history.append(
                {
                    "step": self.state.step,
                    "samples": self.state.samples_seen,
                    "seconds": round(time.time() - self.started, 3),
                    "time": round(time.time(), 3),  # wall clock, to align trainers' logs
                    "train_loss": self.state.last_loss,
                    "test_loss": test_loss,
                    "test_accuracy": accuracy,
                }
            )
        if self.metrics is not None:
            self.metrics.test_loss.set(test_loss)
            self.metrics.test_accuracy.set(accuracy)
        log.info(
            "eval",
            extra={
                "step": self.state.step,
                "test_loss": round(test_loss, 5),
                "test_accuracy": round(accuracy, 5),
            },
        )
        self._write_history()
        return test_loss, accuracy

    def _eval_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
        """One test batch, tried again when the swarm drops it (a flaky expert must not turn
        into a missing point of the accuracy curve)."""
        for attempt in range(self.eval_attempts):
            try:
                return self._loss(x, y)
            except SWARM_ERRORS:
                if attempt + 1 == self.eval_attempts:
                    raise
                time.sleep(self.failure_pause / 5)
        raise AssertionError("unreachable")

    def _try(self, what: str, fn: Any) -> bool:
        try:
            fn()
            return True
        except SWARM_ERRORS as exc:
            log.warning("%s failed: %s", what, exc, extra={"step": self.state.step})
            return False

    # ---- the loop ------------------------------------------------------------------------
    def train(self, stop: threading.Event | None = None) -> TrainerState:
        """Train until ``steps`` (0: forever) or ``stop`` is set; checkpoint at the end."""
        stop = stop or threading.Event()
        consecutive = 0
        if self.eval_every > 0 and not self.state.history:
            self._try("evaluation", self.evaluate)
        self.state.state = "training"
        try:
            while not stop.is_set() and (self.steps <= 0 or self.state.step < self.steps):
                started = time.perf_counter()
                try:
                    loss = self.train_step()
                except SKIPPED as exc:
                    consecutive += 1
                    with self._lock:
                        self.state.failed_steps += 1
                        self.state.state = "waiting_for_experts"
                    log.warning(
                        "step skipped: %s",
                        exc,
                        extra={"step": self.state.step, "consecutive": consecutive},
                    )
                    if 0 < self.max_consecutive_failures <= consecutive:
                        raise TooManyFailures(f"{consecutive} steps failed in a row") from exc
                    stop.wait(self.failure_pause)
                    continue
                consecutive = 0
                self.state.state = "training"
                self._step_times.append(time.perf_counter() - started)
                self.state.steps_per_second = len(self._step_times) / sum(self._step_times)
                step = self.state.step
                if self.averaging is not None:
                    self.averaging.after_step(step, self.state.samples_seen)
                if self.progress is not None:
                    self.progress.update(
                        step, loss, self.state.test_accuracy, self.state.steps_per_second
                    )
                if self.eval_every > 0 and step % self.eval_every == 0:
                    self._try("evaluation", self.evaluate)
                if (
                    self.checkpoint_dir
                    and self.checkpoint_every > 0
                    and step % self.checkpoint_every == 0
                ):
                    self.save()
        finally:
            self.state.state = "stopping"
            if self.progress is not None:
                self.progress.close()
            if self.averaging is not None:
                self.averaging.close()
        if (
            self.eval_every > 0
            and self.state.last_eval_step != self.state.step
            and not stop.is_set()
        ):
            self._try("evaluation", self.evaluate)
        if self.checkpoint_dir:
            self.save()
        self.state.state = "finished"
        return self.state

    # ---- checkpoints ---------------------------------------------------------------------
    def save(self) -> None:
        assert self.checkpoint_dir
        with self._lock:
            meta = asdict(self.state)
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "state": meta,
            "seed": self.dataset.batch_seed,  # a resumed trainer keeps its batch order
        }
        if not checkpoint.finite(state):  # the guard makes this unreachable; never write it
            log.error("checkpoint not written: non-finite parameters or optimizer state",
                      extra={"step": self.state.step})  # fmt: skip
            return
        path = checkpoint.save(self.checkpoint_dir, state)
        log.info("checkpoint saved", extra={"step": self.state.step, "path": str(path)})

    def restore(self, saved: dict[str, Any] | None = None) -> bool:
        """Resume from ``saved`` (a checkpoint the caller already loaded) or from the newest
        checkpoint in ``checkpoint_dir``; False when there is none."""
        if saved is None and self.checkpoint_dir:
            saved = checkpoint.load(self.checkpoint_dir)
        if saved is None:
            return False
        if not checkpoint.finite(saved):
            raise ValueError("the checkpoint holds non-finite parameters or optimizer state")
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.guard.measure()  # the next step's certificate needs the loaded norms
        meta = saved["state"]
        for key in ("step", "samples_seen", "last_loss", "test_loss", "test_accuracy"):
            setattr(self.state, key, meta[key])
        self.state.last_eval_step = meta["last_eval_step"]
        self.state.failed_steps = meta["failed_steps"]
        self.state.history = list(meta["history"])
        log.info("resumed from checkpoint", extra={"step": self.state.step})
        return True

    def _write_history(self) -> None:
        if not self.history_file:
            return
        atomic_write(self.history_file, json.dumps({"history": self.state.history}))

    def snapshot(self) -> TrainerState:
        with self._lock:
            copy = TrainerState(**{k: getattr(self.state, k) for k in asdict(self.state)})
            copy.experts_in_use = list(self.state.experts_in_use)
            copy.experts_called = list(self.state.experts_called)
            copy.history = list(self.state.history)
        return copy

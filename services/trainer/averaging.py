"""A model's own parameters averaged with the trainers of its run (docs/averaging.md).

:class:`TensorAverager` maps a list of tensors (a model's parameters: its input layer, gates,
norms and head; the experts live on expert servers) onto the flat float32 vector of
:class:`~services.averaging.Averager` and back. Library use::

    averager = TensorAverager(list(model.parameters()), swarm, run_id="my-run")
    averager.start()                 # its own gRPC server, unless registered on one
    averager.step(weight=samples)    # blocks: one round, the tensors updated in place

:class:`BackgroundAveraging` is what the trainer runs: every ``average_every`` local steps it
snapshots the parameters and starts a round on the swarm's loop while training goes on; when the
round's average arrives, the difference ``average - snapshot`` is added to the parameters (an
outer step, as in Moshpit SGD and DiLoCo), so local progress made meanwhile is kept and a slow
round never stalls the loop.

State download: :meth:`TensorAverager.download_state` fetches parameters, optimizer statistics
and the step count from a peer of the run, checked against this model's names and shapes.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from services.averaging import Averager, AveragerConfig, RoundResult
from services.averaging.metrics import AveragerMetrics
from services.trainer.swarm import Swarm

log = logging.getLogger(__name__)


def flatten(tensors: Sequence[torch.Tensor]) -> np.ndarray:
    return torch.cat([t.detach().reshape(-1).float().cpu() for t in tensors]).numpy().copy()


def digest(tensors: Sequence[torch.Tensor]) -> str:
    """SHA-256 of the tensors' float32 bytes (logged, so operators can compare two trainers)."""
    return hashlib.sha256(flatten(tensors).tobytes()).hexdigest()[:16]


class TensorAverager:
    """Averages ``tensors`` in place with the peers of ``config.run_id`` (see module doc).

    ``optimizer``: its statistics are offered to newcomers with the parameters. ``lock``: held
    while the tensors are read for a newcomer or written by a round (the trainer holds it during
    its optimizer step). ``step_of``: the step count offered with the state.
    """

    def __init__(
        self,
        tensors: Sequence[torch.Tensor],
        swarm: Swarm,
        config: AveragerConfig,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        metrics: AveragerMetrics | None = None,
        lock: threading.Lock | None = None,
        step_of: Callable[[], tuple[int, int]] = lambda: (0, 0),
        address: str = "",
    ) -> None:
        self.tensors = list(tensors)
        self.swarm = swarm
        self.optimizer = optimizer
        self.lock = lock or threading.Lock()
        self.step_of = step_of
        self.size = sum(t.numel() for t in self.tensors)
        self.averager = swarm.run(self._make(config, metrics, address))
        self._server: Any = None

    async def _make(self, config: AveragerConfig, metrics: AveragerMetrics | None,
                    address: str) -> Averager:  # fmt: skip
        dht = self.swarm._dht_client()
        if dht.identity is None:
            raise ValueError("averaging needs a Swarm with an identity (it signs its entries)")
        averager = Averager(
            config, size=self.size, dht=dht, identity=dht.identity, address=address,
            metrics=metrics, tls=self.swarm.tls, state_source=self._state,
        )  # fmt: skip
        averager.step_of = lambda: self.step_of()[0]
        return averager

    # ---- serving -----------------------------------------------------------------------------
    def start(
        self, host: str = "127.0.0.1", port: int = 0, announce_host: str | None = None
    ) -> str:
        """Serve ``dmoe.Averager`` on its own gRPC port (library use; the trainer service
        registers it on its own port instead); returns the address peers dial."""
        from services.common.server import start_server

        self._server = self.swarm.run(start_server(
            "trainer", self.averager.register, host=host, port=port, metrics_port=-1,
            tls=self.swarm.tls, links=[self.averager.link],
        ))  # fmt: skip
        self.averager.address = f"{announce_host or host}:{self._server.port}"
        self.swarm.run(self._server.set_serving(True))
        self.offer_state()
        return self.averager.address

    def offer_state(self) -> None:
        self.swarm.loop.loop.call_soon_threadsafe(self.averager.start_offering_state)

    def close(self) -> None:
        self.swarm.run(self.averager.close())
        if self._server is not None:
            self.swarm.run(self._server.stop(0.5))
            self._server = None

    # ---- rounds ------------------------------------------------------------------------------
    def snapshot(self) -> np.ndarray:
        with self.lock:
            return flatten(self.tensors)

    def submit(self, vector: np.ndarray, weight: float) -> concurrent.futures.Future[RoundResult]:
        """Start a round on the swarm's loop; the caller keeps training."""
        return self.swarm.loop.submit(self.averager.step(vector, weight))

    def add(self, delta: np.ndarray) -> None:
        """Add a flat ``delta`` to the tensors (under the lock)."""
        with self.lock, torch.no_grad():
            offset = 0
            for t in self.tensors:
                n = t.numel()
                piece = torch.from_numpy(delta[offset : offset + n]).view_as(t)
                t.add_(piece.to(device=t.device, dtype=t.dtype))
                offset += n

    def step(self, weight: float = 1.0, timeout: float | None = None) -> RoundResult:
        """One blocking round: on success the tensors hold the group's average."""
        sent = self.snapshot()
        result = self.submit(sent, weight).result(timeout)
        if result.outcome == "ok" and result.vector is not None:
            self.add(result.vector - sent)
        return result

    # ---- state -------------------------------------------------------------------------------
    def _state(self) -> tuple[int, int, list[tuple[str, np.ndarray]]]:
        step, samples = self.step_of()
        with self.lock:
            arrays = [(f"param.{i}", t.detach().float().cpu().numpy().copy())
                      for i, t in enumerate(self.tensors)]  # fmt: skip
            if self.optimizer is not None:
                index = {id(p): i for i, p in enumerate(self.tensors)}
                for p, state in self.optimizer.state.items():
                    i = index.get(id(p))
                    if i is None:
                        continue
                    for key, value in sorted(state.items()):
                        if isinstance(value, torch.Tensor) and value.is_floating_point():
                            arrays.append(
                                (f"opt.{i}.{key}", value.detach().float().cpu().numpy().copy())
                            )
        return step, samples, arrays

    def _check(self, specs: list[tuple[str, tuple[int, ...]]]) -> str | None:
        shapes = [tuple(t.shape) for t in self.tensors]
        names = [name for name, _ in specs]
        if names[: len(shapes)] != [f"param.{i}" for i in range(len(shapes))]:
            return "parameter names differ"
        for (name, shape), want in zip(specs, shapes, strict=False):
            if shape != want:
                return f"{name} has shape {shape}, this model {want}"
        for name, shape in specs[len(shapes) :]:
            parts = name.split(".")
            if len(parts) != 3 or parts[0] != "opt" or not parts[1].isdigit():
                return f"unexpected tensor {name[:60]!r}"
            i = int(parts[1])
            if i >= len(shapes) or shape not in (shapes[i], ()):
                return f"{name} has shape {shape}"
        return None

    def download_state(self, timeout: float = 30.0, attempts: int = 3) -> tuple[int, int] | None:
        """Load a peer's parameters and optimizer statistics; returns (step, samples_seen),
        or None when no peer of the run offered a loadable state (train from scratch).
        ``timeout`` bounds each peer tried, ``attempts`` how many."""
        state = self.swarm.run(
            self.averager.download_state(self._check, timeout, attempts=attempts),
            attempts * timeout + 30,
        )
        if state is None:
            return None
        step, samples, arrays = state
        params = dict(arrays[: len(self.tensors)])
        with self.lock, torch.no_grad():
            for i, t in enumerate(self.tensors):
                t.copy_(torch.from_numpy(params[f"param.{i}"]).to(t.device, t.dtype))
        if self.optimizer is not None:
            self._load_optimizer(arrays[len(self.tensors) :])
        return step, samples

    def _load_optimizer(self, arrays: list[tuple[str, np.ndarray]]) -> None:
        assert self.optimizer is not None
        state: dict[int, dict[str, torch.Tensor]] = {}
        for name, array in arrays:
            _, i, key = name.split(".")
            state.setdefault(int(i), {})[key] = torch.from_numpy(array.copy())
        saved = self.optimizer.state_dict()
        saved["state"] = state
        try:
            self.optimizer.load_state_dict(saved)
        except Exception as exc:  # another optimizer's statistics: keep fresh ones
            log.warning("peer's optimizer state not loaded, starting it fresh: %s", exc)


class BackgroundAveraging:
    """The trainer's averaging: called after every step (training thread), see module doc."""

    def __init__(
        self,
        averager: TensorAverager,
        every: int,
        redownload_after: int = 0,
        changed: Callable[[], object] | None = None,
    ) -> None:
        self.averager = averager
        self.every = max(1, every)
        # called after a round or a download changed the parameters (the trainer's step guard
        # measures them again: its certificate depends on their norms)
        self.changed = changed
        # after this many rounds in a row without averaging, load a peer's state (0: never)
        self.redownload_after = redownload_after
        self.behind = 0
        self._patience = 1  # doubles after a catch-up found nobody (up to 8x)
        self._future: concurrent.futures.Future[RoundResult] | None = None
        self._sent: np.ndarray | None = None
        self._last_start_step = -(10**9)
        self._last_samples = 0
        self.last: RoundResult | None = None
        self.rounds: dict[str, int] = {"ok": 0, "alone": 0, "failed": 0}

    def after_step(self, step: int, samples_seen: int) -> None:
        if self._future is not None and self._future.done():
            self._finish()
        if self._future is None and step - self._last_start_step >= self.every:
            weight = max(0, samples_seen - self._last_samples)
            self._sent = self.averager.snapshot()
            self._future = self.averager.submit(self._sent, float(weight))
            self._last_start_step, self._last_samples = step, samples_seen

    def _finish(self, catch_up: bool = True) -> None:
        assert self._future is not None
        try:
            result = self._future.result()
        except Exception as exc:  # the loop closed, a bug: the round is lost, training goes on
            log.warning("averaging round raised: %s", exc)
            result = RoundResult("failed", -1, reason=str(exc)[:200], finished_at=time.time())
        self._future = None
        if result.outcome == "ok" and result.vector is not None and self._sent is not None:
            self.averager.add(result.vector - self._sent)
            if self.changed is not None:
                self.changed()
        self._sent = None
        self.last = result
        self.rounds[result.outcome] = self.rounds.get(result.outcome, 0) + 1
        if result.outcome == "ok":
            self.behind, self._patience = 0, 1
        else:
            self.behind += 1
        if catch_up and 0 < self.redownload_after * self._patience <= self.behind:
            self._catch_up()

    def _catch_up(self) -> None:
        """Fell behind (no round averaged for a while): take a peer's state, when one is
        offered, instead of drifting on alone. Blocks the training loop for the download."""
        behind, self.behind = self.behind, 0
        try:  # short: the training loop waits (at most 2 x 10 s)
            got = self.averager.download_state(timeout=10.0, attempts=2)
        except Exception as exc:
            got = None
            log.warning("catching up failed: %s", exc)
        if got is None:  # nobody to catch up with: wait twice as long before asking again
            self._patience = min(8, 2 * self._patience)
            return
        self._patience = 1
        if self.changed is not None:
            self.changed()
        log.info("state downloaded after rounds without averaging",
                 extra={"rounds_behind": behind, "peer_step": got[0],
                        "parameters": digest(self.averager.tensors)})  # fmt: skip

    def close(self, timeout: float = 30.0) -> None:
        """Wait for a round in flight (its result is applied) so a final checkpoint has it."""
        if self._future is not None:
            try:
                self._future.result(timeout)
            except Exception:
                log.debug("round in flight at close did not finish", exc_info=True)
            if self._future.done():
                self._finish(catch_up=False)

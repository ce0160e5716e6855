"""The trainer's background averaging policy (``BackgroundAveraging``), on a stand-in for the
averager whose rounds complete when the test says: when rounds start, how an average is applied
as a delta on top of local progress, and when a trainer that stopped averaging catches up."""

from __future__ import annotations

import concurrent.futures

import numpy as np
import torch

from services.averaging import RoundResult
from services.trainer.averaging import BackgroundAveraging


class Rounds:
    """Holds a parameter tensor; each round is a future the test completes."""

    def __init__(self) -> None:
        self.tensors = [torch.zeros(3)]
        self.rounds: list[tuple[np.ndarray, float, concurrent.futures.Future[RoundResult]]] = []
        self.downloads = 0
        self.offer: np.ndarray | None = None

    def snapshot(self) -> np.ndarray:
        return self.tensors[0].numpy().copy()

    def submit(self, vector: np.ndarray, weight: float) -> concurrent.futures.Future[RoundResult]:
        future: concurrent.futures.Future[RoundResult] = concurrent.futures.Future()
        self.rounds.append((vector, weight, future))
        return future

    def add(self, delta: np.ndarray) -> None:
        self.tensors[0] += torch.from_numpy(delta)

    def download_state(self, timeout: float = 30.0, attempts: int = 3) -> tuple[int, int] | None:
        self.downloads += 1
        if self.offer is None:
            return None
        self.tensors[0].copy_(torch.from_numpy(self.offer))
        return 7, 70


def test_rounds_start_every_n_steps_and_apply_the_average_as_a_delta() -> None:
    rounds, changed = Rounds(), []
    bg = BackgroundAveraging(rounds, every=3, changed=lambda: changed.append(1))  # type: ignore[arg-type]
    bg.after_step(1, 10)
    assert len(rounds.rounds) == 1 and rounds.rounds[0][1] == 10.0  # samples since the last
    rounds.tensors[0] += 1.0  # local steps while the round runs
    bg.after_step(2, 20)
    bg.after_step(3, 30)
    assert len(rounds.rounds) == 1  # one round at a time
    sent, _, future = rounds.rounds[0]
    future.set_result(RoundResult("ok", 5, vector=sent + 10.0))
    bg.after_step(4, 40)  # applied between steps: local progress (+1) kept, delta (+10) added
    assert rounds.tensors[0].tolist() == [11.0, 11.0, 11.0] and changed == [1]
    assert len(rounds.rounds) == 2 and rounds.rounds[1][1] == 30.0
    rounds.rounds[1][2].set_result(RoundResult("failed", 6, reason="a reducer died"))
    bg.after_step(5, 50)
    assert rounds.tensors[0].tolist() == [11.0, 11.0, 11.0]  # a failed round changes nothing
    assert bg.rounds == {"ok": 1, "alone": 0, "failed": 1} and bg.last.outcome == "failed"


def test_a_trainer_that_stops_averaging_catches_up_and_backs_off_when_nobody_offers() -> None:
    rounds = Rounds()
    bg = BackgroundAveraging(rounds, every=1, redownload_after=2)  # type: ignore[arg-type]
    steps = iter(range(1, 100))

    def finish(outcome: str) -> None:
        """The round in flight ends with ``outcome``; the next step applies it."""
        rounds.rounds[-1][2].set_result(RoundResult(outcome, len(rounds.rounds)))
        step = next(steps)
        bg.after_step(step, step)

    bg.after_step(*(2 * [next(steps)]))
    finish("alone")
    assert rounds.downloads == 0
    finish("alone")  # 2 rounds in a row without averaging: look for a peer's state
    assert rounds.downloads == 1  # nobody offered one: wait twice as long (4 rounds)
    for _ in range(3):
        finish("failed")
    assert rounds.downloads == 1
    rounds.offer = np.array([5.0, 5.0, 5.0], np.float32)
    finish("alone")
    assert rounds.downloads == 2 and rounds.tensors[0].tolist() == [5.0, 5.0, 5.0]
    finish("ok")  # averaging again: the count starts over
    finish("alone")
    assert rounds.downloads == 2

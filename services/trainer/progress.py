"""Progress display: a one-line bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

log = logging.getLogger(__name__)


class Progress:
    def __init__(
        self, total: int | None, log_every: int = 50, stream: TextIO | None = None
    ) -> None:
        self.total = total
        self.log_every = max(1, log_every)
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self._last_draw = 0.0

    def update(self, step: int, loss: float, accuracy: float | None, steps_per_s: float) -> None:
        if self.tty:
            now = time.monotonic()
            if now - self._last_draw < 0.2 and step != self.total:
                return
            self._last_draw = now
            acc = "" if accuracy is None else f" acc {accuracy:.3f}"
            if self.total:
                filled = int(30 * min(1.0, step / self.total))
                bar = f"[{'#' * filled}{'.' * (30 - filled)}] {step}/{self.total}"
            else:
                bar = f"step {step}"
            self.stream.write(f"\r{bar} loss {loss:.4f}{acc} {steps_per_s:.1f} steps/s ")
            self.stream.flush()
        elif step % self.log_every == 0:
            log.info(
                "training",
                extra={"step": step, "loss": round(loss, 5), "steps_per_s": round(steps_per_s, 2)},
            )

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

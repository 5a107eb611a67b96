"""Progress for people: a rich bar on a terminal, plain log lines otherwise (CI, pods)."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger("kubetune.trainer")


class Progress:
    def __init__(self, total_steps: int, start_step: int, enabled: bool) -> None:
        self.total = total_steps
        self.start_step = start_step
        self.started = time.monotonic()
        self.enabled = enabled
        self.every = max(1, total_steps // 20)
        self._bar: Any = None
        if enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task("train", total=total_steps, completed=start_step, info="")

    def eta_seconds(self, step: int) -> float | None:
        done = step - self.start_step
        if done <= 0:
            return None
        return (time.monotonic() - self.started) / done * (self.total - step)

    def update(self, step: int, epoch: float, loss: float, samples_per_second: float) -> None:
        if not self.enabled:
            return
        info = f"loss {loss:.4f}  {samples_per_second:.1f} samples/s  epoch {epoch:.2f}"
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)
        elif step % self.every == 0 or step == self.total:
            eta = self.eta_seconds(step)
            log.info("step %d/%d  %s  eta %s", step, self.total, info, f"{eta:.0f}s" if eta is not None else "?")

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.console.print(text)
        else:
            log.info(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

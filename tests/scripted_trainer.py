"""The test's side of the scripted trainer image (tests/scripted_image/bin/kubetune): what each pod does.

A role names one pod: `<job>-<attempt>-<index>` for a trainer (its hostname), `<job>-preflight` for the
pre-flight. The test writes what the role reports and how it ends; the pod reads it while it runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kubetune import contract


class ScriptedTrainer:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _write(self, role: str, kind: str, value: Any) -> None:
        path = self.folder / f"{role}.{kind}.json"
        partial = path.with_suffix(".part")
        partial.write_text(json.dumps(value))
        partial.replace(path)  # the pod never reads half a file

    def started(self, role: str) -> dict[str, Any] | None:
        """The pod's argv, environment and working directory once it has started, else None."""
        path = self.folder / f"{role}.started"
        return json.loads(path.read_text()) if path.exists() else None

    def ended(self, role: str) -> bool:
        return (self.folder / f"{role}.ended").exists()

    def report(self, role: str, step: int, total: int, loss: float | None = None, eval_loss: float | None = None,
               epoch: float | None = None, **evals: float) -> None:
        values: dict[str, Any] = {contract.METRIC_STEP: step, contract.METRIC_TOTAL_STEPS: total,
                                  contract.METRIC_PROGRESS: step / total, contract.METRIC_ETA: (total - step) * 2.0,
                                  contract.METRIC_EPOCH: step / 10 if epoch is None else epoch}
        if loss is not None:
            values[contract.METRIC_TRAIN_LOSS] = loss
        if eval_loss is not None:
            values[contract.METRIC_EVAL_LOSS] = eval_loss
        if evals:
            values[contract.METRIC_EVAL] = evals
        self._write(role, "metrics", values)

    def raw_metrics(self, role: str, values: dict[str, Any]) -> None:
        self._write(role, "metrics", values)

    def exit(self, role: str, code: int, message: dict[str, Any] | str | None = None, log: str | None = None,
             signal: int | None = None) -> None:
        """End the pod with `code` (or killed by `signal`); `message` goes to its termination log, `log` to its
        output first."""
        self._write(role, "exit", {"code": code, "message": message, "log": log, "signal": signal})

    def on_sigterm(self, role: str, code: int | None, message: dict[str, Any] | str | None = None) -> None:
        """How the pod answers SIGTERM: exit `code` (after writing `message`), or with None keep running."""
        self._write(role, "sigterm", {"code": code, "message": message})

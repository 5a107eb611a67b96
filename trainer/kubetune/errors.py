"""Error types that decide the exit code: bad input (2, never retried), not improved (3, never retried),
anything else (1)."""


class UserError(Exception):
    """Bad input: spec, data, model folder or credentials. Printed without a traceback, exit 2."""


class PreemptedError(Exception):
    """The trainer stopped after SIGTERM (exit 75, restart it) or Ctrl-C (exit 130) and can be resumed."""

    def __init__(self, message: str, exit_code: int = 75) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class NotImprovedError(Exception):
    """spec.evaluation.minImprovement was not met: nothing published, exit 3, never retried (same data, same result)."""

    def __init__(self, message: str, summary: dict[str, object]) -> None:
        super().__init__(message)
        self.summary = summary  # the run's metrics (quality, test, baseTest) and where the report went

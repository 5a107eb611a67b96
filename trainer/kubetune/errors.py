"""Error types that decide the exit code: bad input (2, never retried) vs. anything else (1)."""


class UserError(Exception):
    """Bad input: spec, data, model folder or credentials. Printed without a traceback, exit 2."""


class PreemptedError(Exception):
    """The trainer stopped after SIGTERM (exit 75, restart it) or Ctrl-C (exit 130) and can be resumed."""

    def __init__(self, message: str, exit_code: int = 75) -> None:
        super().__init__(message)
        self.exit_code = exit_code

"""Error types that decide the exit code: bad input (2, never retried) vs. anything else (1)."""


class UserError(Exception):
    """Bad input: spec, data, model folder or credentials. Printed without a traceback, exit 2."""


class PreemptedError(Exception):
    """The trainer saved a checkpoint after SIGTERM and should be restarted (exit EXIT_RETRY)."""

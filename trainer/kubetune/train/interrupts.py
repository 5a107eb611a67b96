"""SIGTERM and Ctrl-C (SIGINT) become one request to stop, bounded by KUBETUNE_GRACE_SECONDS.

The training loop checkpoints at the next update boundary and exits 75 (SIGTERM) or 130 (SIGINT).
A watchdog gives up when that takes longer than the grace period, so a stuck rank or a slow
upload never outlives the budget the kubelet (or the user) gave us.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from kubetune import contract

SIGNALS = (signal.SIGTERM, signal.SIGINT)
WORKER_SHARE = 0.8    # workers give up at 80% of the grace period: time left to report and exit
LAUNCHER_SHARE = 0.9  # torchrun kills workers at 90%: before the kubelet's SIGKILL at 100%

_state: dict[str, float | int | None] = {"signum": None, "at": None}


def grace_seconds() -> float:
    value = os.environ.get(contract.ENV_GRACE_SECONDS, str(contract.DEFAULT_GRACE_SECONDS))
    try:
        return max(1.0, float(value))
    except ValueError:
        return float(contract.DEFAULT_GRACE_SECONDS)


def exit_code(signum: int) -> int:
    return contract.EXIT_INTERRUPTED if signum == signal.SIGINT else contract.EXIT_RETRY


def requested() -> int | None:
    """The first stop signal received since install(), or None."""
    signum = _state["signum"]
    return None if signum is None else int(signum)


def install(give_up: Callable[[int], None]) -> dict[str, Any]:
    """Handle SIGTERM/SIGINT in this (main) thread; give_up(signum) runs when the grace period is spent.

    A Python handler runs only when the main thread runs Python, never while it waits in a collective
    for a stuck rank; the wakeup fd is written by the C-level handler at once, so a watcher thread
    starts the grace timer whatever the main thread is doing. Returns what restore() puts back.
    """
    _state.update(signum=None, at=None)
    lock = threading.Lock()
    previous: dict[str, Any] = {}

    def record(signum: int) -> None:
        with lock:
            if _state["signum"] is not None:
                return  # a repeat (torchrun passes on what the terminal already sent) changes nothing
            _state.update(signum=signum, at=time.monotonic())
        timer = threading.Timer(grace_seconds() * WORKER_SHARE, give_up, args=(signum,))
        timer.daemon = True
        timer.start()
        previous["timer"] = timer

    def watch(fd: int) -> None:
        while data := os.read(fd, 1):  # empty: restore() closed the write end
            if data[0] in SIGNALS:
                record(data[0])
        os.close(fd)

    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)  # set_wakeup_fd requires it
    threading.Thread(target=watch, args=(read_end,), daemon=True, name="kubetune-signals").start()
    previous.update(wakeup=signal.set_wakeup_fd(write_end), pipe=write_end)
    for s in SIGNALS:
        previous[s.name] = signal.signal(s, lambda signum, frame: record(signum))
    return previous


def restore(previous: dict[str, Any]) -> None:
    """Put back what install() replaced; a stop that finished in time cancels the give-up timer."""
    if not previous:
        return
    if "timer" in previous:
        previous["timer"].cancel()
    for s in SIGNALS:
        old = previous[s.name]
        signal.signal(s, old if old is not None else signal.SIG_DFL)
    signal.set_wakeup_fd(previous["wakeup"])
    os.close(previous["pipe"])


def stop_message(signum: int, step: int, checkpoint_uri: str | None) -> str:
    """The one line a user (or the operator) sees after a clean stop."""
    if signum == signal.SIGINT:
        return f"interrupted at step {step}; checkpoint saved; run the same command to resume"
    return f"SIGTERM: saved {checkpoint_uri} at step {step}; restart to resume"


def give_up_message(signum: int) -> str:
    name = signal.Signals(signum).name
    return (f"{name}: no checkpoint within {WORKER_SHARE:.0%} of the {grace_seconds():.0f} s grace period "
            f"(${contract.ENV_GRACE_SECONDS}); the next run resumes from the last complete checkpoint")

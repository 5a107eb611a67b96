"""The trainer's Prometheus exporter (`:9400/metrics`, env KUBETUNE_METRICS_PORT; 0 turns it off).

Rank 0 exports the job-level series; every rank exports its own per-rank series (step time, memory) on
`port + local_rank`. Updates are O(1) gauge sets and counter increments: nothing here holds a lock across a
step. Imports without torch: the operator tests run it as a stand-in trainer pod.

The endpoint itself is a small child process (kubetune.telemetry_server) fed a snapshot every PUSH_SECONDS:
a thread here would starve whenever the trainer holds the GIL in a C call. The recipe calls the methods of
the TrainerMetrics that `start()` returns; storage calls the module-level hooks (no-ops before `start()`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kubetune import contract, procmem
from kubetune.errors import UserError

log = logging.getLogger("kubetune.trainer")

STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CHECKPOINT_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
PUSH_SECONDS = 1.0  # how stale a served snapshot may be; one push costs a few ms of GIL time
TEST_PREFIX = "test_"  # test-split results share kubetune_eval_metric, as metric="test_<name>"


def _peak_at_least_current() -> float:
    return float(max(procmem.peak_rss_bytes(), procmem.rss_bytes()))  # sampled apart: peak must not read lower


class TrainerMetrics:
    """Every trainer series, labelled job/namespace (and rank on the per-rank ones)."""

    def __init__(self, job: str, namespace: str, rank: int = 0, main: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # Job-level series live in a registry that is only served on rank 0; other ranks update a private one.
        shared = self.registry if main else CollectorRegistry()
        names = ["job", "namespace"]
        self.labels = {"job": job, "namespace": namespace}
        self.rank = str(rank)

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, [*names, *extra], registry=shared)

        def counter(name: str, doc: str) -> Any:
            # prometheus_client appends `_total` itself; the contract names carry it already.
            return Counter(name.removesuffix("_total"), doc, names, registry=shared).labels(**self.labels)

        c = contract
        self.train_loss = gauge(c.METRIC_TRAIN_LOSS, "Training loss of the last optimizer step, mean over ranks.")
        self.eval_loss = gauge(c.METRIC_EVAL_LOSS, "Validation loss of the last evaluation.")
        self.eval_metric = gauge(c.METRIC_EVAL, "Last validation metric by name; test-split results as "
                                 "metric=test_<name>.", ("metric",))
        self.learning_rate = gauge(c.METRIC_LEARNING_RATE, "Learning rate after the last optimizer step.")
        self.step = gauge(c.METRIC_STEP, "Optimizer updates done.")
        self.total_steps = gauge(c.METRIC_TOTAL_STEPS, "Optimizer updates planned for the whole run.")
        self.epoch = gauge(c.METRIC_EPOCH, "Epochs done, fractional.")
        self.samples = counter(c.METRIC_SAMPLES, "Training examples processed, all ranks.")
        self.tokens = counter(c.METRIC_TOKENS, "Training tokens processed (rank 0's count times the world "
                              "size: ranks get equal length-grouped shards).")
        self.progress = gauge(c.METRIC_PROGRESS, "step / total_steps.")
        self.eta = gauge(c.METRIC_ETA, "Seconds left at this process's average step rate.")
        self.downloaded = counter(c.METRIC_DOWNLOADED, "Bytes fetched from object storage or local storage.")
        self.uploaded = counter(c.METRIC_UPLOADED, "Bytes written to object storage or local storage.")
        self.checkpoint_seconds = Histogram(
            c.METRIC_CHECKPOINT_SECONDS, "Time to save and publish one checkpoint.", names,
            buckets=CHECKPOINT_BUCKETS, registry=shared).labels(**self.labels)
        self.last_checkpoint_step = gauge(c.METRIC_LAST_CHECKPOINT_STEP, "Step of the newest complete checkpoint.")
        self.resumes = counter(c.METRIC_RESUMES, "Times this job resumed from a checkpoint.")
        self.state = gauge(c.METRIC_STATE, "1 for the trainer's current state, 0 for the others.", ("state",))
        # Per-rank series: every rank serves its own.
        per_rank = [*names, "rank"]
        self.step_seconds = Histogram(
            c.METRIC_STEP_SECONDS, "Wall time of one optimizer step on this rank.", per_rank,
            buckets=STEP_BUCKETS, registry=self.registry).labels(**self.labels, rank=self.rank)
        self.memory = Gauge(c.METRIC_MEMORY, "Device memory in use: CUDA allocated, else process RSS.", per_rank,
                            registry=self.registry).labels(**self.labels, rank=self.rank)
        self.memory_peak = Gauge(c.METRIC_MEMORY_PEAK, "Peak device memory: CUDA max allocated, else peak RSS.",
                                 per_rank, registry=self.registry).labels(**self.labels, rank=self.rank)
        self.set_memory_source(lambda: float(procmem.rss_bytes()), _peak_at_least_current)
        # Losses and the ETA have no series until they have a value: a 0 would read as a perfect loss (and a
        # finished run) on a dashboard, in `kubectl get ftj` and to the loss alerts. They bind at their first set.
        for name in ("learning_rate", "step", "total_steps", "epoch", "progress", "last_checkpoint_step"):
            setattr(self, name, getattr(self, name).labels(**self.labels))
        self.resumes.inc(0)
        self.first_step: tuple[int, float] | None = None
        self.on_state_change: Callable[[], None] = lambda: None  # the endpoint pushes a snapshot at once
        self.set_state("setup")

    def set_memory_source(self, current: Callable[[], float], peak: Callable[[], float]) -> None:
        """Read at scrape time: CUDA counters when the recipe has a GPU, this process's RSS otherwise."""
        self.memory.set_function(current)
        self.memory_peak.set_function(peak)

    def set_state(self, state: str) -> None:
        for name in contract.TRAINER_STATES:
            self.state.labels(**self.labels, state=name).set(1.0 if name == state else 0.0)
        # A transition is served now, not up to PUSH_SECONDS later: a short phase (a quick evaluation, a few
        # fast steps) would otherwise never show, and "failed" should show before the process is gone.
        self.on_state_change()

    def set_total_steps(self, total: int, step: int) -> None:
        self.total_steps.set(total)
        self.record_progress(step, total)

    def record_progress(self, step: int, total: int) -> None:
        self.step.set(step)
        self.progress.set(step / total if total else 0.0)

    def record_step(self, *, step: int, total: int, epoch: float, loss: float, learning_rate: float,
                    samples: int, tokens: int, seconds: float) -> None:
        """One optimizer update; non-finite losses are exported as they are (NaN, +Inf)."""
        self.train_loss.labels(**self.labels).set(loss)
        self.learning_rate.set(learning_rate)
        self.epoch.set(epoch)
        self.samples.inc(samples)
        self.tokens.inc(tokens)
        self.step_seconds.observe(seconds)
        self.record_progress(step, total)
        now = time.monotonic()
        if self.first_step is None:  # measured from the start of this process's first step (resumes included)
            self.first_step = (step - 1, now - seconds)
        done, since = step - self.first_step[0], now - self.first_step[1]
        self.eta.labels(**self.labels).set(since / max(done, 1) * max(total - step, 0))

    def record_evaluation(self, metrics: Mapping[str, Any], prefix: str) -> None:
        """Validation rows ('eval_loss', 'eval_accuracy', ...) or test results ('loss', 'accuracy', ...)."""
        for key, value in metrics.items():
            if not isinstance(value, int | float) or isinstance(value, bool) or key == "examples":
                continue
            name = key.removeprefix("eval_")
            if prefix == "eval" and name == "loss":
                self.eval_loss.labels(**self.labels).set(value)
            elif prefix == "eval":
                self.eval_metric.labels(**self.labels, metric=name).set(value)
            else:  # test results, or a training step's metrics besides its loss (dpo: train_reward_accuracy)
                label = TEST_PREFIX + name if prefix == "test" else f"{prefix}_{name}"
                self.eval_metric.labels(**self.labels, metric=label).set(value)

    def record_checkpoint(self, step: int, seconds: float) -> None:
        self.checkpoint_seconds.observe(seconds)
        self.last_checkpoint_step.set(step)


class _Exporter:
    """Serves one process's metrics from a child process (kubetune.telemetry_server), pushing a snapshot often.

    Scrapes never wait for this process's GIL; a snapshot is at most PUSH_SECONDS old while this process runs
    Python, older only while it is stuck in a C call (exactly when a thread-based server would not answer).
    """

    def __init__(self, metrics: TrainerMetrics, linger: float) -> None:
        self.metrics, self.linger = metrics, linger
        self.url = ""
        self.process: subprocess.Popen[bytes] | None = None
        self._write = threading.Lock()  # the pusher thread and flush() share the pipe; held for one write only
        self._stopped = threading.Event()

    def serve(self, port: int, addr: str) -> str | None:
        """Start the server process; None when it serves, else why it could not."""
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kubetune.telemetry_server", str(port), addr],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=False)
        assert self.process.stdout is not None
        reply = self.process.stdout.readline().decode().strip()
        if reply != "ok":
            self.process.wait()
            self.process = None
            return reply.removeprefix("error ") or "the metrics server did not start"
        self.flush()
        self.metrics.on_state_change = self.flush
        threading.Thread(target=self._push_loop, name="kubetune-metrics-push", daemon=True).start()
        return None

    def flush(self) -> None:
        """Push the current values now (tests and the final state; the push loop does it every PUSH_SECONDS)."""
        if self.process is None or self.process.stdin is None:
            return
        data = generate_latest(self.metrics.registry)
        with self._write:
            try:
                self.process.stdin.write(b"%d\n" % len(data) + data)
                self.process.stdin.flush()
            except (BrokenPipeError, ValueError, OSError):
                self._stopped.set()  # the server process is gone; training goes on without it

    def _push_loop(self) -> None:
        while not self._stopped.wait(PUSH_SECONDS):
            self.flush()

    def close(self, linger: bool) -> None:
        if self.process is None:
            return
        self.flush()
        if linger and self.linger > 0:
            time.sleep(self.linger)
        self._stopped.set()
        with self._write, contextlib.suppress(OSError, ValueError):
            self.process.stdin.close()  # type: ignore[union-attr]
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


_current: _Exporter | None = None


def _port_setting(env: Mapping[str, str]) -> tuple[int, bool]:
    """(base port, whether the user asked for it explicitly)."""
    raw = env.get(contract.ENV_METRICS_PORT, "").strip()
    if not raw:
        return contract.DEFAULT_METRICS_PORT, False
    try:
        port = int(raw)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise UserError(f"{contract.ENV_METRICS_PORT}={raw!r}: expected a port number 0-65535 (0 turns metrics off)")
    return port, True


def start(job: str, namespace: str | None = None, *, rank: int = 0, local_rank: int = 0,
          env: Mapping[str, str] | None = None, addr: str = "0.0.0.0") -> TrainerMetrics:
    """Create this process's metrics and serve them on port + local_rank (unless the port is 0).

    A port in use is a warning (the run goes on without the endpoint), or UserError (exit 2) when the port
    came from KUBETUNE_METRICS_PORT. Job and namespace come from the contract's env vars when set.
    """
    global _current
    env = os.environ if env is None else env
    stop()
    base, explicit = _port_setting(env)
    linger = _linger_seconds(env)
    job = env.get(contract.ENV_JOB_NAME) or job
    namespace = env.get(contract.ENV_NAMESPACE) or namespace or "local"
    exporter = _Exporter(TrainerMetrics(job, namespace, rank=rank, main=rank == 0), linger)
    if base:
        port = base + local_rank
        failure = exporter.serve(port, addr)
        if failure is not None:
            message = f"metrics port {port} is not available ({failure})"
            if explicit:
                raise UserError(f"{contract.ENV_METRICS_PORT}={base}: {message}")
            log.warning("%s: running without the metrics endpoint; set %s to another port (0 = off)",
                        message, contract.ENV_METRICS_PORT)
        else:
            exporter.url = f"http://{'127.0.0.1' if addr == '0.0.0.0' else addr}:{port}/metrics"
            if rank == 0:
                log.info("metrics at %s", exporter.url + (" (other ranks on the next ports)" if local_rank == 0
                                                          and int(env.get("LOCAL_WORLD_SIZE", "1")) > 1 else ""))
    _current = exporter
    return exporter.metrics


def stop(linger: bool = False) -> None:
    """Shut the endpoint down; with linger, after KUBETUNE_METRICS_LINGER_SECONDS so a last scrape sees the end."""
    global _current
    exporter, _current = _current, None
    if exporter is not None:
        exporter.close(linger)


def flush() -> None:
    """Serve the values set so far right away (otherwise within PUSH_SECONDS)."""
    if _current is not None:
        _current.flush()


def current() -> TrainerMetrics | None:
    return _current.metrics if _current is not None else None


def endpoint() -> str:
    """The URL this process serves, '' when off."""
    return _current.url if _current is not None else ""


def _linger_seconds(env: Mapping[str, str]) -> float:
    raw = env.get(contract.ENV_METRICS_LINGER, "").strip() or "0"
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < 3600:
        raise UserError(f"{contract.ENV_METRICS_LINGER}={raw!r}: expected seconds, 0 to 3600")
    return seconds


# ---- hooks for code that has no handle on the recipe (storage); no-ops until start() --------------------------
def add_downloaded(size: int) -> None:
    if _current is not None:
        _current.metrics.downloaded.inc(size)


def add_uploaded(size: int) -> None:
    if _current is not None:
        _current.metrics.uploaded.inc(size)


def set_state(state: str) -> None:
    if _current is not None:
        _current.metrics.set_state(state)

"""Operator process state: settings, the API client, what the watches say (state.py), and the work queue.

A FineTuneJob gets a pass when something it owns changes (its Jobs and Pods are watched by informers, the job
itself by kopf), when rank 0's scraped progress moves (scraper.py), or when a pass asked to be woken (a TTL,
a deadline, the stall window, the cost figure's next update). Passes read the watched state, not the API, so
an idle running job costs no API request but its scrape; a slow resync revisits every unfinished job.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import kopf

from kubetune import contract
from kubetune_operator import metrics, reconcile, settings
from kubetune_operator.informer import Informer
from kubetune_operator.kube import Kube, load_client
from kubetune_operator.leader import LeaderElector
from kubetune_operator.scraper import Scraper
from kubetune_operator.state import Key, State, strip_ftj, strip_job, strip_pod

log = logging.getLogger("kubetune.operator")
WORKERS = 8  # concurrent passes: each waits on the API server most of its time; bounded, one connection each
MANAGED = f"{contract.LABEL_APP_MANAGED_BY}={contract.MANAGED_BY}"


class Runtime:
    def __init__(self) -> None:
        self.settings = settings.load()
        self.kube: Kube | None = None
        self.state = State()
        self.active: set[Key] = set()  # jobs still followed (unfinished, a TTL to run, a service to follow)
        self.lock = threading.Condition()
        self.queue: list[Key] = []  # keys waiting for a pass, each at most once
        self.queued: set[Key] = set()
        self.running: set[Key] = set()  # keys in a pass now (a change meanwhile queues them again after)
        self.wakes: list[tuple[float, Key]] = []  # (monotonic time, key): passes asked for later
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.informers: list[Informer] = []
        self.scraper: Scraper | None = None
        self.leading = threading.Event()  # only the leader runs passes; standbys keep their state warm
        self.elector: LeaderElector | None = None

    # ---- lifecycle ------------------------------------------------------------------------------------
    def start(self, kopf_settings: kopf.OperatorSettings) -> None:
        kopf_settings.posting.enabled = True
        kopf_settings.posting.level = logging.WARNING  # our own Events say what happened; no per-handler chatter
        kopf_settings.peering.standalone = True
        kopf_settings.watching.server_timeout = 300
        metrics.serve(self.settings.metrics_port)
        self.launch(Kube(load_client()))
        log.info("kubetune operator: image %s, resync %ss, namespaces %s", self.settings.trainer_image,
                 self.settings.resync_seconds, ",".join(self.settings.namespaces) or "(all)")

    def launch(self, kube: Kube) -> None:
        """Watches, scraper, workers and the timer, without kopf (FineTuneJob events come through on_event)."""
        self.kube = kube
        self.stop.clear()
        namespaces = self.settings.namespaces
        batch, core = kube.batch, kube.core
        self.informers = [
            Informer("jobs", batch.list_namespaced_job if namespaces else batch.list_job_for_all_namespaces,
                     self._child("Job"), strip_job, MANAGED, namespaces).start(),
            Informer("pods", core.list_namespaced_pod if namespaces else core.list_pod_for_all_namespaces,
                     self._child("Pod"), strip_pod, MANAGED, namespaces).start(),
        ]
        self.scraper = Scraper(self.state, self.enqueue, self.settings.refresh_seconds).start()
        if self.settings.leader_election:
            self.elector = LeaderElector(kube.client, self.settings.lease_namespace, self.settings.lease_name,
                                         self.settings.identity, self._lead).start()
        else:
            self.leading.set()
        for index in range(WORKERS):
            self._thread(f"kubetune-pass-{index}", self._work)
        self._thread("kubetune-timer", self._timer)

    def _lead(self, leading: bool) -> None:
        """Leader now: every known job gets a pass (what changed while standing by). Standing by: no passes."""
        if leading:
            self.leading.set()
            for key in self.state.known():
                self.enqueue(key)
        else:
            self.leading.clear()

    def shutdown(self) -> None:
        if self.elector is not None:
            self.elector.stop()
        self.stop.set()
        with self.lock:
            self.lock.notify_all()
        for informer in self.informers:
            informer.stop()
        if self.scraper is not None:
            self.scraper.stop()
        for thread in self.threads:
            thread.join(timeout=10)

    def _thread(self, name: str, target: Any) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self.threads.append(thread)

    # ---- what changes -----------------------------------------------------------------------------------
    def on_event(self, event: Any, body: Any) -> None:
        """kopf's FineTuneJob events: new jobs and spec edits get a pass at once; status echoes of our own
        writes do not (the pass that wrote them already knows)."""
        obj = strip_ftj(dict(body))
        key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
        if event.get("type") == "DELETED":
            self.state.drop_ftj(key)
            reconcile.forget(key)
            with self.lock:
                self.active.discard(key)
            if self.scraper is not None:
                self.scraper.follow(key, None)
            return
        before = self.state.ftjs.get(key)
        self.state.put_ftj(obj)
        status = obj.get("status") or {}
        if before is None or obj["metadata"].get("deletionTimestamp") or not status.get("phase") or \
                obj["metadata"].get("generation") != status.get("observedGeneration"):
            self.enqueue(key)

    def _child(self, kind: str) -> Any:
        def handle(event: str, obj: dict[str, Any]) -> None:
            key = self.state.child(kind, event, obj)
            if key is not None and key in self.state.ftjs:
                self.enqueue(key)
        return handle

    def enqueue(self, key: Key) -> None:
        with self.lock:
            if key not in self.queued:
                self.queued.add(key)
                self.queue.append(key)
                self.lock.notify()

    def wake_at(self, key: Key, when: datetime) -> None:
        delay = max(1.0, (when - datetime.now(UTC)).total_seconds())  # a due time already past: soon, not a spin
        with self.lock:
            heapq.heappush(self.wakes, (time.monotonic() + delay, key))
            self.lock.notify_all()

    # ---- passes ---------------------------------------------------------------------------------------
    def _work(self) -> None:
        while not self.stop.is_set():
            if not self.leading.wait(1.0):
                continue
            with self.lock:
                key = next((k for k in self.queue if k not in self.running), None)
                if key is None:
                    self.lock.wait(1.0)
                    continue
                self.queue.remove(key)
                self.queued.discard(key)
                self.running.add(key)
            try:
                self._reconcile(key)
            finally:
                with self.lock:
                    self.running.discard(key)
                    if key in self.queued:
                        self.lock.notify()

    def _reconcile(self, key: Key) -> None:
        """One pass from the watched state; a pass that raised is tried again after the refresh period."""
        assert self.kube is not None, "launch() first"
        view = self.state.view(key)
        if view is None:
            return
        try:
            done = reconcile.reconcile(self.kube, self.settings, *key, view=view)
        except Exception:  # one job's trouble must not stall the others
            log.exception("reconcile of %s/%s failed", *key)
            with self.lock:
                self.active.add(key)
            self.wake_at(key, datetime.now(UTC) + timedelta(seconds=self.settings.refresh_seconds))
            return
        if done.ftj is not None:
            self.state.put_ftj(strip_ftj(done.ftj))
        for created in done.created:
            if created.get("kind") in ("Job", "Pod"):
                self.state.child(created["kind"], "ADDED", (strip_job if created["kind"] == "Job" else strip_pod)(
                    created))
        if self.scraper is not None:
            self.scraper.follow(key, done.scrape)
        with self.lock:
            if done.follow:
                self.active.add(key)
            else:
                self.active.discard(key)
        if done.wake is not None:
            self.wake_at(key, done.wake)

    def _timer(self) -> None:
        """Due wakes into the queue; a slow resync of every followed job; the per-phase job counts."""
        next_resync = next_counts = time.monotonic()
        while not self.stop.is_set():
            now = time.monotonic()
            with self.lock:
                due = []
                while self.wakes and self.wakes[0][0] <= now:
                    due.append(heapq.heappop(self.wakes)[1])
                resync = sorted(self.active) if now >= next_resync else []
                if now >= next_resync:  # due even with nothing followed: else the first job followed is resynced
                    next_resync = now + self.settings.resync_seconds
                wait = min([w for w, _ in self.wakes[:1]] + [next_resync, next_counts]) - now
            for key in {*due, *resync}:
                self.enqueue(key)
            if now >= next_counts:
                metrics.set_job_counts(reconcile.job_counts())
                next_counts = now + self.settings.refresh_seconds
            with self.lock:
                self.lock.wait(max(0.05, min(wait, 1.0)))

    def healthy(self) -> dict[str, Any]:
        if not self.threads or not all(t.is_alive() for t in self.threads):
            raise kopf.PermanentError("a worker of the operator is not running")
        return {"jobs": len(self.state.ftjs), "followed": len(self.active), "leading": self.leading.is_set()}


RUNTIME = Runtime()

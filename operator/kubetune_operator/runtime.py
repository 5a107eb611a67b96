"""Operator process state: settings, the API client, the set of known jobs and the refresh loop."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf

from kubetune_operator import metrics, reconcile, settings
from kubetune_operator.kube import Kube, load_client

log = logging.getLogger("kubetune.operator")
REFRESH_WORKERS = 4  # concurrent passes of the refresh loop: bounded so 500 jobs do not open 500 connections


class Runtime:
    def __init__(self) -> None:
        self.settings = settings.load()
        self.kube: Kube | None = None
        self.known: set[tuple[str, str]] = set()  # every FineTuneJob seen
        self.active: set[tuple[str, str]] = set()  # those the refresh loop still visits
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self, kopf_settings: kopf.OperatorSettings) -> None:
        kopf_settings.posting.enabled = True
        kopf_settings.posting.level = logging.WARNING  # our own Events say what happened; no per-handler chatter
        kopf_settings.peering.standalone = not self.settings.peering
        kopf_settings.watching.server_timeout = 300
        self.kube = Kube(load_client())
        metrics.serve(self.settings.metrics_port)
        self.stop.clear()
        self.thread = threading.Thread(target=self._refresh_loop, name="kubetune-refresh", daemon=True)
        self.thread.start()
        log.info("kubetune operator: image %s, refresh %ss, namespaces %s", self.settings.trainer_image,
                 self.settings.refresh_seconds, ",".join(self.settings.namespaces) or "(all)")

    def shutdown(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=10)

    def on_event(self, event: Any, body: Any) -> None:
        """Watch events: new jobs and spec edits reconcile at once; status echoes wait for the refresh loop."""
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        if event.get("type") == "DELETED":
            with self.lock:
                self.known.discard(key)
                self.active.discard(key)
            return
        with self.lock:
            new = key not in self.known
            self.known.add(key)
        status = body.get("status") or {}
        if new or meta.get("generation") != status.get("observedGeneration") or not status.get("phase"):
            self._reconcile(key)

    def _reconcile(self, key: tuple[str, str]) -> None:
        assert self.kube is not None, "start() first"
        try:
            again = reconcile.reconcile(self.kube, self.settings, *key)
        except Exception:  # one job's trouble must not stall the others; the next pass retries
            log.exception("reconcile of %s/%s failed", *key)
            again = True
        with self.lock:
            if again and key in self.known:
                self.active.add(key)
            else:
                self.active.discard(key)

    def _refresh_loop(self) -> None:
        with ThreadPoolExecutor(REFRESH_WORKERS, thread_name_prefix="kubetune-pass") as pool:
            while not self.stop.wait(self.settings.refresh_seconds):
                with self.lock:
                    keys = sorted(self.active)
                list(pool.map(self._reconcile, keys))
                metrics.set_job_counts(reconcile.job_counts())

    def healthy(self) -> dict[str, Any]:
        alive = self.thread is not None and self.thread.is_alive()
        if not alive:
            raise kopf.PermanentError("the refresh loop is not running")
        return {"jobs": len(self.known)}


RUNTIME = Runtime()

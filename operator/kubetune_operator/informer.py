"""A list-and-watch cache of one kind of object, as client-go's informers keep one.

LIST (server-side label selector), then WATCH from the list's resourceVersion with bookmarks; on a 410 Gone or
a dropped connection, LIST again and tell the caller what disappeared meanwhile (a watch that resumes never
says so). Objects are stripped to what the operator reads before they are kept or handed on.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any

from kubernetes.watch.watch import iter_resp_lines

from kubetune_operator import metrics

log = logging.getLogger("kubetune.operator")
Handler = Callable[[str, dict[str, Any]], None]  # ("ADDED" | "MODIFIED" | "DELETED", object)
WATCH_SECONDS = 300  # the server ends each watch after this; the next one resumes from the last version


class Informer:
    def __init__(self, name: str, list_call: Callable[..., Any], handler: Handler,
                 strip: Callable[[dict[str, Any]], dict[str, Any]], label_selector: str = "",
                 namespaces: tuple[str, ...] = ()) -> None:
        """list_call: a cluster-wide list (e.g. list_pod_for_all_namespaces) or, with namespaces, a namespaced
        one (list_namespaced_pod) run once per namespace."""
        self.name, self.list_call, self.handler, self.strip = name, list_call, handler, strip
        self.selector, self.namespaces = label_selector, namespaces
        self.known: dict[str, dict[str, Any]] = {}  # uid -> stripped object
        self.synced = threading.Event()
        self.stop_event = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self) -> Informer:
        for namespace in self.namespaces or (None,):
            thread = threading.Thread(target=self._run, args=(namespace,), name=f"informer-{self.name}",
                                      daemon=True)
            thread.start()
            self.threads.append(thread)
        return self

    def stop(self) -> None:
        self.stop_event.set()

    def _args(self, namespace: str | None) -> tuple[Any, ...]:
        return (namespace,) if namespace is not None else ()

    def _run(self, namespace: str | None) -> None:
        backoff = 0.5
        while not self.stop_event.is_set():
            try:
                version = self._relist(namespace)
                backoff = 0.5
                self._watch(namespace, version)
            except Exception as exc:  # the API server restarting, a network blip: list again after a pause
                metrics.api_error(type(exc).__name__)
                log.warning("%s informer: %s; listing again in %.1fs", self.name, exc, backoff)
                self.stop_event.wait(backoff)
                backoff = min(backoff * 2, 30.0)

    def _relist(self, namespace: str | None) -> str:
        response = self.list_call(*self._args(namespace), label_selector=self.selector, _preload_content=False)
        listed = json.loads(response.data)
        seen = {}
        for raw in listed["items"]:
            obj = self.strip(raw)
            seen[obj["metadata"]["uid"]] = obj
        mine = {uid: o for uid, o in self.known.items() if namespace is None or
                o["metadata"].get("namespace") == namespace}
        for uid, obj in mine.items():
            if uid not in seen:  # deleted while no watch was open
                self.known.pop(uid, None)
                self.handler("DELETED", obj)
        for uid, obj in seen.items():
            if self.known.get(uid) != obj:
                self.known[uid] = obj
                self.handler("MODIFIED" if uid in mine else "ADDED", obj)
        self.synced.set()
        return str(listed["metadata"]["resourceVersion"])

    def _watch(self, namespace: str | None, version: str) -> None:
        while not self.stop_event.is_set():
            response = self.list_call(*self._args(namespace), label_selector=self.selector, watch=True,
                                      resource_version=version, allow_watch_bookmarks=True,
                                      timeout_seconds=WATCH_SECONDS, _preload_content=False)
            try:
                version = self._events(response, version)
            finally:
                response.release_conn()

    def _events(self, response: Any, version: str) -> str:
        """Hand on each event of one watch; returns the last resourceVersion seen."""
        for line in iter_resp_lines(response):
            if self.stop_event.is_set():
                break
            if line:
                event = json.loads(line)
                kind, raw = event["type"], event["object"]
                if kind == "ERROR":
                    raise RuntimeError(f"watch ended: {raw.get('message', raw)}")  # 410 Gone: list again
                version = raw["metadata"]["resourceVersion"]
                if kind == "BOOKMARK":
                    continue
                obj = self.strip(raw)
                uid = obj["metadata"]["uid"]
                if kind == "DELETED":
                    self.known.pop(uid, None)
                else:
                    self.known[uid] = obj
                self.handler(kind, obj)
        return version

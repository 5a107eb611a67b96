"""What the operator knows without asking: FineTuneJobs, the Jobs and Pods it labelled for them, and rank 0's
last scrape — fed by watches (informer.py, kopf), stripped to the fields a pass reads (a few hundred bytes a
pod instead of tens of kilobytes with its spec and managed fields)."""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field
from typing import Any

from kubetune import contract
from kubetune_operator.status import COMPLETION_INDEX_KEY

Key = tuple[str, str]  # (namespace, FineTuneJob name)


def _pick(source: dict[str, Any] | None, names: tuple[str, ...]) -> dict[str, Any]:
    return {k: source[k] for k in names if source and source.get(k) is not None}


def strip_ftj(obj: dict[str, Any]) -> dict[str, Any]:
    meta = _pick(obj.get("metadata"), ("name", "namespace", "uid", "generation", "resourceVersion",
                                       "creationTimestamp", "deletionTimestamp"))
    return {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"), "metadata": meta,
            "spec": copy.deepcopy(obj.get("spec") or {}), "status": copy.deepcopy(obj.get("status") or {})}


def _child_meta(obj: dict[str, Any]) -> dict[str, Any]:
    meta = _pick(obj.get("metadata"), ("name", "namespace", "uid", "labels", "ownerReferences", "creationTimestamp",
                                       "deletionTimestamp"))
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    kept = {k: v for k, v in annotations.items() if k.startswith("kubetune.io/") or k == COMPLETION_INDEX_KEY}
    if kept:
        meta["annotations"] = kept
    return meta


def strip_job(obj: dict[str, Any]) -> dict[str, Any]:
    spec = _pick(obj.get("spec"), ("suspend", "completions", "parallelism", "activeDeadlineSeconds",
                                   "podFailurePolicy"))
    status = _pick(obj.get("status"), ("conditions", "active", "failed", "succeeded", "ready", "terminating",
                                       "startTime", "completionTime"))
    return {"metadata": _child_meta(obj), "spec": copy.deepcopy(spec), "status": copy.deepcopy(status)}


def strip_pod(obj: dict[str, Any]) -> dict[str, Any]:
    status = obj.get("status") or {}
    containers = [_pick(c, ("name", "state", "lastState", "restartCount", "ready"))
                  for c in status.get("containerStatuses") or []]
    kept = _pick(status, ("phase", "conditions", "podIP", "startTime"))
    if containers:
        kept["containerStatuses"] = containers
    return {"metadata": _child_meta(obj), "spec": _pick(obj.get("spec"), ("nodeName",)),
            "status": copy.deepcopy(kept)}


def owner_key(obj: dict[str, Any]) -> Key | None:
    name = (obj["metadata"].get("labels") or {}).get(contract.LABEL_JOB_NAME)
    return (obj["metadata"]["namespace"], name) if name else None


@dataclass
class View:
    """What one pass reads. scraped: rank 0's last (progress, metrics), or None to scrape during the pass."""

    ftj: dict[str, Any]
    jobs: list[dict[str, Any]]
    pods: list[dict[str, Any]]
    scraped: tuple[dict[str, Any], dict[str, float]] | None = None
    created: list[dict[str, Any]] = field(default_factory=list)  # children the pass created (API responses)


class State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ftjs: dict[Key, dict[str, Any]] = {}
        self.jobs: dict[Key, dict[str, dict[str, Any]]] = {}
        self.pods: dict[Key, dict[str, dict[str, Any]]] = {}
        self.scraped: dict[Key, tuple[dict[str, Any], dict[str, float]]] = {}

    def put_ftj(self, obj: dict[str, Any]) -> Key:
        key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
        with self.lock:
            self.ftjs[key] = obj
        return key

    def drop_ftj(self, key: Key) -> None:
        with self.lock:
            self.ftjs.pop(key, None)
            self.scraped.pop(key, None)

    def child(self, kind: str, event: str, obj: dict[str, Any]) -> Key | None:
        """A Job or Pod event: kept under its FineTuneJob's key (which is returned)."""
        key = owner_key(obj)
        if key is None:
            return None
        table = self.jobs if kind == "Job" else self.pods
        with self.lock:
            children = table.setdefault(key, {})
            if event == "DELETED":
                children.pop(obj["metadata"]["uid"], None)
                if not children:
                    table.pop(key, None)
            else:
                children[obj["metadata"]["uid"]] = obj
        return key

    def set_scraped(self, key: Key, found: tuple[dict[str, Any], dict[str, float]]) -> bool:
        """Record a scrape; True when it differs from the last one (a pass has something to write)."""
        with self.lock:
            changed = self.scraped.get(key) != found
            self.scraped[key] = found
        return changed

    def view(self, key: Key) -> View | None:
        with self.lock:
            ftj = self.ftjs.get(key)
            if ftj is None:
                return None
            return View(copy.deepcopy(ftj), [copy.deepcopy(j) for j in self.jobs.get(key, {}).values()],
                        [copy.deepcopy(p) for p in self.pods.get(key, {}).values()], self.scraped.get(key, ({}, {})))

    def known(self) -> list[Key]:
        with self.lock:
            return list(self.ftjs)

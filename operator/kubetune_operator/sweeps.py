"""FineTuneSweeps on a cluster: each trial a FineTuneJob the sweep owns (deleting the sweep deletes them).

A pass reads the sweep and its trials (kopf's watch events, kept here), follows each trial from its FineTuneJob's
status (state, steps, GPU-seconds, the objective's validation values), stops trials the median rule says are
behind by deleting their FineTuneJob (its pods go at once, its GPUs are free), starts trials up to parallelism
with the next parameters Optuna asks for, and writes status once. Nothing lives only in memory: trial names are
<sweep>-<index>, each trial carries its parameters in an annotation, and the study is rebuilt from status.trials
and the owned FineTuneJobs, so a restarted operator adopts what it created and asks the same next question.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
import uuid
from datetime import UTC, datetime
from typing import Any

from kubernetes.client.rest import ApiException

from kubetune import contract
from kubetune.errors import UserError
from kubetune.sweep import search
from kubetune.sweep.report import best_of
from kubetune.sweep.spec import SWEEP_API_VERSION, finite, parse_sweep
from kubetune_operator.kube import MERGE_PATCH, Kube, owner_uids, server_message
from kubetune_operator.status import now_iso, set_condition

log = logging.getLogger("kubetune.operator.sweeps")
Key = tuple[str, str]  # (namespace, sweep name)
RETRY_SECONDS = 10.0  # a pass that raised is tried again after this
RESYNC_SECONDS = 60.0  # unfinished sweeps get a pass this often with nothing new


def _strip(obj: dict[str, Any]) -> dict[str, Any]:
    meta = obj.get("metadata") or {}
    kept = ("name", "namespace", "uid", "generation", "labels", "annotations", "ownerReferences", "deletionTimestamp")
    return {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"),
            "metadata": {k: copy.deepcopy(meta[k]) for k in kept if meta.get(k) is not None},
            "spec": copy.deepcopy(obj.get("spec") or {}), "status": copy.deepcopy(obj.get("status") or {})}


def _camel(metric: str) -> str:
    """eval_accuracy -> evalAccuracy, as FineTuneJob status.metrics names it."""
    head, *rest = metric.split("_")
    return head + "".join(part.capitalize() for part in rest)


class Sweeps:
    """What the watches say about sweeps and their trials, and the one thread that gives sweeps their passes."""

    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.sweeps: dict[Key, dict[str, Any]] = {}
        self.trials: dict[Key, dict[str, dict[str, Any]]] = {}  # sweep key -> trial name -> FineTuneJob
        self.pending: set[Key] = set()
        self.thread: threading.Thread | None = None

    # ---- what changes ---------------------------------------------------------------------------------
    def on_sweep(self, event: Any, body: Any) -> None:
        obj = _strip(dict(body))
        key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
        with self.lock:
            if event.get("type") == "DELETED":
                self.sweeps.pop(key, None)
                self.trials.pop(key, None)
                return
            self.sweeps[key] = obj
        self.enqueue(key)

    def on_trial(self, event: Any, body: Any) -> None:
        obj = _strip(dict(body))
        meta = obj["metadata"]
        key = (meta["namespace"], (meta.get("labels") or {}).get(contract.LABEL_SWEEP, ""))
        with self.lock:
            trials = self.trials.setdefault(key, {})
            if event.get("type") == "DELETED":
                trials.pop(meta["name"], None)
            else:
                trials[meta["name"]] = obj
        self.enqueue(key)

    def enqueue(self, key: Key) -> None:
        with self.lock:
            self.pending.add(key)
            if self.thread is None:
                self.thread = threading.Thread(target=self._work, name="kubetune-sweeps", daemon=True)
                self.thread.start()
            self.lock.notify()

    # ---- passes ---------------------------------------------------------------------------------------
    def _work(self) -> None:
        from kubetune_operator.runtime import RUNTIME  # the operator's client and leadership

        retry: set[Key] = set()
        while not RUNTIME.stop.is_set():
            with self.lock:
                if not self.pending and not self.lock.wait(RESYNC_SECONDS if not retry else RETRY_SECONDS):
                    self.pending |= retry | {k for k, s in self.sweeps.items() if not _finished(s)}
                    retry = set()
                keys, self.pending = self.pending, set()
            if RUNTIME.kube is None or not RUNTIME.leading.is_set():  # standbys keep their state warm
                retry |= keys
                continue
            for key in sorted(keys):
                with self.lock:
                    sweep = copy.deepcopy(self.sweeps.get(key))
                    trials = copy.deepcopy(self.trials.get(key, {}))
                if sweep is None:
                    continue
                try:
                    created = Pass(RUNTIME.kube, sweep, trials).run()
                except Exception:  # one sweep's trouble must not stall the others
                    log.exception("sweep pass of %s/%s failed", *key)
                    retry.add(key)
                    continue
                with self.lock:  # what this pass created, before its watch event comes back
                    for trial in created:
                        self.trials.setdefault(key, {}).setdefault(trial["metadata"]["name"], _strip(trial))


def _finished(sweep: dict[str, Any]) -> bool:
    return (sweep.get("status") or {}).get("phase") in ("Succeeded", "Failed")


class Pass:
    """One pass over one sweep: follow the trials, stop the ones behind, start the next ones, write status."""

    def __init__(self, kube: Kube, sweep: dict[str, Any], trials: dict[str, dict[str, Any]]) -> None:
        self.kube, self.obj = kube, sweep
        self.meta = sweep["metadata"]
        self.namespace, self.name = self.meta["namespace"], self.meta["name"]
        self.old = sweep.get("status") or {}
        self.new = copy.deepcopy(self.old)
        self.now = datetime.now(UTC)
        self.trials = {n: t for n, t in trials.items() if self.meta["uid"] in owner_uids(t)}  # this sweep's only
        self.events: list[tuple[str, str, str]] = []
        self.created: list[dict[str, Any]] = []

    def run(self) -> list[dict[str, Any]]:
        if self.meta.get("deletionTimestamp") or _finished(self.obj):
            return []
        try:
            sweep = parse_sweep(self.obj, f"FineTuneSweep {self.name}")
        except UserError as exc:
            self._end(False, "InvalidSpec", str(exc))
            self._write()
            return []
        self.sweep, self.spec = sweep, sweep.spec
        self._condition("Validated", True, "Valid", "the sweep and every value of its parameters are valid")
        self.new.update(metric=self.spec.objective_metric(), goal=self.spec.goal())
        self.records: list[dict[str, Any]] = copy.deepcopy(self.new.get("trials") or [])
        self._adopt()
        doomed = self._follow()
        if not self._launch():
            return self.created
        self._conclude()
        self._write()
        for name in doomed:  # after status says Pruned: a restart between the two finishes the deletion
            self._delete(name)
        return self.created

    def _adopt(self) -> None:
        """Trials this sweep created whose record a pass never wrote (the operator stopped in between)."""
        known = {r["name"] for r in self.records}
        if any(r["state"] not in search.FINAL_STATES and r["name"] not in self.trials for r in self.records):
            self.trials.update(self._list())  # the watch may not have told us yet: ask before calling one lost
        for name, trial in sorted(self.trials.items(), key=lambda t: int(t[1]["metadata"]["labels"].get(
                contract.LABEL_TRIAL, 0))):
            if name not in known:
                meta = trial["metadata"]
                self.records.append({"name": name, "index": int(meta["labels"][contract.LABEL_TRIAL]),
                                     "parameters": json.loads(meta["annotations"][contract.ANNOTATION_PARAMETERS]),
                                     "state": "Running"})
        self.records.sort(key=lambda r: r["index"])

    def _list(self) -> dict[str, dict[str, Any]]:
        found = self.kube.custom.list_namespaced_custom_object(
            contract.API_GROUP, contract.API_VERSION, self.namespace, contract.PLURAL,
            label_selector=f"{contract.LABEL_SWEEP}={self.name}")["items"]
        return {t["metadata"]["name"]: _strip(t) for t in found if self.meta["uid"] in owner_uids(t)}

    def _follow(self) -> list[str]:
        """Each trial from its FineTuneJob; returns the trials to stop now."""
        metric, every = _camel(self.spec.objective_metric()), self.spec.template.evaluation.every_steps
        doomed = []
        for record in self.records:
            trial = self.trials.get(record["name"])
            if record["state"] in search.FINAL_STATES:
                if record["state"] == "Pruned" and trial and not trial["metadata"].get("deletionTimestamp"):
                    doomed.append(record["name"])  # pruned, but the deletion had not happened
                continue
            if trial is None:
                record.update(state="Failed", message="its FineTuneJob was deleted")
                self.events.append(("Warning", "TrialFailed", f"{record['name']}: its FineTuneJob was deleted"))
                continue
            status = trial["status"]
            step = (status.get("progress") or {}).get("step")
            record["steps"] = step if step is not None else record.get("steps")
            if finite(status.get("gpuSeconds")) is not None:
                record["gpuSeconds"] = status["gpuSeconds"]
            grew = search.observe(record, step, finite((status.get("metrics") or {}).get(metric)), every)
            if status.get("phase") == "Succeeded":
                self._succeeded(record, status)
            elif status.get("phase") == "Failed":
                failure = status.get("failure") or {}
                record.update(state="Failed", message=f"{failure.get('reason')}: {failure.get('message')}"[:300])
                self.events.append(("Warning", "TrialFailed", f"{record['name']}: {record['message']}"))
            elif grew:
                why = search.should_prune(self.spec, self.records, record)
                if why:
                    record.update(state="Pruned", message=why)
                    self.events.append(("Normal", "TrialPruned", f"{record['name']}: {why}"))
                    doomed.append(record["name"])
        return doomed

    def _succeeded(self, record: dict[str, Any], status: dict[str, Any]) -> None:
        values = [v for _, v in record.get("curve") or []]
        tests = {k[4].lower() + k[5:]: v for k, v in (status.get("metrics") or {}).items()
                 if k.startswith("test") and len(k) > 4 and finite(v) is not None}
        record.update(state="Succeeded", objective=search.best_value(self.spec, values),
                      outputUri=status.get("outputUri"), test=tests)
        self.events.append(("Normal", "TrialSucceeded", f"{record['name']}: {self.spec.objective_metric()} "
                            f"{record['objective']}"))

    def _launch(self) -> bool:
        """Start trials up to parallelism; False when the API server refused one (the sweep has failed)."""
        running = sum(r["state"] == "Running" for r in self.records)
        while running < self.spec.parallelism:
            parameters = search.next_parameters(self.spec, self.records)
            if parameters is None:
                return True
            index = len(self.records)
            trial = self._trial(index, parameters)
            try:
                stored = self.kube.custom.create_namespaced_custom_object(
                    contract.API_GROUP, contract.API_VERSION, self.namespace, contract.PLURAL, trial)
            except ApiException as exc:
                listed = self._list() if exc.status == 409 else {}
                if trial["metadata"]["name"] in listed:  # ours, created by a pass whose status write never happened
                    self.trials.update(listed)
                    self._adopt()
                    continue
                self._end(False, "TrialRefused", f"{trial['metadata']['name']}: {server_message(exc)}")
                self._write()
                return False
            self.created.append(stored)
            self.records.append({"name": trial["metadata"]["name"], "index": index, "parameters": parameters,
                                 "state": "Running"})
            self.events.append(("Normal", "TrialCreated", f"{trial['metadata']['name']}: " + ", ".join(
                f"{p}={v}" for p, v in parameters.items())))
            self.new.setdefault("startTime", now_iso(self.now))
            running += 1
        return True

    def _trial(self, index: int, parameters: dict[str, Any]) -> dict[str, Any]:
        name = self.sweep.trial_name(index)
        owner = {"apiVersion": SWEEP_API_VERSION, "kind": contract.SWEEP_KIND, "name": self.name,
                 "uid": self.meta["uid"], "controller": True, "blockOwnerDeletion": True}
        return {"apiVersion": SWEEP_API_VERSION, "kind": contract.KIND,
                "metadata": {"name": name, "namespace": self.namespace, "ownerReferences": [owner],
                             "labels": {contract.LABEL_SWEEP: self.name, contract.LABEL_TRIAL: str(index),
                                        contract.LABEL_APP_NAME: contract.APP_NAME,
                                        contract.LABEL_APP_MANAGED_BY: contract.MANAGED_BY},
                             "annotations": {contract.ANNOTATION_PARAMETERS: json.dumps(parameters)}},
                "spec": self.sweep.trial_spec(index, parameters)}

    def _conclude(self) -> None:
        running = sum(r["state"] == "Running" for r in self.records)
        best = search.best_trial(self.spec, self.records)
        # No nulls: in a merge patch's list they would be values, and the schema refuses them.
        trials = [{k: v for k, v in r.items() if v is not None} for r in self.records]
        self.new.update(trials=trials, trialCount=len(self.records), running=running)
        if best_of(best) is not None:
            self.new["best"] = best_of(best)
        if running or search.next_parameters(self.spec, self.records) is not None:
            self.new["phase"] = "Running" if self.records else "Pending"
            return
        if best is None:
            self._end(False, "NoTrialSucceeded", f"none of the {len(self.records)} trials succeeded")
        else:
            self._end(True, "Completed", f"best {best['name']}: {self.spec.objective_metric()} {best['objective']} "
                      f"({', '.join(f'{p}={v}' for p, v in best['parameters'].items())}); model in "
                      f"{best.get('outputUri')}")

    def _end(self, succeeded: bool, reason: str, message: str) -> None:
        self.new["phase"] = "Succeeded" if succeeded else "Failed"
        self.new["completionTime"] = now_iso(self.now)
        if reason == "InvalidSpec":
            self._condition("Validated", False, reason, message)
        self._condition("Succeeded" if succeeded else "Failed", True, reason, message)
        self.events.append(("Normal" if succeeded else "Warning", self.new["phase"], message))

    def _condition(self, type_: str, value: bool, reason: str, message: str) -> None:
        self.new["conditions"] = set_condition(self.new.get("conditions") or [], type_, value, reason, message,
                                               self.now, self.meta.get("generation"))

    def _write(self) -> None:
        self.new["observedGeneration"] = self.meta.get("generation")
        if self.new != self.old:
            self.kube.custom.patch_namespaced_custom_object_status(
                contract.API_GROUP, contract.API_VERSION, self.namespace, contract.SWEEP_PLURAL, self.name,
                {"status": self.new}, _content_type=MERGE_PATCH)
        for type_, reason, message in self.events:
            self._event(type_, reason, message)

    def _delete(self, name: str) -> None:
        try:
            self.kube.custom.delete_namespaced_custom_object(contract.API_GROUP, contract.API_VERSION,
                                                             self.namespace, contract.PLURAL, name)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def _event(self, type_: str, reason: str, message: str) -> None:
        """A core/v1 Event on the sweep (`kubectl describe fts`): trial started, stopped, pruned; the end."""
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{self.name}.{uuid.uuid4().hex[:16]}", "namespace": self.namespace},
            "involvedObject": {"apiVersion": SWEEP_API_VERSION, "kind": contract.SWEEP_KIND, "name": self.name,
                               "namespace": self.namespace, "uid": self.meta["uid"]},
            "type": type_, "reason": reason, "message": message[:1024],
            "firstTimestamp": now_iso(self.now), "lastTimestamp": now_iso(self.now), "count": 1,
            "source": {"component": contract.MANAGED_BY}, "reportingComponent": contract.MANAGED_BY,
        }
        try:
            self.kube.core.create_namespaced_event(self.namespace, body)
        except ApiException as exc:  # an event lost is not worth failing the pass that wrote status
            log.warning("event %s on sweep %s/%s not written: %s", reason, self.namespace, self.name, exc.status)


SWEEPS = Sweeps()

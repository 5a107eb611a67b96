"""One reconcile pass of one FineTuneJob: read state, create what is missing, derive status, write it once.

Gang restarts: the trainer's torchrun rendezvous is static (a fixed master at index 0), so a replaced pod
cannot rejoin the others. Each attempt is therefore its own Indexed Job `<name>-<attempt>` with
backoffLimit 0 (one failed pod fails the whole gang); when it fails with a retryable cause, this module
creates the next attempt, whose trainers resume from the newest checkpoint. Each Job records why it was
started (annotations), so restarts and the spent budget are derived from the cluster, not remembered.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from kubetune import contract
from kubetune.crd import MAX_NAME_LENGTH
from kubetune.errors import UserError
from kubetune.jobfile import describe
from kubetune_operator import builders, metrics, progress, serving
from kubetune_operator.kube import Kube, owner_uids, server_message
from kubetune_operator.settings import Settings
from kubetune_operator.state import View
from kubetune_operator.status import (
    FINISHED,
    PULL_ERRORS,
    Outcome,
    attempt_outcome,
    condition_true,
    finite,
    job_end_time,
    now_iso,
    parse_time,
    pod_gpu_seconds,
    rank0,
    set_condition,
)

log = logging.getLogger("kubetune.operator")
RESTART_REASON = "kubetune.io/restart-reason"
RESTART_COUNTED = "kubetune.io/restart-counted"
SPEC_HASH = "kubetune.io/spec-hash"
WARNINGS = ("CreateRefused", "FailedCreate", "WaitingForOldChildren")  # Running=False reasons that need a person
_locks: defaultdict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)
_phases: dict[tuple[str, str], tuple[str, str]] = {}  # (namespace, name) -> (namespace, phase), for metrics
_phases_lock = threading.Lock()
_cost_written: dict[tuple[str, str], datetime] = {}  # when each job's gpuSeconds was last written
COST_SECONDS = 60
KEEP_ATTEMPTS = 3  # the newest gang attempts kept (the current one and the ones that failed before it)


def validation_problem(ftj: dict[str, Any]) -> str | None:
    """What `kubetune validate` would say, one line per problem naming the field; None when valid."""
    name = ftj["metadata"]["name"]
    problems = []
    if len(name) > MAX_NAME_LENGTH or not name[:1].isalpha():
        problems.append(f"metadata.name: must start with a letter and be at most {MAX_NAME_LENGTH} characters")
    try:
        job = builders.resolved_job(ftj)
    except ValidationError as exc:
        problems += [describe(e) for e in exc.errors()]
    except UserError as exc:
        problems.append(str(exc))
    else:
        served = job.spec.deploy is not None and job.spec.deploy.kserve is not None
        problem = serving.name_problem(name, ftj["metadata"].get("namespace", "")) if served else None
        problems += [problem] if problem else []
    return "\n".join(problems) or None


def spec_hash(ftj: dict[str, Any]) -> str:
    """Identity of what the pods run: the spec as resolved, without runPolicy.suspend (the one field that may
    change) and without values equal to their defaults — the API server fills in defaults, so a CRD upgrade
    that adds a defaulted field must not make every running job look edited."""
    try:
        spec = builders.resolved_job(ftj).spec.model_dump(mode="json", by_alias=True, exclude_defaults=True)
    except (ValidationError, UserError):  # not valid (any more): compare as written
        spec = json.loads(json.dumps(ftj.get("spec") or {}))
    (spec.get("runPolicy") or {}).pop("suspend", None)
    if spec.get("runPolicy") == {}:  # suspend was its only non-default field
        del spec["runPolicy"]
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _written_hash(ftj: dict[str, Any]) -> str:
    """The hash earlier versions recorded (the spec as written): jobs they started are not 'changed' now."""
    spec = json.loads(json.dumps(ftj.get("spec") or {}))
    (spec.get("runPolicy") or {}).pop("suspend", None)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _component(obj: dict[str, Any]) -> str:
    return str((obj["metadata"].get("labels") or {}).get(contract.LABEL_COMPONENT, "trainer"))


def _attempt(obj: dict[str, Any]) -> int:
    return int((obj["metadata"].get("labels") or {}).get(builders.ATTEMPT_LABEL, "0"))


@dataclass
class Done:
    """What a pass leaves for the runtime to act on."""

    follow: bool  # still followed: unfinished, a TTL to run, or a served model to follow
    wake: datetime | None = None  # a pass is due then even if nothing changes (TTL, deadline, stall, cost)
    scrape: str | None = None  # rank 0's metrics URL while it trains
    ftj: dict[str, Any] | None = None  # the object as the status write returned it
    created: list[dict[str, Any]] = field(default_factory=list)  # children created, as the API returned them


def api_view(kube: Kube, namespace: str, name: str) -> View | None:
    """The same view a watch feeds the runtime, read from the API (tests, and tools without watches)."""
    ftj = kube.get_ftj(namespace, name)
    if ftj is None:
        return None
    return View(ftj, kube.list_jobs(namespace, name), kube.list_pods(namespace, name, component=None))


def reconcile(kube: Kube, settings: Settings, namespace: str, name: str, now: datetime | None = None,
              view: View | None = None) -> Done:
    """One pass, serialised per job. Without a view it reads the job, its Jobs and Pods from the API and scrapes
    rank 0 itself."""
    with _locks[(namespace, name)], metrics.time_reconcile():
        view = view or api_view(kube, namespace, name)
        if view is None or view.ftj["metadata"].get("deletionTimestamp"):
            forget((namespace, name))
            return Done(False)
        done = Pass(kube, settings, view, now or datetime.now(UTC))
        settled = done.run()
        return Done(not settled or builders_ttl(view.ftj) is not None, done.wake(), done.scrape_url, done.written,
                    view.created)


def forget(key: tuple[str, str]) -> None:
    """A deleted job leaves nothing behind: no per-phase count, no cost timer, no lock."""
    with _phases_lock:
        _phases.pop(key, None)
        _cost_written.pop(key, None)
        _locks.pop(key, None)


def job_counts() -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = defaultdict(int)
    with _phases_lock:
        for key in _phases.values():
            counts[key] += 1
    return dict(counts)


class Pass:
    def __init__(self, kube: Kube, settings: Settings, view: View, now: datetime) -> None:
        self.kube, self.settings, self.view, self.now = kube, settings, view, now
        self.ftj = ftj = view.ftj
        self.meta = ftj["metadata"]
        self.namespace, self.name, self.uid = self.meta["namespace"], self.meta["name"], self.meta.get("uid", "")
        self.old: dict[str, Any] = ftj.get("status") or {}
        self.new: dict[str, Any] = json.loads(json.dumps(self.old))
        self.events: list[tuple[str, str, str]] = []
        self.generation = self.meta.get("generation")
        self.written: dict[str, Any] | None = None
        self.ended_at: datetime | None = None  # when the Job that decided the end ended (its own record)
        self.current: dict[str, Any] | None = None  # the Job now running (the last attempt, or the pre-flight)
        self.scrape_url: str | None = None
        self.recheck = False  # something only a later look can tell (FailedCreate events, a served model)

    # ---- the pass -----------------------------------------------------------------------------------
    def run(self) -> bool:
        """True when the job has finished and nothing it made is still being followed (an InferenceService)."""
        if self.old.get("phase") in FINISHED:
            if self._expire():  # a finished job never recreates children, even when they were deleted
                return True
            settled = self._serving()
            self.recheck = not settled
            if self.new.get("inferenceService") != self.old.get("inferenceService"):
                self._write()
            return settled
        problem = validation_problem(self.ftj)
        if problem:
            self._fail("InvalidInput", problem, None, validated=False)
        else:
            self._drive()
        self._write()
        return self.new.get("phase") in FINISHED and not self.new.get("inferenceService")

    def _drive(self) -> None:
        policy = builders.resolved_job(self.ftj).spec.run_policy
        listed = self.view.jobs
        # Only what this object owns: a FineTuneJob deleted and created again under the same name finds the old
        # one's children until the garbage collector has removed them, and must neither adopt nor replace them.
        children = [j for j in listed if self.uid in owner_uids(j)]
        if len(children) < len(listed):
            stale = next(j for j in listed if self.uid not in owner_uids(j))
            self._waiting_for_old_children("Job", stale["metadata"]["name"])
            return
        jobs = {_attempt(j): j for j in children if _component(j) == "trainer"}
        # startTime: when the first child was made (a status write that failed must not move it later).
        born = sorted(j["metadata"]["creationTimestamp"] for j in children if j["metadata"].get("creationTimestamp"))
        self.new.setdefault("startTime", born[0] if born else now_iso(self.now))
        self.current = jobs[max(jobs)] if jobs else next((j for j in children if _component(j) == "preflight"), None)
        if self._deadline_passed(policy.active_deadline_seconds):
            return
        if not jobs:
            preflight = next((j for j in children if _component(j) == "preflight"), None)
            if self.settings.preflight and not self._preflight_passed(preflight):
                return  # GPU pods only after the pre-flight passed
            if not self.settings.preflight:
                self._condition("Validated", True, "Valid", "the spec passed `kubetune validate`")
            job = self._job(0, reason=None, counted=False)
            if job is None:
                return
            jobs[0] = job
        if not condition_true(self.old, "Created"):
            self._condition("Created", True, "ChildrenCreated", f"ConfigMap, Service and Job {self.name}-0 created")
        attempt = max(jobs)
        current = jobs[attempt]
        owned = {j["metadata"]["uid"] for j in jobs.values() if j["metadata"].get("uid")}
        pods = [p for p in self.view.pods if owner_uids(p) & owned and _component(p) == "trainer"]
        by_attempt: defaultdict[int, list[dict[str, Any]]] = defaultdict(list)
        for pod in pods:
            by_attempt[_attempt(pod)].append(pod)
        self._account(jobs, by_attempt)
        self._prune(jobs)
        self._spec_changed(current)
        if policy.queue_name:
            self._queue(current, policy.suspend)
        elif bool((current["spec"] or {}).get("suspend")) != policy.suspend:
            self.kube.patch_job(self.namespace, current["metadata"]["name"], {"spec": {"suspend": policy.suspend}})
            current["spec"]["suspend"] = policy.suspend
        outcome = attempt_outcome(current, by_attempt[attempt], self.now, self.settings.image_pull_seconds)
        self.ended_at = job_end_time(current)
        if outcome.state == "pending" and not by_attempt[attempt] and current["metadata"].get("uid"):
            outcome = self._failed_create(current) or outcome
        self._apply(outcome, attempt, current, by_attempt[attempt], policy.suspend)

    def _deadline_passed(self, deadline: int | None) -> bool:
        """runPolicy.activeDeadlineSeconds counts from startTime on every pass: time queued, in pre-flight or
        Pending counts too (a suspended Job's own deadline timer is stopped)."""
        started = parse_time(self.new.get("startTime"))
        if deadline is None or started is None or (self.now - started).total_seconds() < deadline:
            return False
        self._fail("DeadlineExceeded", f"runPolicy.activeDeadlineSeconds={deadline} passed", None)
        return True

    def _stop_current(self) -> None:
        """No pod may hold a GPU for a job that has ended: its running Job is suspended (the Job controller stops
        the pods; the Job stays for inspection)."""
        job = self.current
        if job is None or not job["metadata"].get("uid") or (job.get("spec") or {}).get("suspend") or any(
                c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
                for c in (job.get("status") or {}).get("conditions") or []):
            return
        self.kube.patch_job(self.namespace, job["metadata"]["name"], {"spec": {"suspend": True}})
        job.setdefault("spec", {})["suspend"] = True

    def _failed_create(self, job: dict[str, Any]) -> Outcome | None:
        """A Job without pods may be one whose pods the API server refuses (quota, Pod Security, a policy):
        the Job controller says so only in FailedCreate Events on the Job."""
        self.recheck = True  # the Job controller says why only in Events, which nothing here watches
        events = self.kube.failed_creates(self.namespace, job["metadata"]["uid"])
        if not events:
            return None
        newest = max(events, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
        return Outcome("pending", "FailedCreate", f"Job {job['metadata']['name']}: {newest.get('message', '')}")

    def _preflight_passed(self, job: dict[str, Any] | None) -> bool:
        """Create the pre-flight Job, then follow it: True once it succeeded; a failure fails the job."""
        if job is None:
            if self._create(builders.build_configmap(self.ftj)) and self._create(builders.build_preflight_job(
                    self.ftj, image=self.settings.trainer_image, service_account=self._trainer_account(),
                    settings=self.settings)):
                self._phase("Pending")
                self._condition("Running", False, "Preflight", "pre-flight checks running (kubetune validate --deep)")
            return False
        uid = job["metadata"].get("uid")
        outcome = attempt_outcome(job, [p for p in self.view.pods if _component(p) == "preflight"
                                        and uid in owner_uids(p)])
        self.ended_at = job_end_time(job)
        if outcome.state == "succeeded":
            self._condition("Validated", True, "PreflightPassed", "storage, data and model checked "
                            "(kubetune validate --deep)")
            return True
        if outcome.state == "failed":
            reason = "InvalidInput" if outcome.exit_code == 2 else "PreflightFailed"
            self._fail(reason, outcome.message, outcome.exit_code, validated=False)
            return False
        self._phase("Pending")
        if outcome.state == "running":
            self._condition("Running", False, "Preflight", "pre-flight checks running (kubetune validate --deep)")
        elif outcome.state == "suspended":  # runPolicy.queueName: Kueue admits the pre-flight too
            self._condition("Running", False, "Queued", "waiting for Kueue to admit the pre-flight Job")
        else:
            self._condition("Running", False, outcome.reason, outcome.message)
        return False

    def _apply(self, outcome: Outcome, attempt: int, job: dict[str, Any], pods: list[dict[str, Any]],
               suspended: bool) -> None:
        if suspended and outcome.state not in ("succeeded", "failed"):
            self._phase("Suspended")
            self._condition("Suspended", True, "Suspended", "runPolicy.suspend is true: pods stopped, "
                            "they resume from the newest checkpoint")
            self._condition("Running", False, "Suspended", "suspended")
            return
        if condition_true(self.new, "Suspended"):
            self._condition("Suspended", False, "Resumed", "runPolicy.suspend is false")
        if outcome.state == "running":
            self._phase("Running")
            self._condition("Running", True, "PodsRunning", outcome.message)
            if condition_true(self.new, "Restarting"):
                self._condition("Restarting", False, "GangRunning", f"attempt {attempt} is running")
            self._progress(pods)
        elif outcome.state in ("pending", "suspended"):
            self.recheck = self.recheck or outcome.reason in PULL_ERRORS  # the pull grace runs out without events
            self._phase("Pending")
            reason = "Queued" if outcome.state == "suspended" else outcome.reason
            message = "waiting for Kueue to admit the Job" if outcome.state == "suspended" else outcome.message
            self._condition("Running", False, reason, message)
        elif outcome.state == "succeeded":
            self._succeed(outcome)
        elif outcome.retry == "never":
            self._fail(outcome.reason, outcome.message, outcome.exit_code, result=outcome.result)
        else:
            self._restart(outcome, attempt)

    # ---- transitions --------------------------------------------------------------------------------
    def _restart(self, outcome: Outcome, attempt: int) -> None:
        policy = builders.resolved_job(self.ftj).spec.run_policy
        counted = outcome.retry == "counted"
        if counted and self.new.get("budgetUsed", 0) >= policy.backoff_limit:
            message = f"{policy.backoff_limit} counted restart(s) spent; last failure: {outcome.message}"
            self._fail("BackoffLimitExceeded", message, outcome.exit_code, result=outcome.result)
            return
        free = self.new.get("restarts", 0) - self.new.get("budgetUsed", 0)
        if not counted and policy.max_free_restarts is not None and free >= policy.max_free_restarts:
            # A pod evicted on every attempt (a full disk, a node pool always preempted) ends instead of looping.
            message = f"{policy.max_free_restarts} restart(s) after disruptions (runPolicy.maxFreeRestarts) spent; " \
                      f"last: {outcome.message}"
            self._fail("Preempted", message, outcome.exit_code, result=outcome.result)
            return
        if self._job(attempt + 1, reason=outcome.reason, counted=counted) is None:
            return
        self.new["restarts"] = self.new.get("restarts", 0) + 1
        self.new["budgetUsed"] = self.new.get("budgetUsed", 0) + int(counted)
        self.new["attempt"] = attempt + 1
        text = f"attempt {attempt} ended ({outcome.reason}: {outcome.message}); attempt {attempt + 1} resumes " \
               f"from the newest checkpoint" + ("" if counted else " (not counted against backoffLimit)")
        self._phase("Pending")
        self._condition("Restarting", True, outcome.reason, text)
        self._condition("Running", False, "Restarting", text)
        self.events.append(("Warning", "GangRestart", text))
        metrics.gang_restart(self.namespace, self.name, outcome.reason)

    def _job(self, attempt: int, reason: str | None, counted: bool) -> dict[str, Any] | None:
        """Create the Job of one attempt with what is left of the deadline; None when nothing is left."""
        spec = builders.resolved_job(self.ftj).spec
        deadline = spec.run_policy.active_deadline_seconds
        remaining = None
        if deadline is not None:
            started = parse_time(self.new.get("startTime")) or self.now
            remaining = deadline - int((self.now - started).total_seconds())
            if self._deadline_passed(deadline):
                return None
        footprint = builders.preflight_footprint([p for p in self.view.pods if _component(p) == "preflight"])
        job = builders.build_job(self.ftj, image=self.settings.trainer_image,
                                 service_account=self._trainer_account(), attempt=attempt,
                                 active_deadline_seconds=remaining, settings=self.settings, footprint=footprint)
        job["metadata"]["annotations"] = {SPEC_HASH: spec_hash(self.ftj)}
        if reason:
            job["metadata"]["annotations"].update({RESTART_REASON: reason, RESTART_COUNTED: str(counted).lower()})
        # Every gang needs the spec and the rendezvous Service: make sure they are there (409 = they are).
        for child in (builders.build_configmap(self.ftj), builders.build_service(self.ftj), job):
            if not self._create(child):
                return None
        return job

    def _create(self, obj: dict[str, Any]) -> bool:
        """Create-if-missing. False, with a condition in the server's words, when the API server refused it
        (admission: quota, LimitRange, Pod Security, a policy; 422: invalid) or an old one is in the way."""
        what = f"{obj['kind']} {obj['metadata']['name']}"
        try:
            result, created = self.kube.create(obj)
        except ApiException as exc:
            if exc.status in (401, 404) or exc.status >= 500:
                raise  # not about this object: the pass is retried
            text = f"{what} refused by the API server: {server_message(exc)}"
            if exc.status == 422:
                self._fail("InvalidInput", text, None)
            else:
                self._phase("Pending")
                self._condition("Running", False, "CreateRefused", text)
            return False
        if result == "stale":
            self._waiting_for_old_children(obj["kind"], obj["metadata"]["name"])
            return False
        if created is not None:
            self.view.created.append(created)
        return True

    def _waiting_for_old_children(self, kind: str, name: str) -> None:
        self.recheck = True  # the old ConfigMap and Service are not watched: look again after a while
        self._phase("Pending")
        self._condition("Running", False, "WaitingForOldChildren", f"{kind} {name} "
                        f"belongs to an earlier FineTuneJob named {self.name}; waiting for the garbage collector "
                        "to remove it")

    def _trainer_account(self) -> str:
        """The chart's trainer ServiceAccount where it exists in this namespace, else the namespace's default
        (trainer pods mount no token: the account only names them, and admission refuses a missing one)."""
        wanted = self.settings.trainer_service_account
        return wanted if self.kube.service_account_exists(self.namespace, wanted) else "default"

    def _succeed(self, outcome: Outcome) -> None:
        result = outcome.result or {}
        self._phase("Succeeded")
        self.new["completionTime"] = now_iso(self.ended_at or self.now)
        self.new["outputUri"] = result.get("outputUri") or builders.resolved_job(self.ftj).spec.output.uri
        if result.get("lastCheckpoint"):
            self.new["lastCheckpoint"] = result["lastCheckpoint"]
        if isinstance(result.get("dryRun"), dict):  # a dry run's report, not a model
            self.new["dryRun"] = result["dryRun"]
        tests = {f"test{k[:1].upper()}{k[1:]}": v for k, v in (result.get("test") or {}).items()
                 if isinstance(v, int | float)}
        final: dict[str, Any] = result["final"] if isinstance(result.get("final"), dict) else {}
        self.new["metrics"] = {**(self.new.get("metrics") or {}), **progress.final_metrics(final), **tests}
        if not self.new["metrics"]:
            del self.new["metrics"]
        if result.get("step") is not None and result.get("totalSteps"):
            self.new["progress"] = {**(self.new.get("progress") or {}), "step": result["step"],
                                    "totalSteps": result["totalSteps"], "percent": 100.0, "etaSeconds": 0.0}
            if isinstance(final.get("epoch"), int | float):
                self.new["progress"]["epoch"] = round(final["epoch"], 3)
        self._quality(result)
        self._condition("Running", False, "Completed", "training finished")
        self._condition("Succeeded", True, "Succeeded", f"model written to {self.new['outputUri']}")
        self._end_conditions()
        self._deploy()

    def _quality(self, result: dict[str, Any]) -> None:
        """status.quality and the Improved condition: the fine-tuned model against the base on the test split."""
        quality = result.get("quality")
        if not isinstance(quality, dict) or not {"metric", "base", "tuned", "improved"} <= set(quality):
            return
        self.new["quality"] = {k: quality[k] for k in ("metric", "base", "tuned", "delta", "improved",
                                                         "minImprovement") if quality.get(k) is not None}
        text = (f"test {quality['metric']}: base {quality['base']:.4f} -> fine-tuned {quality['tuned']:.4f} "
                f"({quality['tuned'] - quality['base']:+.4f})")
        if quality.get("minImprovement") is not None:
            text += f"; evaluation.minImprovement {quality['minImprovement']:g}"
        self._condition("Improved", bool(quality["improved"]), "BeatsBase" if quality["improved"] else
                        "NotBetterThanBase", text)

    def _deploy(self) -> None:
        """spec.deploy.kserve: serve merged/ once the job has Succeeded (owned by it, deleted with it)."""
        service = serving.inference_service(self.ftj, builders.resolved_job(self.ftj))
        if service is None:
            return
        created = self.kube.create_inference_service(service)
        if created is None:
            self._condition("Deployed", False, "KServeNotInstalled", "spec.deploy.kserve is set but this cluster "
                            "has no KServe (serving.kserve.io/v1beta1 InferenceService): install KServe, or "
                            f"serve {self.new['outputUri']} yourself")
            return
        name = service["metadata"]["name"]
        self.new["inferenceService"] = {"name": name, "ready": False}
        self._condition("Deployed", True, "InferenceServiceCreated", f"InferenceService {name} serves "
                        f"{service['spec']['predictor']['model']['storageUri']}; waiting for KServe to report "
                        "its URL")

    def _serving(self) -> bool:
        """Follow the job's InferenceService until KServe reports it Ready with a URL; True once settled."""
        served = self.old.get("inferenceService")
        if not isinstance(served, dict) or served.get("ready"):
            return True
        found = self.kube.get_inference_service(self.namespace, served["name"])
        if found is None:
            return True  # deleted, or KServe uninstalled: nothing left to follow
        url, ready = serving.url_and_ready(found)
        if not (url and ready):
            return False
        self.new["inferenceService"] = {"name": served["name"], "url": url, "ready": True}
        text = f"InferenceService {served['name']} is ready at {url}"
        self._condition("Deployed", True, "InferenceServiceReady", text)
        self.events.append(("Normal", "InferenceServiceReady", text))
        return True

    def _fail(self, reason: str, message: str, exit_code: int | None, validated: bool = True,
              result: dict[str, Any] | None = None) -> None:
        self._phase("Failed")
        self.new["completionTime"] = now_iso(self.ended_at or self.now)
        self.new["failure"] = {"reason": reason, "message": message[:4000]}
        if exit_code is not None:
            self.new["failure"]["exitCode"] = exit_code
        if result and result.get("lastCheckpoint"):
            self.new["lastCheckpoint"] = result["lastCheckpoint"]
        if result:
            self._quality(result)
        if not validated:
            self._condition("Validated", False, "InvalidInput", message)
        self._condition("Running", False, reason, message)
        self._condition("Failed", True, reason, message)
        self._end_conditions()
        self._stop_current()

    def _end_conditions(self) -> None:
        for type_ in ("Restarting", "Stalled"):
            if condition_true(self.new, type_):
                self._condition(type_, False, "Finished", "the job finished")

    def _expire(self) -> bool:
        """Delete the job once ttlSecondsAfterFinished has passed; True when it did."""
        ttl = builders_ttl(self.ftj)
        finished = parse_time(self.old.get("completionTime"))
        if isinstance(self.old.get("inferenceService"), dict):
            ttl = None  # a served model is not deleted by the TTL (it belongs to the job): delete the job to stop
        if ttl is not None and finished and (self.now - finished).total_seconds() >= ttl:
            log.info("deleting %s/%s: ttlSecondsAfterFinished=%s passed", self.namespace, self.name, ttl)
            self.kube.delete_ftj(self.namespace, self.name)
            return True
        self._remember_phase()
        return False

    # ---- observations -------------------------------------------------------------------------------
    def _account(self, jobs: dict[int, dict[str, Any]], pods: dict[int, list[dict[str, Any]]]) -> None:
        """Restarts, budget and GPU-seconds from the Jobs themselves (restart-safe); what pruned attempts
        counted stays (attempt n is the n-th restart; the budget and the seconds never go down)."""
        gpus = builders.resolved_job(self.ftj).spec.resources.gpus_per_node
        later = [j for a, j in jobs.items() if a > 0]
        self.new["attempt"] = self.new["restarts"] = max(jobs)
        counted = sum((j["metadata"].get("annotations") or {}).get(RESTART_COUNTED) == "true" for j in later)
        self.new["budgetUsed"] = max(counted, int(self.old.get("budgetUsed") or 0))
        per_attempt = dict(self.old.get("attemptGpuSeconds") or {})
        for attempt in jobs:  # max(): pods of an old attempt may be gone, their seconds are not
            seconds = pod_gpu_seconds(pods.get(attempt, []), gpus, self.now)
            per_attempt[str(attempt)] = round(max(float(per_attempt.get(str(attempt), 0.0)), seconds), 1)
        self.new["attemptGpuSeconds"] = per_attempt
        self.new["gpuSeconds"] = round(sum(per_attempt.values()), 1)

    def _queue(self, job: dict[str, Any], suspend: bool) -> None:
        """A queued Job is Kueue's to suspend and unsuspend (it unsuspends any admitted Job it finds suspended):
        runPolicy.suspend deactivates the Job's Workload instead (spec.active: false), as Kueue documents. Without
        Kueue's API (or the chart's `kueue.enabled` grant) the Job itself is suspended: nothing would undo it."""
        uid = job["metadata"].get("uid")
        if not uid:
            return
        workloads = self.kube.workloads(self.namespace, uid)
        if workloads is None:
            if suspend and not (job.get("spec") or {}).get("suspend"):
                self.kube.patch_job(self.namespace, job["metadata"]["name"], {"spec": {"suspend": True}})
                job["spec"]["suspend"] = True
            return
        if not workloads:
            self.recheck = self.recheck or suspend  # Kueue has not made the Workload yet
        for workload in workloads:
            if (workload.get("spec") or {}).get("active", True) == suspend:
                self.kube.patch_workload(self.namespace, workload["metadata"]["name"], active=not suspend)

    def _prune(self, jobs: dict[int, dict[str, Any]]) -> None:
        """Old attempts go once KEEP_ATTEMPTS newer ones exist (their pods with them; their GPU-seconds stay in
        status.attemptGpuSeconds): a job restarted a hundred times must not keep a hundred Jobs and gangs."""
        for attempt in sorted(jobs)[:-KEEP_ATTEMPTS]:
            job = jobs[attempt]
            finished = any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
                           for c in (job.get("status") or {}).get("conditions") or [])
            if finished and not job["metadata"].get("deletionTimestamp"):
                self.kube.delete_job(self.namespace, job["metadata"]["name"])

    def _spec_changed(self, job: dict[str, Any]) -> None:
        recorded = (job["metadata"].get("annotations") or {}).get(SPEC_HASH)
        if recorded and recorded not in (spec_hash(self.ftj), _written_hash(self.ftj)):
            self._condition("SpecChanged", True, "NotApplied", "spec changed after the job started; the change is "
                            "not applied (only runPolicy.suspend is): delete and recreate the FineTuneJob")
        elif condition_true(self.new, "SpecChanged"):
            self._condition("SpecChanged", False, "Unchanged", "spec matches what the pods run")

    def _progress(self, pods: list[dict[str, Any]]) -> None:
        zero = rank0(pods)
        ip = ((zero or {}).get("status") or {}).get("podIP")
        if not ip:
            return
        self.scrape_url = self.settings.trainer_metrics_url.format(pod_ip=ip, port=contract.DEFAULT_METRICS_PORT)
        if self.view.scraped is not None:  # the runtime's scraper keeps the last scrape
            found, values = self.view.scraped
        else:
            text = progress.scrape(self.scrape_url)
            if text is None:
                return
            found, values = progress.parse(text, self.name, self.namespace)
        old_step = (self.old.get("progress") or {}).get("step")
        if found:
            self.new["progress"] = found
        if values:
            self.new["metrics"] = {**(self.new.get("metrics") or {}), **values}
        step = found.get("step")
        if step is not None and (step != old_step or not self.new.get("lastStepTime")):
            self.new["lastStepTime"] = now_iso(self.now)
            if condition_true(self.new, "Stalled"):
                self._condition("Stalled", False, "Progressing", f"step {step}")
        last = parse_time(self.new.get("lastStepTime"))
        if step is not None and last and (self.now - last).total_seconds() >= self.settings.stall_seconds:
            self._condition("Stalled", True, "NoProgress", f"step {step} has not moved for "
                            f"{int((self.now - last).total_seconds())}s: a hung collective holds the GPUs")

    # ---- writing --------------------------------------------------------------------------------------
    def _phase(self, phase: str) -> None:
        if self.new.get("phase") != phase:
            self.new["phase"] = phase

    def _condition(self, type_: str, value: bool, reason: str, message: str) -> None:
        self.new["conditions"] = set_condition(self.new.get("conditions") or [], type_, value, reason, message,
                                               self.now, self.generation)

    def _remember_phase(self) -> None:
        with _phases_lock:
            _phases[(self.namespace, self.name)] = (self.namespace, self.new.get("phase") or "Pending")

    def _write(self) -> None:
        self.new = finite(self.new)  # the API server refuses NaN and Infinity in JSON: such a value is absent
        self.new.setdefault("phase", "Pending")
        if self.generation is not None:  # the whole status was derived against this generation, every condition too
            self.new["observedGeneration"] = self.generation
            for condition in self.new.get("conditions") or []:
                condition["observedGeneration"] = self.generation
        self._remember_phase()
        self._throttle_cost()
        if self.new == self.old:
            return
        self.written = self.kube.patch_ftj_status(self.namespace, self.name, self._patch())
        if self.new.get("phase") == "Failed" and self.old.get("phase") != "Failed":
            metrics.job_failed(self.namespace, self.new["failure"]["reason"])  # alerts fire on new failures
        if self.new.get("gpuSeconds") != self.old.get("gpuSeconds"):
            with _phases_lock:
                _cost_written[(self.namespace, self.name)] = self.now
        for event in self._transition_events():
            self.kube.event(self.ftj, *event, now=self.now)

    def _throttle_cost(self) -> None:
        """GPU-seconds grow every second a pod runs: written with other changes, at the end, or every
        COST_SECONDS, not on every pass (a write a pass is the API cost that would not scale)."""
        cost = ("gpuSeconds", "attemptGpuSeconds")
        if self.new.get("phase") in FINISHED or "gpuSeconds" not in self.old:
            return
        others = {k for k in {*self.new, *self.old} - set(cost) if self.new.get(k) != self.old.get(k)}
        with _phases_lock:
            last = _cost_written.get((self.namespace, self.name))
        if not others and last is not None and (self.now - last).total_seconds() < COST_SECONDS:
            for key in cost:
                self.new[key] = self.old.get(key)

    def wake(self) -> datetime | None:
        """When a pass is due even if nothing changes: TTL expiry, the deadline, the stall window, the next cost
        figure, or a look at what nothing watches (FailedCreate events, a served model)."""
        times: list[datetime] = []
        status, policy = self.new, (self.ftj.get("spec") or {}).get("runPolicy") or {}
        finished = parse_time(status.get("completionTime")) if status.get("phase") in FINISHED else None
        ttl = builders_ttl(self.ftj)
        if finished and ttl is not None and not isinstance(status.get("inferenceService"), dict):
            times.append(finished + timedelta(seconds=ttl))
        started = parse_time(status.get("startTime"))
        if not finished and started and isinstance(policy.get("activeDeadlineSeconds"), int):
            times.append(started + timedelta(seconds=policy["activeDeadlineSeconds"]))
        if status.get("phase") == "Running":
            last = parse_time(status.get("lastStepTime"))
            if last and not condition_true(status, "Stalled"):
                times.append(last + timedelta(seconds=self.settings.stall_seconds))
            times.append(self.now + timedelta(seconds=COST_SECONDS))
        if self.recheck or (isinstance(status.get("inferenceService"), dict) and
                            not status["inferenceService"].get("ready")):
            times.append(self.now + timedelta(seconds=self.settings.refresh_seconds))
        return min(times) if times else None

    def _patch(self) -> dict[str, Any]:
        """A merge patch: keys that disappeared become null."""
        patch: dict[str, Any] = dict(self.new)
        for key in self.old:
            patch.setdefault(key, None)
        return patch

    def _transition_events(self) -> list[tuple[str, str, str]]:
        events = []
        if self.old.get("phase") != self.new.get("phase"):
            warn = self.new["phase"] == "Failed"
            text = f"phase {self.old['phase']} -> {self.new['phase']}" if self.old.get("phase") else \
                f"phase {self.new['phase']}"
            if warn:
                text += f": {self.new['failure']['reason']}: {self.new['failure']['message']}"
            events.append(("Warning" if warn else "Normal", self.new["phase"], text))
        before = {c["type"]: c for c in self.old.get("conditions") or []}
        for condition in self.new.get("conditions") or []:
            old = before.get(condition["type"])
            flipped = old is None or old["status"] != condition["status"]
            # Created/Validated/Succeeded/Failed flip with the phase (its event says it); a restart has its own.
            if condition["type"] in ("Suspended", "Stalled", "SpecChanged") and flipped and (
                    old is not None or condition["status"] == "True"):
                kind = "Warning" if condition["type"] != "Suspended" and condition["status"] == "True" else "Normal"
                events.append((kind, condition["reason"], f"{condition['type']}={condition['status']}: "
                               f"{condition['message']}"))
            elif condition["type"] == "Running" and (old is None or old.get("reason") != condition["reason"]) and \
                    condition["reason"] in WARNINGS:
                events.append(("Warning", condition["reason"], condition["message"]))
            elif condition["type"] == "Running" and old and old.get("reason") != condition["reason"] and \
                    self.old.get("phase") == self.new.get("phase"):
                events.append(("Normal", condition["reason"], condition["message"]))  # e.g. Pending -> Unschedulable
        return events + self.events


def builders_ttl(ftj: dict[str, Any]) -> int | None:
    value = ((ftj.get("spec") or {}).get("runPolicy") or {}).get("ttlSecondsAfterFinished")
    return int(value) if isinstance(value, int) else None

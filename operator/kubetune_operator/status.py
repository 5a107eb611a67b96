"""Pure status logic: one set_condition, the outcome of a gang attempt from its Job and Pods, the phase.

No API calls here; reconcile.py feeds observed objects in and writes what comes out, once per pass.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import signal
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubetune import contract

FINISHED = ("Succeeded", "Failed")
COMPLETION_INDEX_KEY = "batch.kubernetes.io/job-completion-index"
PULL_ERRORS = ("ImagePullBackOff", "ErrImagePull", "InvalidImageName")
RULE_INDEX = re.compile(r"rule at index (\d+)")


def now_iso(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None


def set_condition(conditions: list[dict[str, Any]], type_: str, status: bool, reason: str, message: str,
                  now: datetime, generation: int | None = None) -> list[dict[str, Any]]:
    """Return conditions with `type_` set; lastTransitionTime moves only when the status flips."""
    value = "True" if status else "False"
    old = next((c for c in conditions if c.get("type") == type_), None)
    moved = old is None or old.get("status") != value
    condition = {
        "type": type_, "status": value, "reason": reason, "message": message,
        "lastTransitionTime": now_iso(now) if moved else old["lastTransitionTime"],  # type: ignore[index]
    }
    if generation is not None:
        condition["observedGeneration"] = generation
    return [c for c in conditions if c.get("type") != type_] + [condition]


def finite(value: Any) -> Any:
    """The value without NaN or Infinity anywhere (dropped from objects and lists): JSON has no such numbers."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items() if not _non_finite(v)}
    if isinstance(value, list):
        return [finite(v) for v in value if not _non_finite(v)]
    return value


def _non_finite(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def condition_true(status: dict[str, Any], type_: str) -> bool:
    return any(c.get("type") == type_ and c.get("status") == "True" for c in status.get("conditions") or [])


@dataclass(frozen=True)
class Outcome:
    """What one gang attempt came to. retry: 'free' (disruption), 'counted' (spends backoffLimit), 'never'."""

    state: str  # pending | running | succeeded | failed | suspended
    reason: str = ""
    message: str = ""
    exit_code: int | None = None
    retry: str = "never"
    result: dict[str, Any] | None = None  # the trainer's termination message (JSON) when it left one


def _job_condition(job: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") == type_ and condition.get("status") == "True":
            return dict(condition)
    return None


def _states(pod: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return [s["state"][kind] for s in statuses if (s.get("state") or {}).get(kind)]


def _terminated(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return _states(pod, "terminated")


def _waiting(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return _states(pod, "waiting")


def _pod_condition(pod: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("type") == type_:
            return dict(condition)
    return None


def termination_result(terminated: dict[str, Any]) -> dict[str, Any] | None:
    """The trainer writes JSON; FallbackToLogsOnError may give log lines instead (then no result)."""
    try:
        result = json.loads(terminated.get("message") or "")
    except ValueError:
        return None
    return result if isinstance(result, dict) else None


def _message(terminated: dict[str, Any]) -> str:
    result = termination_result(terminated)
    if result and result.get("message"):
        return str(result["message"])
    return log_tail((terminated.get("message") or terminated.get("reason") or "").strip())


def log_tail(text: str, limit: int = 800) -> str:
    """The end of a log, in whole lines (a log's first characters cut mid-word tell nothing)."""
    if len(text) <= limit:
        return text
    tail = text[-limit:]
    return "..." + (tail.split("\n", 1)[1] if "\n" in tail else tail)


def describe_exit(pod: dict[str, Any], terminated: dict[str, Any]) -> str:
    """'rank 1 (pod x) exited 137 (SIGKILL): <the trainer's message or its log's tail>'."""
    code = terminated.get("exitCode")
    index = (pod["metadata"].get("annotations") or {}).get(COMPLETION_INDEX_KEY, "?")
    how = f"exited {code}"
    if isinstance(code, int) and code > 128:
        with contextlib.suppress(ValueError):
            how += f" ({signal.Signals(code - 128).name})"
    if terminated.get("reason") not in (None, "Error", "Completed"):
        how += f", {terminated['reason']}"
    said = _message(terminated)
    return f"rank {index} (pod {pod['metadata']['name']}) {how}" + (f": {said}" if said else "")


def job_end_time(job: dict[str, Any]) -> datetime | None:
    """When a Job ended, from its own record: completionTime, else its Complete or Failed condition's time (an
    operator that was down when it ended still reports when it happened)."""
    status = job.get("status") or {}
    ended = status.get("completionTime") or next(
        (c.get("lastTransitionTime") for c in status.get("conditions") or []
         if c.get("type") in ("Complete", "Failed") and c.get("status") == "True"), None)
    return parse_time(ended)


def rank0(pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    for pod in pods:
        if (pod["metadata"].get("annotations") or {}).get(COMPLETION_INDEX_KEY) == "0":
            return pod
    return None


def matched_rule(job: dict[str, Any], failed: dict[str, Any]) -> dict[str, Any] | None:
    """The podFailurePolicy rule that failed the Job, from its Failed condition (reason PodFailurePolicy,
    message "... matching FailJob rule at index N"): the pods may be gone by now, the condition stays."""
    if failed.get("reason") != "PodFailurePolicy":
        return None
    found = RULE_INDEX.search(failed.get("message") or "")
    rules = ((job.get("spec") or {}).get("podFailurePolicy") or {}).get("rules") or []
    return rules[int(found.group(1))] if found and int(found.group(1)) < len(rules) else None


def rule_cause(rule: dict[str, Any]) -> str:
    """What a rule of the trainer Job's podFailurePolicy means: InvalidInput, Preempted or TrainerError."""
    codes = (rule.get("onExitCodes") or {}).get("values") or []
    if contract.EXIT_BAD_INPUT in codes:
        return "InvalidInput"
    if contract.EXIT_NOT_IMPROVED in codes:
        return "NotImproved"
    if contract.EXIT_RETRY in codes or any(c.get("type") == "DisruptionTarget" for c in rule.get("onPodConditions")
                                            or []):
        return "Preempted"
    return "TrainerError"


def attempt_outcome(job: dict[str, Any], pods: list[dict[str, Any]], now: datetime | None = None,
                    pull_seconds: float = 0.0) -> Outcome:
    """Classify one attempt from its Job (the truth: its controller may delete the pods) and its Pods.

    Image pull errors fail the attempt once a pod has been failing to pull for pull_seconds (a registry's 429,
    a slow pull of a large image come and go); an invalid image name at once."""
    terminated = [(pod, t) for pod in pods for t in _terminated(pod)]
    failed_job = _job_condition(job, "Failed")
    if _job_condition(job, "Complete"):
        zero = rank0(pods)
        result = next((termination_result(t) for t in _terminated(zero)), None) if zero else None
        return Outcome("succeeded", "Succeeded", "training finished", 0, result=result)
    for _, t in terminated:
        if t.get("exitCode") == contract.EXIT_BAD_INPUT:
            return Outcome("failed", "InvalidInput", _message(t), contract.EXIT_BAD_INPUT, result=termination_result(t))
        if t.get("exitCode") == contract.EXIT_NOT_IMPROVED:  # trained, not published: a rerun trains the same
            return Outcome("failed", "NotImproved", _message(t), contract.EXIT_NOT_IMPROVED,
                           result=termination_result(t))
    if failed_job and failed_job.get("reason") == "DeadlineExceeded":
        return Outcome("failed", "DeadlineExceeded", failed_job.get("message") or "activeDeadlineSeconds passed")
    active = [p for p in pods if (p.get("status") or {}).get("phase") in ("Pending", "Running")
              and not p["metadata"].get("deletionTimestamp")]
    # The Job's own Failed condition ends an attempt (not the first failed pod: the Job controller may still
    # be stopping the others, and a new gang must not overlap the old one's checkpoint writes).
    stopping = [p for p in pods if (p.get("status") or {}).get("phase") in ("Pending", "Running")]
    if failed_job and not stopping:
        return _failed(job, failed_job, pods, terminated)
    # FailureTarget: the Job controller has decided the Job fails and stops its pods; it adds Failed once they
    # have all terminated.
    failing = failed_job or _job_condition(job, "FailureTarget")
    if failing:
        return Outcome("pending", "Stopping", f"attempt {job['metadata']['name']} failed "
                       f"({failing.get('message') or failing.get('reason')}); waiting for {len(stopping)} pod(s) "
                       "of it to stop")
    for pod in pods:
        for waiting in _waiting(pod):
            if waiting.get("reason") in PULL_ERRORS:
                created = parse_time(pod["metadata"].get("creationTimestamp"))
                waited = (now - created).total_seconds() if now and created else float("inf")
                text = waiting.get("message") or waiting["reason"]
                if waiting["reason"] != "InvalidImageName" and waited < pull_seconds:
                    return Outcome("pending", waiting["reason"], f"{text} (retrying for up to {pull_seconds:.0f}s)")
                return Outcome("failed", "ErrImagePull" if waiting["reason"] == "InvalidImageName" else
                               waiting["reason"], text)
    if (job.get("spec") or {}).get("suspend"):
        return Outcome("suspended", "Suspended", "the Job is suspended")
    if active and all((p.get("status") or {}).get("phase") == "Running" for p in active):
        return Outcome("running", "Running", f"{len(active)} pod(s) running")
    for pod in pods:
        scheduled = _pod_condition(pod, "PodScheduled")
        if scheduled and scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
            return Outcome("pending", "Unschedulable", scheduled.get("message") or "no node fits the pod")
    for pod in pods:
        for waiting in _waiting(pod):
            if waiting.get("reason") not in (None, "ContainerCreating", "PodInitializing"):
                return Outcome("pending", waiting["reason"], waiting.get("message") or waiting["reason"])
    return Outcome("pending", "Pending", "waiting for pods")


def _failed(job: dict[str, Any], failed_job: dict[str, Any], pods: list[dict[str, Any]],
            terminated: list[tuple[dict[str, Any], dict[str, Any]]]) -> Outcome:
    """A failed attempt's cause: the podFailurePolicy rule that matched, else what the pods left behind."""
    rule = matched_rule(job, failed_job)
    cause = rule_cause(rule) if rule is not None else None
    text = failed_job.get("message") or "the Job failed"
    if cause in ("InvalidInput", "NotImproved"):
        code = contract.EXIT_BAD_INPUT if cause == "InvalidInput" else contract.EXIT_NOT_IMPROVED
        crash = next((t for _, t in terminated if t.get("exitCode") == code), None)
        return Outcome("failed", cause, _message(crash) if crash else text, code,
                       result=termination_result(crash) if crash else None)
    for pod in pods:
        disruption = _pod_condition(pod, "DisruptionTarget")
        if cause is None and disruption and disruption.get("status") == "True":
            cause, text = "Preempted", disruption.get("message") or disruption.get("reason") or "pod disrupted"
    if cause == "Preempted":
        checkpointed = next((t for _, t in terminated if t.get("exitCode") == contract.EXIT_RETRY), None)
        message = _message(checkpointed) if checkpointed else text
        return Outcome("failed", "Preempted", message, contract.EXIT_RETRY if checkpointed else None, retry="free",
                       result=termination_result(checkpointed) if checkpointed else None)
    for pod, t in terminated:
        if t.get("reason") == "OOMKilled":  # the same batch on the same memory would only OOM again
            return Outcome("failed", "OOMKilled", f"pod {pod['metadata']['name']} ran out of memory: raise "
                           "resources.memory or lower batchSize", t.get("exitCode"))
    ended = next(((p, t) for p, t in terminated if t.get("exitCode") not in (0, None)), None)
    if ended:
        return Outcome("failed", "TrainerError", describe_exit(*ended), ended[1].get("exitCode"), retry="counted",
                       result=termination_result(ended[1]))
    return Outcome("failed", "TrainerError", text or "a pod was lost", retry="counted")


def pod_gpu_seconds(pods: list[dict[str, Any]], gpus_per_node: int, now: datetime) -> float:
    """GPU-seconds held by these pods: container start to finish (or now), times GPUs per pod."""
    total = 0.0
    for pod in pods:
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            state = status.get("state") or {}
            running, terminated = state.get("running"), state.get("terminated")
            started = parse_time((running or terminated or {}).get("startedAt"))
            ended = parse_time(terminated.get("finishedAt")) if terminated else now
            if started and ended:
                total += max(0.0, (ended - started).total_seconds()) * gpus_per_node
    return total

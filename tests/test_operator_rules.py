"""The operator's rules, with a clock the test controls: restart accounting, deadlines, Kueue, status bookkeeping.

The test runs the operator's passes itself (`reconcile.reconcile(..., now=...)`) against the real control plane,
so time is whatever the test says while the real Job controller, scheduler and node agent act on the objects;
the pure rules (conditions, GPU-seconds, progress parsing) are unit tests. Each test names the deliberate bug it
catches (issue 32's list; `make mutants` puts them back one at a time).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import kubernetes
import pytest
from kubernetes.client.rest import ApiException

from kubetune import contract
from kubetune.jobfile import job_document
from kubetune_operator import progress, reconcile
from kubetune_operator.kube import Kube
from kubetune_operator.runtime import Runtime
from kubetune_operator.settings import Settings
from kubetune_operator.status import now_iso, pod_gpu_seconds, set_condition
from tests.cluster import SCRIPTED_IMAGE, KubeCluster, open_schema_crd
from tests.fixtures_cluster import S3_SECRET
from tests.operator_harness import NS, Api, wait_for
from tests.scripted_trainer import ScriptedTrainer
from tests.test_chart_rbac import KSERVE_CRD
from tests.test_operator import BASE

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
SETTINGS = Settings(trainer_image=f"{SCRIPTED_IMAGE}:1", preflight=False, stall_seconds=900.0)


@pytest.fixture(scope="module")
def env(kube: KubeCluster) -> Iterator[tuple[Kube, Api, ScriptedTrainer]]:
    """The namespace and its Secret, an admin client as the operator's, the scripted trainer; no operator runs."""
    kube.clean_scripts()
    kube.install_crd()
    kube.delete_namespace(NS)
    kube.namespace(NS)
    kubernetes.client.CoreV1Api(kube.client()).create_namespaced_secret(NS, {
        "metadata": {"name": S3_SECRET},
        "stringData": {contract.SECRET_ACCESS_KEY_ID: "test", contract.SECRET_SECRET_ACCESS_KEY: "test-secret"}})
    yield Kube(kube.client()), Api(kube.kubeconfig), ScriptedTrainer(kube.scripts)
    kube.delete_namespace(NS)


def submit(api: Api, name: str, **overrides: Any) -> dict[str, Any]:
    doc = job_document(name, BASE, overrides)
    doc["metadata"]["namespace"] = NS
    return api.apply(doc)


def run_pass(kube: Kube, name: str, at: datetime) -> dict[str, Any]:
    reconcile.reconcile(kube, SETTINGS, NS, name, now=at)
    status: dict[str, Any] = (kube.get_ftj(NS, name) or {}).get("status") or {}
    return status


def job_failed(api: Api, job: str) -> bool:
    return any(c["type"] == "Failed" and c["status"] == "True"
               for c in ((api.job(job) or {}).get("status") or {}).get("conditions") or [])


# ---- pure rules --------------------------------------------------------------------------------------------
def test_last_transition_time_moves_only_when_status_flips() -> None:
    """Bug: lastTransitionTime moved on a reason change without a status flip."""
    first = set_condition([], "Running", False, "Pending", "waiting for pods", T0)
    later = set_condition(first, "Running", False, "Unschedulable", "0/2 nodes", T0 + timedelta(seconds=30))
    assert later[0]["lastTransitionTime"] == now_iso(T0) and later[0]["reason"] == "Unschedulable"
    flipped = set_condition(later, "Running", True, "PodsRunning", "1 pod(s) running", T0 + timedelta(seconds=60))
    assert flipped[0]["lastTransitionTime"] == now_iso(T0 + timedelta(seconds=60))


def test_gpu_seconds_count_every_gpu_of_a_pod() -> None:
    """Bug: GPU-seconds not multiplied by GPUs per node (8 GPUs for 60 s is 480)."""
    pod = {"status": {"containerStatuses": [{"state": {"running": {"startedAt": now_iso(T0)}}}]}}
    assert pod_gpu_seconds([pod], 8, T0 + timedelta(seconds=60)) == pytest.approx(480)
    ended = {"status": {"containerStatuses": [{"state": {"terminated": {
        "startedAt": now_iso(T0), "finishedAt": now_iso(T0 + timedelta(seconds=30))}}}]}}
    assert pod_gpu_seconds([ended], 2, T0 + timedelta(hours=1)) == pytest.approx(60)


def test_progress_keeps_fractional_epochs_and_the_eta() -> None:
    """Bug: progress.epoch truncated to an integer."""
    labels = 'job="j",namespace="ml"'
    text = "\n".join([f"{contract.METRIC_STEP}{{{labels}}} 5", f"{contract.METRIC_TOTAL_STEPS}{{{labels}}} 20",
                      f"{contract.METRIC_EPOCH}{{{labels}}} 0.5", f"{contract.METRIC_ETA}{{{labels}}} 93.25",
                      f"{contract.METRIC_PROGRESS}{{{labels}}} 0.25"]) + "\n"
    found, _ = progress.parse(text, "j", "ml")
    assert found == {"step": 5, "totalSteps": 20, "epoch": 0.5, "percent": 25.0, "etaSeconds": 93.2}


def test_a_defaulted_field_added_later_is_not_a_spec_change() -> None:
    """Bug: the hash of what the pods run counted defaults the API server fills in, so a CRD upgrade that adds a
    defaulted field made every running job look edited (SpecChanged)."""
    written = job_document("hashed", BASE)
    upgraded = job_document("hashed", BASE, {"hyperparameters": {"warmupRatio": 0.0}})  # its default, filled in
    assert reconcile.spec_hash(written) == reconcile.spec_hash(upgraded)
    edited = job_document("hashed", BASE, {"hyperparameters": {"warmupRatio": 0.1}})
    assert reconcile.spec_hash(written) != reconcile.spec_hash(edited)


# ---- on the real control plane, with the test's clock -------------------------------------------------------
def test_observed_generation_follows_every_edit(env: tuple[Kube, Api, ScriptedTrainer]) -> None:
    """Bug: status.observedGeneration never written (nor on each condition)."""
    kube, api, _ = env
    submit(api, "generation", resources={"gpusPerNode": 4})  # unschedulable: nothing moves but the edits
    status = run_pass(kube, "generation", T0)
    assert status["observedGeneration"] == 1
    assert {c.get("observedGeneration") for c in status["conditions"]} == {1}
    api.patch_ftj("generation", {"spec": {"runPolicy": {"suspend": True}}})
    assert api.ftj("generation")["metadata"]["generation"] == 2  # type: ignore[index]
    status = run_pass(kube, "generation", T0 + timedelta(seconds=10))
    assert status["observedGeneration"] == 2 and status["phase"] == "Suspended"
    assert {c.get("observedGeneration") for c in status["conditions"]} == {2}


def test_suspend_and_resume_are_not_a_spec_change(env: tuple[Kube, Api, ScriptedTrainer]) -> None:
    """Bug: suspend/resume shown as SpecChanged (the spec hash must leave runPolicy.suspend out)."""
    kube, api, _ = env
    submit(api, "flip", resources={"gpusPerNode": 4})
    run_pass(kube, "flip", T0)
    for suspend, second in ((True, 10), (False, 20)):
        api.patch_ftj("flip", {"spec": {"runPolicy": {"suspend": suspend}}})
        status = run_pass(kube, "flip", T0 + timedelta(seconds=second))
        assert not any(c["type"] == "SpecChanged" and c["status"] == "True" for c in status["conditions"])
        assert api.job("flip-0")["spec"]["suspend"] is suspend  # type: ignore[index]


def test_unschedulable_keeps_the_running_conditions_transition_time(env: tuple[Kube, Api, ScriptedTrainer]) -> None:
    """Pending -> Unschedulable is a new reason, not a flip: Running=False keeps its lastTransitionTime."""
    kube, api, _ = env
    submit(api, "queued-gpus", resources={"gpusPerNode": 4})
    first = next(c for c in run_pass(kube, "queued-gpus", T0)["conditions"] if c["type"] == "Running")
    wait_for("the scheduler's verdict", lambda: any(
        c.get("reason") == "Unschedulable" for p in api.pods("queued-gpus-0")
        for c in p["status"].get("conditions") or []))
    later = next(c for c in run_pass(kube, "queued-gpus", T0 + timedelta(seconds=30))["conditions"]
                 if c["type"] == "Running")
    assert later["reason"] == "Unschedulable" and first["reason"] != "Unschedulable"
    assert later["lastTransitionTime"] == first["lastTransitionTime"] == now_iso(T0)


def test_a_queued_job_waits_for_kueue(env: tuple[Kube, Api, ScriptedTrainer]) -> None:
    """Bug: the operator unsuspends a queued Job itself. Kueue (played by the test) admits it by unsuspending."""
    kube, api, trainer = env
    submit(api, "queued", runPolicy={"queueName": "team-a"}, resources={"gpusPerNode": 0})
    for second in (0, 10, 20):
        status = run_pass(kube, "queued", T0 + timedelta(seconds=second))
        assert api.job("queued-0")["spec"]["suspend"] is True, "the operator unsuspended a queued Job"  # type: ignore
        running = next(c for c in status["conditions"] if c["type"] == "Running")
        assert status["phase"] == "Pending" and running["reason"] == "Queued", status
    assert api.job("queued-0")["metadata"]["labels"][contract.LABEL_QUEUE] == "team-a"  # type: ignore[index]
    api.batch.patch_namespaced_job("queued-0", NS, {"spec": {"suspend": False}},  # Kueue admits it
                                   _content_type="application/merge-patch+json")
    wait_for("the trainer", lambda: trainer.started("queued-0-0"))
    wait_for("Running", lambda: run_pass(kube, "queued", T0 + timedelta(seconds=40))["phase"] == "Running")


def test_a_queued_jobs_preflight_waits_for_kueue_too(env: tuple[Kube, Api, ScriptedTrainer]) -> None:
    """Bug: a queued job's pre-flight Job (suspended until Kueue admits it) showed Running reason 'Suspended',
    as if someone had set runPolicy.suspend."""
    kube, api, _ = env
    submit(api, "queued-check", runPolicy={"queueName": "team-a"}, resources={"gpusPerNode": 0})
    with_preflight = dataclasses.replace(SETTINGS, preflight=True)
    for second in (0, 10):
        reconcile.reconcile(kube, with_preflight, NS, "queued-check", now=T0 + timedelta(seconds=second))
    status = api.status("queued-check")
    running = next(c for c in status["conditions"] if c["type"] == "Running")
    assert status["phase"] == "Pending" and running["reason"] == "Queued", status
    assert "pre-flight" in running["message"]
    assert api.job("queued-check-preflight")["spec"]["suspend"] is True  # type: ignore[index]


WORKLOAD_CRD = open_schema_crd("kueue.x-k8s.io", "Workload", "v1beta1")  # Kueue's API, not its controller


def test_suspending_a_queued_job_deactivates_its_workload(env: tuple[Kube, Api, ScriptedTrainer],
                                                          kube: KubeCluster) -> None:
    """Bug: with queueName and runPolicy.suspend the operator suspended the admitted Job on every pass and Kueue
    unsuspended it on every pass (pods made and killed every 10 s). Kueue's documented way: the Workload's
    spec.active. Kueue's controller is played by the test: it made the Workload, admits, and evicts when
    deactivated."""
    kube_, api, trainer = env
    extensions = kubernetes.client.ApiextensionsV1Api(kube.client())
    extensions.create_custom_resource_definition(WORKLOAD_CRD)
    try:
        wait_for("the Workload API", lambda: "workloads" in kube.run("kubectl", "api-resources").stdout)
        submit(api, "queued-held", runPolicy={"queueName": "team-a"}, resources={"gpusPerNode": 0})
        run_pass(kube_, "queued-held", T0)
        job = api.job("queued-held-0")
        assert job is not None and job["spec"]["suspend"] is True
        api.custom.create_namespaced_custom_object("kueue.x-k8s.io", "v1beta1", NS, "workloads", {
            "apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "Workload",
            "metadata": {"name": "job-queued-held-0-abcde", "labels": {"kueue.x-k8s.io/job-uid":
                                                                        job["metadata"]["uid"]}},
            "spec": {"active": True, "queueName": "team-a"}})
        api.batch.patch_namespaced_job("queued-held-0", NS, {"spec": {"suspend": False}},  # Kueue admits it
                                       _content_type="application/merge-patch+json")
        wait_for("the trainer", lambda: trainer.started("queued-held-0-0"))
        api.patch_ftj("queued-held", {"spec": {"runPolicy": {"suspend": True}}})
        for second in (10, 20, 30):  # passes do not touch the Job: that was the flapping
            run_pass(kube_, "queued-held", T0 + timedelta(seconds=second))
            assert api.job("queued-held-0")["spec"]["suspend"] is False  # type: ignore[index]
        workload = api.custom.get_namespaced_custom_object("kueue.x-k8s.io", "v1beta1", NS, "workloads",
                                                           "job-queued-held-0-abcde")
        assert workload["spec"]["active"] is False
        api.batch.patch_namespaced_job("queued-held-0", NS, {"spec": {"suspend": True}},  # Kueue evicts it
                                       _content_type="application/merge-patch+json")
        status = run_pass(kube_, "queued-held", T0 + timedelta(seconds=40))
        assert status["phase"] == "Suspended"
        api.patch_ftj("queued-held", {"spec": {"runPolicy": {"suspend": False}}})
        run_pass(kube_, "queued-held", T0 + timedelta(seconds=50))
        workload = api.custom.get_namespaced_custom_object("kueue.x-k8s.io", "v1beta1", NS, "workloads",
                                                           "job-queued-held-0-abcde")
        assert workload["spec"]["active"] is True  # back in the queue: Kueue admits it again
    finally:
        extensions.delete_custom_resource_definition(WORKLOAD_CRD["metadata"]["name"])


def test_a_restart_gets_what_is_left_of_the_deadline(env: tuple[Kube, Api, ScriptedTrainer]) -> None:
    """Bug: a restart attempt given the whole activeDeadlineSeconds. 600 s: a failure at T0+400 leaves the next
    Job 200 s; at T0+700 the job fails DeadlineExceeded and no new Job starts."""
    kube, api, trainer = env
    submit(api, "deadline", runPolicy={"activeDeadlineSeconds": 600, "backoffLimit": 5}, resources={"gpusPerNode": 0})
    run_pass(kube, "deadline", T0)
    assert api.job("deadline-0")["spec"]["activeDeadlineSeconds"] == 600  # type: ignore[index]
    wait_for("the trainer", lambda: trainer.started("deadline-0-0"))
    trainer.exit("deadline-0-0", 1, {"outcome": "Failed", "exitCode": 1, "message": "boom"})
    wait_for("attempt 0 failed", lambda: job_failed(api, "deadline-0"))
    run_pass(kube, "deadline", T0 + timedelta(seconds=400))
    assert api.job("deadline-1")["spec"]["activeDeadlineSeconds"] == 200  # type: ignore[index]
    wait_for("the trainer", lambda: trainer.started("deadline-1-0"))
    trainer.exit("deadline-1-0", 1, {"outcome": "Failed", "exitCode": 1, "message": "boom again"})
    wait_for("attempt 1 failed", lambda: job_failed(api, "deadline-1"))
    status = run_pass(kube, "deadline", T0 + timedelta(seconds=700))
    assert status["phase"] == "Failed" and status["failure"]["reason"] == "DeadlineExceeded", status
    assert api.job("deadline-2") is None


def test_free_restarts_are_capped_by_max_free_restarts(env: tuple[Kube, Api, ScriptedTrainer]) -> None:
    """Bug: restarts after a checkpoint on SIGTERM (exit 75) never ended: a pod disrupted on every attempt (a full
    disk, a pool always preempted) looped forever. runPolicy.maxFreeRestarts 1: the second such end fails the job
    Preempted, its message naming the setting, while backoffLimit was never spent."""
    kube, api, trainer = env
    submit(api, "disrupted", runPolicy={"maxFreeRestarts": 1, "backoffLimit": 0}, resources={"gpusPerNode": 0})
    checkpointed = {"outcome": "Preempted", "exitCode": 75, "message": "SIGTERM: saved checkpoint-40"}
    for attempt, at in ((0, T0), (1, T0 + timedelta(seconds=60))):
        run_pass(kube, "disrupted", at)
        wait_for("the trainer", lambda a=attempt: trainer.started(f"disrupted-{a}-0"))  # type: ignore[misc]
        trainer.exit(f"disrupted-{attempt}-0", 75, checkpointed)
        wait_for(f"attempt {attempt} ended", lambda a=attempt: job_failed(api, f"disrupted-{a}"))  # type: ignore[misc]
    status = run_pass(kube, "disrupted", T0 + timedelta(seconds=120))
    assert status["phase"] == "Failed" and status["failure"]["reason"] == "Preempted", status
    assert "runPolicy.maxFreeRestarts" in status["failure"]["message"]
    assert status["restarts"] == 1 and status.get("budgetUsed", 0) == 0
    assert api.job("disrupted-2") is None


def test_a_queued_job_expires_at_its_deadline(env: tuple[Kube, Api, ScriptedTrainer]) -> None:
    """Bug: activeDeadlineSeconds was checked only when an attempt was created; a Job Kueue never admits is
    suspended, its own deadline timer stopped, so a queued FineTuneJob never expired."""
    kube, api, _ = env
    submit(api, "queued-forever", runPolicy={"queueName": "team-b", "activeDeadlineSeconds": 60},
           resources={"gpusPerNode": 0})
    assert run_pass(kube, "queued-forever", T0)["phase"] == "Pending"
    status = run_pass(kube, "queued-forever", T0 + timedelta(seconds=61))
    assert status["phase"] == "Failed" and status["failure"]["reason"] == "DeadlineExceeded", status
    assert api.job("queued-forever-0")["spec"]["suspend"] is True  # type: ignore[index]


def test_a_pull_error_is_retried_for_a_while_then_stops_the_job(env: tuple[Kube, Api, ScriptedTrainer]) -> None:
    """Bug: one transient ErrImagePull (a registry's 429) failed the job at once, and nothing stopped its Job:
    pods kept their GPUs in ImagePullBackOff. Now: pending for KUBETUNE_IMAGE_PULL_SECONDS, then Failed with
    the Job suspended (the Job controller removes its pods)."""
    kube, api, _ = env
    submit(api, "pulling", image="registry.example.com/slow:1")  # one GPU: held while it pulls
    run_pass(kube, "pulling", datetime.now(UTC))
    pod = wait_for("a pull error", lambda: next((p for p in api.pods("pulling-0") if any(
        (s.get("state") or {}).get("waiting", {}).get("reason") in ("ErrImagePull", "ImagePullBackOff")
        for s in p["status"].get("containerStatuses") or [])), None))
    created = datetime.fromisoformat(pod["metadata"]["creationTimestamp"].replace("Z", "+00:00"))
    early = run_pass(kube, "pulling", created + timedelta(seconds=30))
    assert early["phase"] == "Pending" and "retrying for up to 300s" in next(
        c for c in early["conditions"] if c["type"] == "Running")["message"]
    late = run_pass(kube, "pulling", created + timedelta(seconds=301))
    assert late["phase"] == "Failed" and late["failure"]["reason"] in ("ErrImagePull", "ImagePullBackOff")
    assert api.job("pulling-0")["spec"]["suspend"] is True  # type: ignore[index]
    wait_for("no pod holds the GPU", lambda: not api.pods("pulling-0"))


def test_a_served_models_job_outlives_its_ttl(env: tuple[Kube, Api, ScriptedTrainer], kube: KubeCluster) -> None:
    """Decision (issue 26): ttlSecondsAfterFinished does not delete a job whose model is served — deleting it
    would delete the InferenceService it owns. Delete the FineTuneJob to stop serving."""
    kube_, api, trainer = env
    extensions = kubernetes.client.ApiextensionsV1Api(kube.client())
    extensions.create_custom_resource_definition(KSERVE_CRD)
    try:
        wait_for("KServe's API", lambda: "inferenceservices" in kube.run("kubectl", "api-resources").stdout)
        submit(api, "served-ttl", runPolicy={"ttlSecondsAfterFinished": 5}, deploy={"kserve": {}},
               resources={"gpusPerNode": 0})
        run_pass(kube_, "served-ttl", datetime.now(UTC))
        wait_for("the trainer", lambda: trainer.started("served-ttl-0-0"))
        trainer.exit("served-ttl-0-0", 0, {"outcome": "Succeeded", "exitCode": 0})
        wait_for("the Job complete", lambda: (api.job("served-ttl-0") or {}).get("status", {}).get("succeeded"))
        done = run_pass(kube_, "served-ttl", datetime.now(UTC))
        assert done["phase"] == "Succeeded" and done["inferenceService"]["name"] == "served-ttl-model"
        run_pass(kube_, "served-ttl", datetime.now(UTC) + timedelta(seconds=60))
        assert api.ftj("served-ttl") is not None, "the TTL deleted a job whose model is served"
    finally:
        extensions.delete_custom_resource_definition(KSERVE_CRD["metadata"]["name"])


def test_gpu_seconds_add_up_over_attempts_and_outlive_their_pods(env: tuple[Kube, Api, ScriptedTrainer]) -> None:
    """Bug: gpuSeconds counting only the current attempt (or forgetting an attempt whose pods are gone)."""
    kube, api, trainer = env
    submit(api, "cost", runPolicy={"backoffLimit": 2})  # one GPU per pod, on gpu-node
    run_pass(kube, "cost", T0)
    wait_for("the trainer", lambda: trainer.started("cost-0-0"))
    time.sleep(2)  # container times have whole seconds: let attempt 0 hold its GPU for some
    trainer.exit("cost-0-0", 1, {"outcome": "Failed", "exitCode": 1, "message": "boom"})
    wait_for("attempt 0 failed", lambda: job_failed(api, "cost-0"))
    now = datetime.now(UTC) + timedelta(seconds=1)
    run_pass(kube, "cost", now)  # starts attempt 1
    wait_for("the trainer", lambda: trainer.started("cost-1-0"))
    status = run_pass(kube, "cost", now + timedelta(seconds=100))
    first = status["attemptGpuSeconds"]["0"]
    assert first > 0 and status["attemptGpuSeconds"]["1"] > 90
    assert status["gpuSeconds"] == pytest.approx(first + status["attemptGpuSeconds"]["1"], abs=0.2)
    api.batch.delete_namespaced_job("cost-0", NS, propagation_policy="Background")
    wait_for("attempt 0's pods gone", lambda: not api.pods("cost-0"))
    later = run_pass(kube, "cost", now + timedelta(seconds=200))
    assert later["attemptGpuSeconds"]["0"] == first and later["gpuSeconds"] >= status["gpuSeconds"] + 90


class FlakyKube(Kube):
    """The real client, with one API 500 on the next create: the pass fails before it made anything, so no
    watch event will come to start another."""

    fail_next = False

    def create(self, obj: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
        if self.fail_next:
            self.fail_next = False
            raise ApiException(status=500, reason="Internal Server Error")
        return super().create(obj)


def test_a_pass_that_raised_is_tried_again(env: tuple[Kube, Api, ScriptedTrainer], kube: KubeCluster) -> None:
    """Bug: a pass that raised dropped the job: it would never move again without a new event. The operator's
    runtime (watches, work queue, timer; no kopf) with an API 500 on its first create."""
    _, api, trainer = env
    created = submit(api, "flaky", resources={"gpusPerNode": 0})
    runtime = Runtime()
    runtime.settings = SETTINGS
    flaky = FlakyKube(kube.client())
    flaky.fail_next = True
    runtime.launch(flaky)
    try:
        runtime.on_event({"type": "ADDED"}, created)  # what kopf hands on
        wait_for("the failed pass tried again", lambda: (NS, "flaky") in runtime.active and not flaky.fail_next)
        wait_for("the trainer", lambda: trainer.started("flaky-0-0"))  # no new event was needed to get here
        wait_for("Running", lambda: api.status("flaky").get("phase") == "Running")
    finally:
        runtime.shutdown()

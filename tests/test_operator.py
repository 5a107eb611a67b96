"""The real operator process (kopf, its real HTTP client) against the emulated Kubernetes API over HTTP.

The test plays the Job controller and the kubelet: it creates the pods a Job would and writes Job and Pod
statuses as a real cluster would; the operator's FineTuneJob status must follow. One operator per module,
refreshing every second. With KUBETUNE_E2E_KUBECONFIG set, the scenarios that do not need to play the
controller run against that real cluster instead (see test_operator_e2e.py).
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetune import contract
from kubetune.jobfile import job_document
from tests.fixtures_k8s import Cluster
from tests.fixtures_operator import Backend, TrainerEndpoint
from tests.operator_harness import NS, Api, Operator, wait_for

BASE = {
    "model": {"uri": "s3://models/minilm/", "task": "sequence-classification", "labels": ["negative", "positive"]},
    "data": {"train": "s3://data/reviews/train.jsonl"},
    "output": {"uri": "s3://models-out/reviews/"},
    "storage": {"endpoint": "http://minio.storage:9000", "secretRef": "s3-credentials"},
    "resources": {"nodes": 1, "gpusPerNode": 1, "cpu": "1", "memory": "1Gi"},
}


SUBMITTED: list[str] = []


def submit(api: Api, name: str, **overrides: Any) -> dict[str, Any]:
    doc = job_document(name, BASE, overrides)
    doc["metadata"]["namespace"] = NS
    SUBMITTED.append(name)
    return api.apply(doc)


@pytest.fixture(autouse=True)
def _delete_jobs_afterwards(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each scenario cleans up, so the operator's refresh loop does not grow with the module."""
    yield
    if "api" in request.fixturenames:
        api: Api = request.getfixturevalue("api")
        while SUBMITTED:
            name = SUBMITTED.pop()
            if api.ftj(name) is not None:
                api.delete_ftj(name)


def phase(api: Api, name: str) -> str | None:
    return api.status(name).get("phase")


def condition(api: Api, name: str, type_: str) -> dict[str, Any] | None:
    return next((c for c in api.status(name).get("conditions") or [] if c["type"] == type_), None)


def pending_job(api: Api, operator: Operator, name: str, attempt: int = 0) -> dict[str, Any]:
    job: dict[str, Any] = wait_for(f"Job {name}-{attempt}", lambda: api.job(f"{name}-{attempt}"), operator=operator)
    return job


def message(**result: Any) -> str:
    return json.dumps(result)


# ---- scenarios ---------------------------------------------------------------------------------------
def test_children_appear_with_the_right_fields(api: Api, operator: Operator, backend: Backend) -> None:
    cluster = backend.cluster
    before = len(cluster.requests()) if cluster else 0
    created = submit(api, "children")
    job = pending_job(api, operator, "children")
    wait_for("phase Pending", lambda: phase(api, "children") == "Pending", operator=operator)
    uid = created["metadata"]["uid"]
    configmap, service = api.configmap("children-spec"), api.service("children")
    assert configmap and service
    for obj in (configmap, service, job):
        assert obj["metadata"]["ownerReferences"][0]["uid"] == uid
        assert obj["metadata"]["labels"][contract.LABEL_JOB_NAME] == "children"
    assert service["spec"]["clusterIP"] == "None"
    pod = job["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env[contract.ENV_MASTER_ADDR]["value"] == "children-0-0.children.ml.svc"
    assert pod["containers"][0]["image"] == "ghcr.io/kubetune/trainer:test"
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["automountServiceAccountToken"] is False
    assert env[contract.SECRET_ACCESS_KEY_ID]["valueFrom"]["secretKeyRef"]["name"] == "s3-credentials"
    assert condition(api, "children", "Created")["status"] == "True"  # type: ignore[index]
    assert any(e["reason"] == "Pending" for e in api.events("children"))
    # Writes the operator made on creation (the only job so far): ConfigMap, Service, Job, status, one Event;
    # a few refresh passes later there must be no more (nothing changed).
    if cluster:  # only the emulator records requests
        time.sleep(3)
        writes = _writes(cluster, before)
        assert 5 <= len(writes) <= 6, writes


def _writes(cluster: Cluster, since: int) -> list[tuple[str, str]]:
    """Writes since `since`, except the test's own POST of the FineTuneJob."""
    test_post = ("POST", f"/apis/kubetune.io/v1alpha1/namespaces/{NS}/finetunejobs")
    return [(m, p) for m, p in cluster.requests()[since:] if m in ("POST", "PATCH", "PUT", "DELETE")
            and (m, p) != test_post]


@pytest.mark.plays_controller
def test_running_progress_then_success(api: Api, operator: Operator, trainer: TrainerEndpoint) -> None:
    submit(api, "progress")
    pending_job(api, operator, "progress")
    trainer.report("progress", step=5, total=20, loss=0.9)
    pods = api.start_pods("progress-0")
    wait_for("Running with progress", lambda: phase(api, "progress") == "Running"
             and api.status("progress").get("progress", {}).get("step") == 5, operator=operator)
    status = api.status("progress")
    assert status["progress"]["percent"] == 25.0 and status["progress"]["totalSteps"] == 20
    assert status["metrics"]["trainLoss"] == pytest.approx(0.9)
    trainer.report("progress", step=10, total=20, loss=0.5, accuracy=0.8)
    wait_for("progress moving", lambda: api.status("progress")["progress"]["step"] == 10, operator=operator)
    status = api.status("progress")
    assert status["metrics"]["trainLoss"] == pytest.approx(0.5) and status["metrics"]["evalAccuracy"] == 0.8
    assert status["gpuSeconds"] >= 59  # one GPU held since the pod started a minute ago
    result = message(outcome="Succeeded", exitCode=0, step=20, totalSteps=20, outputUri="s3://models-out/reviews/",
                     lastCheckpoint="s3://models-out/reviews/checkpoints/checkpoint-20/",
                     test={"accuracy": 0.85, "f1": 0.84})
    api.terminate(pods[0], 0, result, reason="Completed")
    api.finish_job("progress-0", "Complete")
    wait_for("Succeeded", lambda: phase(api, "progress") == "Succeeded", operator=operator)
    status = api.status("progress")
    assert status["outputUri"] == "s3://models-out/reviews/"
    assert status["lastCheckpoint"].endswith("checkpoint-20/")
    assert status["metrics"]["testAccuracy"] == 0.85 and status["progress"]["percent"] == 100.0
    assert status["completionTime"] and condition(api, "progress", "Succeeded")["status"] == "True"  # type: ignore
    running = condition(api, "progress", "Running")
    assert running["status"] == "False" and running["reason"] == "Completed"  # type: ignore[index]
    reasons = [e["reason"] for e in api.events("progress")]
    assert {"Pending", "Running", "Succeeded"} <= set(reasons)


@pytest.mark.plays_controller
@pytest.mark.parametrize(("case", "expected"), [
    ("oom", "OOMKilled"), ("bad-input", "InvalidInput"), ("deadline", "DeadlineExceeded"),
    ("image", "ImagePullBackOff"),
])
def test_failures_name_a_reason_a_person_can_act_on(api: Api, operator: Operator, case: str, expected: str) -> None:
    name = f"fail-{case}"
    submit(api, name)
    pending_job(api, operator, name)
    if case == "image":
        [pod] = api.start_pods(f"{name}-0", phase="Pending")
        api.set_pod(pod, {"phase": "Pending", "containerStatuses": [{
            "name": "trainer", "ready": False, "restartCount": 0, "image": "x", "imageID": "",
            "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image \"nope:1\""}}}]})
    else:
        [pod] = api.start_pods(f"{name}-0")
        if case == "oom":
            api.terminate(pod, 137, reason="OOMKilled")
            api.finish_job(f"{name}-0", "Failed", "BackoffLimitExceeded")
        elif case == "bad-input":
            api.terminate(pod, 2, message(outcome="Failed", reason="InvalidInput", exitCode=2,
                                          message="spec.data.train: s3://data/reviews/train.jsonl: no such object"))
            api.finish_job(f"{name}-0", "Failed", "PodFailurePolicy")
        else:
            api.terminate(pod, 143, reason="Error")
            api.finish_job(f"{name}-0", "Failed", "DeadlineExceeded", "Job was active longer than specified deadline")
    wait_for(f"Failed {expected}", lambda: api.status(name).get("failure", {}).get("reason") == expected,
             operator=operator)
    status = api.status(name)
    assert status["phase"] == "Failed" and status.get("restarts", 0) == 0
    if case == "bad-input":
        assert "spec.data.train" in status["failure"]["message"] and status["failure"]["exitCode"] == 2
    if case == "image":
        assert "nope:1" in status["failure"]["message"]
    assert [j["metadata"]["name"] for j in api.jobs(name)] == [f"{name}-0"]  # never retried
    assert any(e["type"] == "Warning" and e["reason"] == "Failed" for e in api.events(name))


@pytest.mark.plays_controller
def test_unschedulable_pending_with_the_schedulers_message(api: Api, operator: Operator) -> None:
    submit(api, "unschedulable")
    pending_job(api, operator, "unschedulable")
    [pod] = api.start_pods("unschedulable-0", phase="Pending")
    text = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    api.set_pod(pod, {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": text}]})
    wait_for("Unschedulable", lambda: condition(api, "unschedulable", "Running")["reason"] == "Unschedulable",
             operator=operator)
    assert phase(api, "unschedulable") == "Pending"
    assert condition(api, "unschedulable", "Running")["message"] == text  # type: ignore[index]
    assert any(e["reason"] == "Unschedulable" and e["message"] == text for e in api.events("unschedulable"))


def _operator_metrics(operator: Operator) -> str:
    port = operator.env["KUBETUNE_OPERATOR_METRICS_PORT"]
    return str(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())


@pytest.mark.plays_controller
def test_gang_restart_after_one_worker_fails(api: Api, operator: Operator) -> None:
    submit(api, "gang", resources={"nodes": 2}, runPolicy={"backoffLimit": 1})
    pending_job(api, operator, "gang")
    pods = sorted(api.start_pods("gang-0"))
    api.terminate(pods[1], 1, message(outcome="Failed", exitCode=1, message="RuntimeError: NCCL timeout"))
    api.terminate(pods[0], 143, reason="Error")  # the Job controller stops the rest of the gang
    api.finish_job("gang-0", "Failed", "BackoffLimitExceeded")
    job = pending_job(api, operator, "gang", attempt=1)
    assert job["spec"]["completions"] == 2
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env[contract.ENV_MASTER_ADDR] == "gang-1-0.gang.ml.svc"  # the new gang meets at its own index 0
    wait_for("restart counted", lambda: api.status("gang").get("restarts") == 1, operator=operator)
    status = api.status("gang")
    assert status["budgetUsed"] == 1 and condition(api, "gang", "Restarting")["status"] == "True"  # type: ignore
    assert any(e["reason"] == "GangRestart" for e in api.events("gang"))
    assert 'job="gang"' in _operator_metrics(operator) and contract.METRIC_OP_RESTARTS in _operator_metrics(operator)
    again = sorted(api.start_pods("gang-1"))
    wait_for("Running again", lambda: phase(api, "gang") == "Running", operator=operator)
    assert condition(api, "gang", "Restarting")["status"] == "False"  # type: ignore[index]
    api.terminate(again[0], 1, message(outcome="Failed", exitCode=1, message="RuntimeError: again"))
    api.terminate(again[1], 143)
    api.finish_job("gang-1", "Failed", "BackoffLimitExceeded")
    wait_for("BackoffLimitExceeded", lambda: api.status("gang").get("failure", {}).get("reason") ==
             "BackoffLimitExceeded", operator=operator)
    assert "RuntimeError: again" in api.status("gang")["failure"]["message"]
    assert len(api.jobs("gang")) == 2


@pytest.mark.plays_controller
def test_preemption_restarts_without_spending_the_budget(api: Api, operator: Operator) -> None:
    submit(api, "preempt", runPolicy={"backoffLimit": 0})
    pending_job(api, operator, "preempt")
    [pod] = api.start_pods("preempt-0")
    api.terminate(pod, 75, message(outcome="Preempted", exitCode=75, message="SIGTERM: saved checkpoint-40"),
                  conditions=[{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler",
                               "message": "preempted by a higher-priority pod"}])
    api.finish_job("preempt-0", "Failed", "PodFailurePolicy")
    pending_job(api, operator, "preempt", attempt=1)
    wait_for("restart", lambda: api.status("preempt").get("restarts") == 1, operator=operator)
    status = api.status("preempt")
    assert status["budgetUsed"] == 0 and status["phase"] == "Pending"
    assert condition(api, "preempt", "Restarting")["reason"] == "Preempted"  # type: ignore[index]


@pytest.mark.plays_controller
def test_suspend_and_resume(api: Api, operator: Operator) -> None:
    submit(api, "suspend")
    pending_job(api, operator, "suspend")
    api.start_pods("suspend-0")
    wait_for("Running", lambda: phase(api, "suspend") == "Running", operator=operator)
    api.patch_ftj("suspend", {"spec": {"runPolicy": {"suspend": True}}})
    wait_for("Job suspended", lambda: api.job("suspend-0")["spec"]["suspend"] is True, operator=operator)
    wait_for("Suspended", lambda: phase(api, "suspend") == "Suspended", operator=operator)
    assert condition(api, "suspend", "Suspended")["status"] == "True"  # type: ignore[index]
    api.patch_ftj("suspend", {"spec": {"runPolicy": {"suspend": False}}})
    wait_for("Job resumed", lambda: api.job("suspend-0")["spec"]["suspend"] is False, operator=operator)
    wait_for("not Suspended", lambda: phase(api, "suspend") in ("Pending", "Running"), operator=operator)
    assert condition(api, "suspend", "Suspended")["status"] == "False"  # type: ignore[index]
    assert len(api.jobs("suspend")) == 1  # the same Job resumes; the trainer picks up its checkpoint


def test_spec_change_after_start_is_reported_not_applied(api: Api, operator: Operator) -> None:
    submit(api, "edited")
    pending_job(api, operator, "edited")
    api.patch_ftj("edited", {"spec": {"hyperparameters": {"learningRate": 0.1}}})  # the emulator has no CEL
    wait_for("SpecChanged", lambda: condition(api, "edited", "SpecChanged")["status"] == "True", operator=operator)
    assert len(api.jobs("edited")) == 1


@pytest.mark.plays_controller
def test_stalled_when_the_step_stands_still(api: Api, operator: Operator, trainer: TrainerEndpoint) -> None:
    submit(api, "stalled")
    pending_job(api, operator, "stalled")
    trainer.report("stalled", step=3, total=100, loss=1.0)
    api.start_pods("stalled-0")
    wait_for("Stalled", lambda: condition(api, "stalled", "Stalled")["status"] == "True",
             operator=operator)
    trainer.report("stalled", step=4, total=100, loss=0.9)
    wait_for("not Stalled", lambda: condition(api, "stalled", "Stalled")["status"] == "False", operator=operator)


@pytest.mark.plays_controller
def test_finished_job_never_recreates_children_and_ttl_deletes_it(api: Api, operator: Operator) -> None:
    submit(api, "finished", runPolicy={"ttlSecondsAfterFinished": 3})
    pending_job(api, operator, "finished")
    [pod] = api.start_pods("finished-0")
    api.terminate(pod, 0, message(outcome="Succeeded", exitCode=0), reason="Completed")
    api.finish_job("finished-0", "Complete")
    wait_for("Succeeded", lambda: phase(api, "finished") == "Succeeded", operator=operator)
    api.batch.delete_namespaced_job("finished-0", NS)
    api.core.delete_namespaced_config_map("finished-spec", NS)
    wait_for("TTL deletion", lambda: api.ftj("finished") is None, operator=operator)
    assert api.job("finished-0") is None and api.configmap("finished-spec") is None
    assert api.service("finished") is None  # garbage-collected with its owner


@pytest.mark.plays_controller
def test_deletion_removes_everything_it_made(api: Api, operator: Operator) -> None:
    submit(api, "deleted")
    pending_job(api, operator, "deleted")
    api.start_pods("deleted-0")
    api.delete_ftj("deleted")
    wait_for("children gone", lambda: not api.jobs("deleted") and api.configmap("deleted-spec") is None
             and api.service("deleted") is None and not api.pods("deleted-0"), operator=operator)


MALFORMED: list[tuple[dict[str, Any], str]] = [
    ({"model": {"task": "translation"}}, "spec.model.task"),
    ({"model": {"labels": ["only-one"]}}, "spec.model.labels"),
    ({"model": {"uri": ""}}, "spec.model.uri"),
    ({"model": {"uri": "gs://bucket/x"}}, "spec.model.uri"),
    ({"method": {"type": "dora"}}, "spec.method.type"),
    ({"method": {"type": "partial"}}, "spec.method.partial"),
    ({"method": {"lora": {"r": 0}}}, "spec.method.lora.r"),
    ({"method": {"lora": {"dropout": 1.5}}}, "spec.method.lora.dropout"),
    ({"data": {"train": "s3://B!/x"}}, "spec.data.train"),
    ({"data": {"format": "xml"}}, "spec.data.format"),
    ({"data": {"split": {"train": 0.5, "validation": 0.1, "test": 0.1}}}, "spec.data.split"),
    ({"data": {"maxSeqLength": 2}}, "spec.data.maxSeqLength"),
    ({"hyperparameters": {"learningRate": -1}}, "spec.hyperparameters.learningRate"),
    ({"hyperparameters": {"batchSize": 0}}, "spec.hyperparameters.batchSize"),
    ({"hyperparameters": {"epochs": "many"}}, "spec.hyperparameters.epochs"),
    ({"hyperparameters": {"precision": "int3"}}, "spec.hyperparameters.precision"),
    ({"hyperparameters": {"lr": 0.1}}, "spec.hyperparameters.lr"),
    ({"evaluation": {"metric": "eval_perplexity"}}, "spec.evaluation.metric"),
    ({"checkpoint": {"everySteps": 0}}, "spec.checkpoint.everySteps"),
    ({"output": {"uri": "s3://out/../x"}}, "spec.output.uri"),
    ({"storage": {"endpoint": "minio:9000"}}, "spec.storage.endpoint"),
    ({"resources": {"nodes": 0}}, "spec.resources.nodes"),
    ({"resources": {"gpusPerNode": 100}}, "spec.resources.gpusPerNode"),
    ({"runPolicy": {"backoffLimit": -1}}, "spec.runPolicy.backoffLimit"),
    ({"colour": "blue"}, "spec.colour"),
]


@pytest.mark.plays_controller
def test_malformed_jobs_fail_naming_the_field_while_a_valid_one_runs(api: Api, operator: Operator) -> None:
    assert len(MALFORMED) == 25
    for index, (override, _) in enumerate(MALFORMED):
        submit(api, f"bad-{index}", **override)
    submit(api, "good-beside-bad")
    [pod] = api.start_pods(pending_job(api, operator, "good-beside-bad")["metadata"]["name"])
    api.terminate(pod, 0, message(outcome="Succeeded", exitCode=0), reason="Completed")
    api.finish_job("good-beside-bad-0", "Complete")
    for index, (_, field) in enumerate(MALFORMED):
        name = f"bad-{index}"
        wait_for(f"{name} Failed", lambda n=name: phase(api, n) == "Failed", operator=operator)  # type: ignore[misc]
        failure = api.status(name)["failure"]
        assert failure["reason"] == "InvalidInput" and field in failure["message"], (field, failure)
        assert not api.jobs(name) and api.configmap(f"{name}-spec") is None
        assert condition(api, name, "Validated")["status"] == "False"  # type: ignore[index]
    wait_for("the valid one Succeeded", lambda: phase(api, "good-beside-bad") == "Succeeded", operator=operator)


def test_operator_metrics_and_health(operator_env: dict[str, str], operator: Operator, api: Api) -> None:
    submit(api, "metrics-bad", method={"type": "dora"})
    submit(api, "metrics-ok")
    wait_for("Failed", lambda: phase(api, "metrics-bad") == "Failed", operator=operator)
    url = f"http://127.0.0.1:{operator_env['KUBETUNE_OPERATOR_METRICS_PORT']}/metrics"

    def scraped() -> str:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        failed = f'{contract.METRIC_OP_JOBS}{{namespace="ml",phase="Failed"}}' in text
        return text if failed and f'{contract.METRIC_OP_JOBS}{{namespace="ml",phase="Pending"}}' in text else ""

    text = wait_for("job counts by phase", scraped, operator=operator)
    assert f"{contract.METRIC_OP_CHILDREN}{{kind=\"Job\"}}" in text
    assert f"{contract.METRIC_OP_RECONCILE_SECONDS}_count" in text
    health = urllib.request.urlopen(f"http://127.0.0.1:{operator_env['KUBETUNE_HEALTH_PORT']}/healthz", timeout=5)
    assert health.status == 200


@pytest.mark.plays_controller
def test_operator_killed_mid_job_resumes_without_duplicates(api: Api, operator: Operator) -> None:
    submit(api, "survivor", runPolicy={"backoffLimit": 2})
    pending_job(api, operator, "survivor")
    pods = api.start_pods("survivor-0")
    api.terminate(pods[0], 1, message(outcome="Failed", exitCode=1, message="boom"))
    api.finish_job("survivor-0", "Failed", "BackoffLimitExceeded")
    pending_job(api, operator, "survivor", attempt=1)
    wait_for("restart recorded", lambda: api.status("survivor").get("restarts") == 1, operator=operator)
    operator.kill()
    before = api.status("survivor")
    operator.start()
    [pod] = api.start_pods("survivor-1")
    wait_for("Running after restart", lambda: phase(api, "survivor") == "Running", timeout=60, operator=operator)
    api.terminate(pod, 0, message(outcome="Succeeded", exitCode=0), reason="Completed")
    api.finish_job("survivor-1", "Complete")
    wait_for("Succeeded", lambda: phase(api, "survivor") == "Succeeded", operator=operator)
    status = api.status("survivor")
    assert [j["metadata"]["name"] for j in api.jobs("survivor")] == ["survivor-0", "survivor-1"]
    assert status["restarts"] == before["restarts"] == 1 and status["budgetUsed"] == 1
    assert status["startTime"] == before["startTime"]
    created = [c for c in status["conditions"] if c["type"] == "Created"]
    assert len(created) == 1 and created[0]["lastTransitionTime"] == next(
        c for c in before["conditions"] if c["type"] == "Created")["lastTransitionTime"]
    # Still only one ConfigMap/Service (create-if-missing met 409s after the restart).
    assert api.configmap("survivor-spec") and api.service("survivor")


def test_handlers_module_runs_without_torch() -> None:
    import subprocess
    import sys

    code = "import kubetune_operator.handlers, kubetune_operator.reconcile, sys; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr


ROOT = Path(__file__).resolve().parent.parent

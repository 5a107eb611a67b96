"""The operator on a real control plane: the chart's Deployment (RBAC and admission on every call), the real Job
controller, scheduler and garbage collector, and pods run by the node agent with the scripted trainer image.

The test decides what each trainer pod reports and how it ends (tests/scripted_trainer.py); everything between
— pods created, scheduled, started, stopped, deleted; Jobs failed by their podFailurePolicy — is Kubernetes.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import kubernetes
import pytest
from kubernetes.client.rest import ApiException

from kubetune import contract
from kubetune.jobfile import job_document
from tests.cluster import KubeCluster
from tests.operator_harness import NS, Api, ChartOperator, wait_for
from tests.scripted_trainer import ScriptedTrainer

BASE = {
    "model": {"uri": "s3://models/minilm/", "task": "sequence-classification", "labels": ["negative", "positive"]},
    "data": {"train": "s3://data/reviews/train.jsonl"},
    "output": {"uri": "s3://models-out/reviews/"},
    "storage": {"endpoint": "http://minio.storage:9000", "secretRef": "s3-credentials"},
    "resources": {"nodes": 1, "gpusPerNode": 1, "cpu": "1", "memory": "1Gi"},
}
CPU = {"resources": {"gpusPerNode": 0}}
OPERATOR_USER = "system:serviceaccount:kubetune-system:kubetune-operator"
SUBMITTED: list[str] = []


def submit(api: Api, name: str, **overrides: Any) -> dict[str, Any]:
    doc = job_document(name, BASE, overrides)
    doc["metadata"]["namespace"] = NS
    SUBMITTED.append(name)
    return api.apply(doc)


@pytest.fixture(autouse=True)
def _delete_jobs_afterwards(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each scenario cleans up, so the next one finds the GPU node free."""
    yield
    if "api" in request.fixturenames:
        api: Api = request.getfixturevalue("api")
        while SUBMITTED:
            name = SUBMITTED.pop()
            if api.ftj(name) is not None:
                api.delete_ftj(name)
            wait_for(f"{name}'s pods gone", lambda n=name: not api.core.list_namespaced_pod(  # type: ignore[misc]
                NS, label_selector=f"{contract.LABEL_JOB_NAME}={n}").items, timeout=60)


def phase(api: Api, name: str) -> str | None:
    return api.status(name).get("phase")


def started(trainer: ScriptedTrainer, role: str, operator: ChartOperator) -> dict[str, Any]:
    found: dict[str, Any] = wait_for(f"pod {role} running", lambda: trainer.started(role), operator=operator)
    return found


def result(**fields: Any) -> dict[str, Any]:
    return {"outcome": "Succeeded", "exitCode": 0, **fields}


# ---- children and status -----------------------------------------------------------------------------------
def test_children_appear_with_the_right_fields(api: Api, operator: ChartOperator, kube: KubeCluster) -> None:
    _, since = kube.control_plane.audit()
    # Two GPUs per pod: the one-GPU node cannot take it, so nothing changes once the scheduler has said so.
    created = submit(api, "children", resources={"gpusPerNode": 2})
    wait_for("Unschedulable", lambda: api.condition("children", "Running").get("reason") == "Unschedulable",
             operator=operator)
    uid = created["metadata"]["uid"]
    configmap, service, job = api.configmap("children-spec"), api.service("children"), api.job("children-0")
    assert configmap and service and job
    for obj in (configmap, service, job):
        [owner] = obj["metadata"]["ownerReferences"]
        assert owner["uid"] == uid and owner["blockOwnerDeletion"] is True  # the chart grants finalizers
        assert obj["metadata"]["labels"][contract.LABEL_JOB_NAME] == "children"
    assert service["spec"]["clusterIP"] == "None"
    pod = job["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env[contract.ENV_MASTER_ADDR]["value"] == "children-0-0.children.ml.svc"
    assert pod["containers"][0]["image"] == "kubetune-test/scripted-trainer:1"
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert pod["automountServiceAccountToken"] is False
    # The chart's trainer account lives in its release namespace only: here pods use the namespace's default
    # (the ServiceAccount admission plugin refuses a pod naming an account that does not exist).
    assert pod["serviceAccountName"] == "default"
    assert env[contract.SECRET_ACCESS_KEY_ID]["valueFrom"]["secretKeyRef"]["name"] == "s3-credentials"
    assert api.condition("children", "Created")["status"] == "True"
    assert any(e["reason"] == "Pending" for e in api.events("children"))
    time.sleep(4)  # four refresh passes with nothing new to say
    events, since_settled = kube.control_plane.audit(since)
    mine = [e for e in events if e.user == OPERATOR_USER and e.verb in ("create", "update", "patch", "delete")]
    assert 4 <= len(mine) <= 8, mine  # ConfigMap, Service, Job, status (Pending, Unschedulable), Events
    time.sleep(3)
    later, _ = kube.control_plane.audit(since_settled)
    assert [e for e in later if e.user == OPERATOR_USER and e.verb in ("create", "update", "patch")] == []


def test_running_progress_then_success(api: Api, operator: ChartOperator, trainer: ScriptedTrainer) -> None:
    submit(api, "progress")
    trainer.report("progress-0-0", step=5, total=20, loss=0.9)
    seen = started(trainer, "progress-0-0", operator)
    assert seen["argv"] == ["trainer"] and seen["env"][contract.ENV_NODE_RANK] == "0"
    wait_for("Running with progress", lambda: phase(api, "progress") == "Running"
             and api.status("progress").get("progress", {}).get("step") == 5, operator=operator)
    status = api.status("progress")
    assert status["progress"]["percent"] == 25.0 and status["progress"]["totalSteps"] == 20
    assert status["metrics"]["trainLoss"] == pytest.approx(0.9)
    trainer.report("progress-0-0", step=10, total=20, loss=0.5, eval_loss=0.6, accuracy=0.8)
    wait_for("progress moving", lambda: api.status("progress")["progress"]["step"] == 10, operator=operator)
    status = api.status("progress")
    assert status["metrics"]["trainLoss"] == pytest.approx(0.5) and status["metrics"]["evalAccuracy"] == 0.8
    time.sleep(2)
    trainer.exit("progress-0-0", 0, result(step=20, totalSteps=20, outputUri="s3://models-out/reviews/",
                                           lastCheckpoint="s3://models-out/reviews/checkpoints/checkpoint-20/",
                                           test={"accuracy": 0.85, "f1": 0.84}))
    wait_for("Succeeded", lambda: phase(api, "progress") == "Succeeded", operator=operator)
    status = api.status("progress")
    assert status["outputUri"] == "s3://models-out/reviews/"
    assert status["lastCheckpoint"].endswith("checkpoint-20/")
    assert status["metrics"]["testAccuracy"] == 0.85 and status["progress"]["percent"] == 100.0
    assert status["gpuSeconds"] >= 2  # one GPU held for the seconds the pod ran
    assert status["completionTime"] and api.condition("progress", "Succeeded")["status"] == "True"
    running = api.condition("progress", "Running")
    assert running["status"] == "False" and running["reason"] == "Completed"
    reasons = [e["reason"] for e in api.events("progress")]
    assert {"Pending", "Running", "Succeeded"} <= set(reasons)


def test_the_quality_gate_shows_in_status_and_a_worse_model_is_never_retried(
        api: Api, operator: ChartOperator, trainer: ScriptedTrainer, kube: KubeCluster) -> None:
    """Issue 28: status.quality and the Improved condition (kubectl get ftj -o wide); exit 3 (evaluation.
    minImprovement missed, nothing published) ends the job Failed with reason NotImproved, not a restart."""
    submit(api, "better", **CPU)
    started(trainer, "better-0-0", operator)
    trainer.exit("better-0-0", 0, result(quality={"metric": "accuracy", "base": 0.53, "tuned": 0.85, "delta": 0.32,
                                                  "higherIsBetter": True, "improved": True}))
    wait_for("Improved", lambda: api.condition("better", "Improved").get("status") == "True", operator=operator)
    assert "base 0.5300 -> fine-tuned 0.8500 (+0.3200)" in api.condition("better", "Improved")["message"]
    assert api.status("better")["quality"]["tuned"] == 0.85
    wide = kube.run("kubectl", "get", "ftj", "better", "-n", NS, "-o", "wide").stdout
    assert wide.split()[5] == "IMPROVED" and wide.split()[-1] == "True", wide
    submit(api, "worse", runPolicy={"backoffLimit": 2}, **CPU)
    started(trainer, "worse-0-0", operator)
    said = ("spec.evaluation.minImprovement: the fine-tuned model does not beat the base by 0.05: test accuracy: "
            "base 0.5300 -> fine-tuned 0.5000 (-0.0300, higher is better)")
    trainer.exit("worse-0-0", 3, {"outcome": "Failed", "reason": "NotImproved", "exitCode": 3, "message": said,
                                  "quality": {"metric": "accuracy", "base": 0.53, "tuned": 0.5, "delta": -0.03,
                                              "higherIsBetter": True, "improved": False, "minImprovement": 0.05}})
    wait_for("Failed", lambda: phase(api, "worse") == "Failed", operator=operator)
    status = api.status("worse")
    assert status["failure"] == {"reason": "NotImproved", "message": said, "exitCode": 3}
    assert api.condition("worse", "Improved")["status"] == "False" and status.get("restarts", 0) == 0
    time.sleep(3)
    assert [j["metadata"]["name"] for j in api.jobs("worse")] == ["worse-0"]  # never retried


def test_non_finite_values_never_freeze_status(api: Api, operator: ChartOperator, trainer: ScriptedTrainer) -> None:
    """The API server refuses NaN and Infinity in JSON: such a value must be absent, and status keep moving."""
    submit(api, "nan", **CPU)
    trainer.raw_metrics("nan-0-0", {contract.METRIC_STEP: 3, contract.METRIC_TOTAL_STEPS: 10,
                                    contract.METRIC_TRAIN_LOSS: math.nan, contract.METRIC_EVAL_LOSS: math.inf})
    wait_for("step 3 with no loss", lambda: api.status("nan").get("progress", {}).get("step") == 3,
             operator=operator)
    assert "trainLoss" not in (api.status("nan").get("metrics") or {})
    trainer.raw_metrics("nan-0-0", {contract.METRIC_STEP: 4, contract.METRIC_TOTAL_STEPS: 10,
                                    contract.METRIC_TRAIN_LOSS: math.nan})
    wait_for("step 4", lambda: api.status("nan")["progress"]["step"] == 4, operator=operator)
    # Python's json writes NaN as the trainer's termination message would carry it.
    trainer.exit("nan-0-0", 0, json.dumps(result(step=10, totalSteps=10, test={"loss": math.nan, "accuracy": 0.7})))
    wait_for("Succeeded", lambda: phase(api, "nan") == "Succeeded", operator=operator)
    metrics = api.status("nan")["metrics"]
    assert metrics["testAccuracy"] == 0.7 and "testLoss" not in metrics


@pytest.mark.parametrize(("case", "expected"), [
    ("bad-input", "InvalidInput"), ("deadline", "DeadlineExceeded"), ("image", "ErrImagePull"),
])
def test_failures_name_a_reason_a_person_can_act_on(api: Api, operator: ChartOperator, trainer: ScriptedTrainer,
                                                     case: str, expected: str) -> None:
    name = f"fail-{case}"
    if case == "image":
        submit(api, name, image="registry.example.com/nope:1", **CPU)
    elif case == "deadline":
        submit(api, name, runPolicy={"activeDeadlineSeconds": 3}, **CPU)  # the Job controller enforces it
    else:
        submit(api, name, **CPU)
        started(trainer, f"{name}-0-0", operator)
        trainer.exit(f"{name}-0-0", 2, {"outcome": "Failed", "reason": "InvalidInput", "exitCode": 2,
                                        "message": "spec.data.train: s3://data/reviews/train.jsonl: no such object"})
    wait_for(f"Failed {expected}", lambda: api.status(name).get("phase") == "Failed", timeout=60, operator=operator)
    status = api.status(name)
    assert status["failure"]["reason"] in {expected, "ImagePullBackOff"} and status.get("restarts", 0) == 0, status
    if case == "bad-input":
        assert "spec.data.train" in status["failure"]["message"] and status["failure"]["exitCode"] == 2
    if case == "image":
        assert "registry.example.com/nope:1" in status["failure"]["message"]
    assert [j["metadata"]["name"] for j in api.jobs(name)] == [f"{name}-0"]  # never retried
    assert any(e["type"] == "Warning" and e["reason"] == "Failed" for e in api.events(name))


def test_unschedulable_pending_with_the_schedulers_message(api: Api, operator: ChartOperator) -> None:
    submit(api, "unschedulable", resources={"gpusPerNode": 4})
    wait_for("Unschedulable", lambda: api.condition("unschedulable", "Running").get("reason") == "Unschedulable",
             operator=operator)
    assert phase(api, "unschedulable") == "Pending"
    text = api.condition("unschedulable", "Running")["message"]
    assert "Insufficient nvidia.com/gpu" in text and text.startswith("0/2 nodes are available"), text
    assert any(e["reason"] == "Unschedulable" and e["message"] == text for e in api.events("unschedulable"))


# ---- restarts ----------------------------------------------------------------------------------------------
def test_gang_restart_after_one_worker_fails(api: Api, operator: ChartOperator, trainer: ScriptedTrainer) -> None:
    submit(api, "gang", resources={"nodes": 2, "gpusPerNode": 0}, runPolicy={"backoffLimit": 1})
    started(trainer, "gang-0-0", operator)
    started(trainer, "gang-0-1", operator)
    trainer.exit("gang-0-1", 1, {"outcome": "Failed", "exitCode": 1, "message": "RuntimeError: NCCL timeout"})
    job = wait_for("attempt 1", lambda: api.job("gang-1"), operator=operator)
    assert trainer.ended("gang-0-0"), "the Job controller stops the rest of the failed gang first"
    assert job["spec"]["completions"] == 2
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env[contract.ENV_MASTER_ADDR] == "gang-1-0.gang.ml.svc"  # the new gang meets at its own index 0
    wait_for("restart counted", lambda: api.status("gang").get("restarts") == 1, operator=operator)
    status = api.status("gang")
    assert status["budgetUsed"] == 1 and api.condition("gang", "Restarting")["status"] == "True"
    assert "RuntimeError: NCCL timeout" in api.condition("gang", "Restarting")["message"]
    assert "rank 1 (pod gang-0-1-" in api.condition("gang", "Restarting")["message"]
    assert any(e["reason"] == "GangRestart" for e in api.events("gang"))
    assert 'job="gang"' in operator.metrics()
    started(trainer, "gang-1-0", operator)
    started(trainer, "gang-1-1", operator)
    wait_for("Running again", lambda: phase(api, "gang") == "Running", operator=operator)
    assert api.condition("gang", "Restarting")["status"] == "False"
    trainer.exit("gang-1-0", 1, {"outcome": "Failed", "exitCode": 1, "message": "RuntimeError: again"})
    wait_for("BackoffLimitExceeded", lambda: api.status("gang").get("failure", {}).get("reason") ==
             "BackoffLimitExceeded", operator=operator)
    assert "RuntimeError: again" in api.status("gang")["failure"]["message"]
    assert len(api.jobs("gang")) == 2


def test_a_killed_trainer_is_described_by_its_exit_and_its_logs_end(
        api: Api, operator: ChartOperator, trainer: ScriptedTrainer) -> None:
    """Issue 26: after `kill -9` the restart says exit 137 (SIGKILL), which rank, and the end of its log in whole
    lines (it was the log's first kilobyte, starting mid-word)."""
    submit(api, "killed", runPolicy={"backoffLimit": 2}, **CPU)
    started(trainer, "killed-0-0", operator)
    log = "\n".join(f"step {i}: loss 0.{i:04d} and some more words to fill the line up" for i in range(80))
    trainer.exit("killed-0-0", 137, log=log + "\nlast words before the kill", signal=9)
    wait_for("the restart", lambda: api.condition("killed", "Restarting").get("status") == "True",
             operator=operator)
    text = api.condition("killed", "Restarting")["message"]
    assert "rank 0 (pod killed-0-0-" in text and "exited 137 (SIGKILL)" in text, text
    assert "last words before the kill" in text and "step 0:" not in text, text
    event = next(e for e in api.events("killed") if e["reason"] == "GangRestart")
    assert "exited 137 (SIGKILL)" in event["message"] and len(event["message"]) <= 1024


def test_old_attempts_are_removed_but_their_cost_is_kept(api: Api, operator: ChartOperator,
                                                         trainer: ScriptedTrainer) -> None:
    """Issue 26: a job restarted many times keeps its newest three attempts' Jobs (and pods), not all of them."""
    submit(api, "churn", runPolicy={"backoffLimit": 5}, **CPU)
    for attempt in range(4):
        started(trainer, f"churn-{attempt}-0", operator)
        time.sleep(1.1)  # a second of CPU held per attempt (container times have whole seconds)
        trainer.exit(f"churn-{attempt}-0", 1, {"outcome": "Failed", "exitCode": 1, "message": f"boom {attempt}"})
    started(trainer, "churn-4-0", operator)
    wait_for("attempt 0 removed", lambda: api.job("churn-0") is None and api.job("churn-1") is None,
             operator=operator)
    assert [j["metadata"]["name"] for j in api.jobs("churn")] == ["churn-2", "churn-3", "churn-4"]
    wait_for("its pods gone", lambda: not api.pods("churn-0"), operator=operator)
    status = api.status("churn")
    assert status["restarts"] == 4 and set(status["attemptGpuSeconds"]) >= {"0", "1", "2", "3"}


def test_a_new_gang_waits_for_the_old_one_to_stop(api: Api, operator: ChartOperator,
                                                   trainer: ScriptedTrainer) -> None:
    """Pod 1 fails; pod 0 takes its time over SIGTERM (a checkpoint upload): no overlap of two gangs."""
    submit(api, "overlap", resources={"nodes": 2, "gpusPerNode": 0}, runPolicy={"backoffLimit": 2})
    started(trainer, "overlap-0-0", operator)
    started(trainer, "overlap-0-1", operator)
    trainer.on_sigterm("overlap-0-0", None)  # it keeps running through SIGTERM...
    trainer.exit("overlap-0-1", 1, {"outcome": "Failed", "exitCode": 1, "message": "boom"})
    # The Job controller marks the Job FailureTarget, stops the other pods, and adds Failed once they all ended.
    wait_for("the Job failing", lambda: any(c["type"] == "FailureTarget" for c in (api.job("overlap-0") or {}).get(
        "status", {}).get("conditions") or []), operator=operator)
    time.sleep(4)
    assert api.job("overlap-1") is None, "a new gang started while the old one's pod 0 still ran"
    assert api.condition("overlap", "Running").get("reason") == "Stopping"
    trainer.exit("overlap-0-0", 143)  # ... until it finishes
    wait_for("attempt 1", lambda: api.job("overlap-1"), operator=operator)


def evict(api: Api, role: str) -> None:
    """A node drain's eviction: the API server marks the pod DisruptionTarget and deletes it."""
    [pod] = [p for p in api.core.list_namespaced_pod(NS).items if p.spec.hostname == role]
    api.core.create_namespaced_pod_eviction(pod.metadata.name, NS, {
        "metadata": {"name": pod.metadata.name, "namespace": NS}})


@pytest.mark.parametrize("how", ["eviction", "exit-75"])
def test_disruption_restarts_without_spending_the_budget(api: Api, operator: ChartOperator,
                                                         trainer: ScriptedTrainer, how: str) -> None:
    """backoffLimit 0: a preemption must not fail the job. The Job controller deletes the pods of a failed Job,
    so the cause is read from the Job's Failed condition (the podFailurePolicy rule that matched)."""
    name = f"preempt-{how}"
    submit(api, name, runPolicy={"backoffLimit": 0}, **CPU)
    role = f"{name}-0-0"
    started(trainer, role, operator)
    checkpointed = {"outcome": "Preempted", "exitCode": 75, "message": "SIGTERM: saved checkpoint-40"}
    if how == "eviction":
        trainer.on_sigterm(role, 75, checkpointed)
        evict(api, role)
    else:  # a spot reclaim's SIGTERM reached the trainer directly: no DisruptionTarget on the pod
        trainer.exit(role, 75, checkpointed)
    wait_for("attempt 1", lambda: api.job(f"{name}-1"), operator=operator)
    failed = next(c for c in api.job(f"{name}-0")["status"]["conditions"] if c["type"] == "Failed")  # type: ignore
    assert failed["reason"] == "PodFailurePolicy", failed
    wait_for("restart", lambda: api.status(name).get("restarts") == 1, operator=operator)
    status = api.status(name)
    assert status["budgetUsed"] == 0 and status["phase"] in ("Pending", "Running")
    assert api.condition(name, "Restarting")["reason"] == "Preempted"
    started(trainer, f"{name}-1-0", operator)


def test_suspend_and_resume(api: Api, operator: ChartOperator, trainer: ScriptedTrainer) -> None:
    submit(api, "suspend", **CPU)
    started(trainer, "suspend-0-0", operator)
    trainer.on_sigterm("suspend-0-0", 75, {"outcome": "Preempted", "exitCode": 75, "message": "saved"})
    wait_for("Running", lambda: phase(api, "suspend") == "Running", operator=operator)
    api.patch_ftj("suspend", {"spec": {"runPolicy": {"suspend": True}}})
    wait_for("Suspended", lambda: phase(api, "suspend") == "Suspended", operator=operator)
    assert api.job("suspend-0")["spec"]["suspend"] is True  # type: ignore[index]
    wait_for("the pod stopped", lambda: trainer.ended("suspend-0-0"), operator=operator)
    assert api.condition("suspend", "Suspended")["status"] == "True"
    (trainer.folder / "suspend-0-0.started").unlink()
    api.patch_ftj("suspend", {"spec": {"runPolicy": {"suspend": False}}})
    started(trainer, "suspend-0-0", operator)  # the same Job, a new pod: the trainer resumes its checkpoint
    wait_for("Running again", lambda: phase(api, "suspend") == "Running", operator=operator)
    assert api.condition("suspend", "Suspended")["status"] == "False"
    assert len(api.jobs("suspend")) == 1


def test_spec_is_immutable_once_started_except_suspend(api: Api, operator: ChartOperator) -> None:
    """The CRD's CEL rule: the API server itself refuses an edit of a started job, naming the way out."""
    submit(api, "edited", resources={"gpusPerNode": 2})
    wait_for("startTime", lambda: api.status("edited").get("startTime"), operator=operator)
    with pytest.raises(ApiException) as refused:
        api.patch_ftj("edited", {"spec": {"hyperparameters": {"learningRate": 0.1}}})
    assert refused.value.status == 422 and "delete and recreate" in refused.value.body
    api.patch_ftj("edited", {"spec": {"runPolicy": {"suspend": True}}})
    wait_for("Suspended", lambda: phase(api, "edited") == "Suspended", operator=operator)
    assert api.condition("edited", "SpecChanged").get("status") != "True"


def test_stalled_when_the_step_stands_still(api: Api, operator: ChartOperator, trainer: ScriptedTrainer) -> None:
    submit(api, "stalled", **CPU)
    trainer.report("stalled-0-0", step=3, total=100, loss=1.0)
    wait_for("Stalled", lambda: api.condition("stalled", "Stalled").get("status") == "True", operator=operator)
    trainer.report("stalled-0-0", step=4, total=100, loss=0.9)
    wait_for("not Stalled", lambda: api.condition("stalled", "Stalled")["status"] == "False", operator=operator)


# ---- deletion, garbage collection, same names again --------------------------------------------------------
def test_finished_job_never_recreates_children_and_ttl_deletes_it(api: Api, operator: ChartOperator,
                                                                   trainer: ScriptedTrainer) -> None:
    submit(api, "finished", runPolicy={"ttlSecondsAfterFinished": 4}, **CPU)
    started(trainer, "finished-0-0", operator)
    trainer.exit("finished-0-0", 0, result())
    wait_for("Succeeded", lambda: phase(api, "finished") == "Succeeded", operator=operator)
    api.batch.delete_namespaced_job("finished-0", NS, propagation_policy="Background")
    api.core.delete_namespaced_config_map("finished-spec", NS)
    wait_for("TTL deletion", lambda: api.ftj("finished") is None, operator=operator)
    assert api.job("finished-0") is None and api.configmap("finished-spec") is None
    wait_for("the Service garbage-collected", lambda: api.service("finished") is None, operator=operator)


def test_deletion_removes_everything_it_made(api: Api, operator: ChartOperator, trainer: ScriptedTrainer) -> None:
    submit(api, "deleted", **CPU)
    started(trainer, "deleted-0-0", operator)
    api.delete_ftj("deleted")
    wait_for("children gone", lambda: not api.jobs("deleted") and api.configmap("deleted-spec") is None
             and api.service("deleted") is None and not api.pods("deleted-0"), timeout=60, operator=operator)
    assert trainer.ended("deleted-0-0")  # stopped by SIGTERM when the garbage collector deleted its pod


def test_a_job_created_again_under_its_name_never_adopts_the_old_ones_children(
        api: Api, operator: ChartOperator, trainer: ScriptedTrainer) -> None:
    """`kubectl delete` returns before the garbage collector removes the children: a new FineTuneJob of the
    same name must neither take the old Complete Job for its own nor keep the old spec."""
    submit(api, "reborn", **CPU)
    started(trainer, "reborn-0-0", operator)
    trainer.exit("reborn-0-0", 0, result(outputUri="s3://models-out/old/"))
    wait_for("Succeeded", lambda: phase(api, "reborn") == "Succeeded", operator=operator)
    old_job = api.job("reborn-0")
    assert old_job is not None
    # Orphan the children for a moment, as a slow garbage collector would leave them.
    api.custom.delete_namespaced_custom_object(contract.API_GROUP, contract.API_VERSION, NS, contract.PLURAL,
                                               "reborn", propagation_policy="Orphan")
    wait_for("gone", lambda: api.ftj("reborn") is None)
    (trainer.folder / "reborn-0-0.started").unlink()
    (trainer.folder / "reborn-0-0.exit.json").unlink()
    submit(api, "reborn", hyperparameters={"learningRate": 0.01}, **CPU)
    wait_for("waiting for the old children", lambda: api.condition("reborn", "Running").get("reason") ==
             "WaitingForOldChildren", operator=operator)
    assert phase(api, "reborn") == "Pending"
    api.batch.delete_namespaced_job("reborn-0", NS, propagation_policy="Background")
    api.core.delete_namespaced_config_map("reborn-spec", NS)
    api.core.delete_namespaced_service("reborn", NS)
    started(trainer, "reborn-0-0", operator)
    assert "0.01" in api.configmap("reborn-spec")["data"]["spec.yaml"]  # type: ignore[index]
    assert phase(api, "reborn") in ("Pending", "Running")


# ---- what admission refuses --------------------------------------------------------------------------------
def test_a_refused_create_is_a_condition_in_the_servers_words(api: Api, operator: ChartOperator,
                                                                kube: KubeCluster) -> None:
    """A namespace quota that allows no GPUs: the Job is created, its pods are refused (FailedCreate events on
    the Job); a quota on Jobs refuses the Job itself. Both show in status, not as 'waiting for pods'."""
    quotas = kubernetes.client.CoreV1Api(kube.client())
    quotas.create_namespaced_resource_quota(NS, {"metadata": {"name": "no-gpus"},
                                                 "spec": {"hard": {"requests.nvidia.com/gpu": "0"}}})
    try:
        submit(api, "over-quota")
        wait_for("FailedCreate", lambda: api.condition("over-quota", "Running").get("reason") == "FailedCreate",
                 operator=operator)
        message = api.condition("over-quota", "Running")["message"]
        assert "exceeded quota: no-gpus" in message and "requests.nvidia.com/gpu" in message, message
        assert any(e["type"] == "Warning" and e["reason"] == "FailedCreate" for e in api.events("over-quota"))
        quotas.create_namespaced_resource_quota(NS, {"metadata": {"name": "no-jobs"},
                                                     "spec": {"hard": {"count/jobs.batch": "1"}}})
        wait_for("the quota counted", lambda: (quotas.read_namespaced_resource_quota("no-jobs", NS).status.used
                                               or {}).get("count/jobs.batch") == "1")
        submit(api, "no-room", **CPU)
        wait_for("CreateRefused", lambda: api.condition("no-room", "Running").get("reason") == "CreateRefused",
                 operator=operator)
        message = api.condition("no-room", "Running")["message"]
        assert message.startswith("Job no-room-0 refused by the API server") and "exceeded quota" in message
        assert phase(api, "no-room") == "Pending"
    finally:
        for name in ("no-gpus", "no-jobs"):
            with contextlib.suppress(ApiException):
                quotas.delete_namespaced_resource_quota(name, NS)


MALFORMED: list[tuple[dict[str, Any], str]] = [
    ({"model": {"task": "translation"}}, "spec.model.task"),
    ({"model": {"labels": ["only-one"]}}, "model.labels"),
    ({"model": {"uri": ""}}, "spec.model.uri"),
    ({"model": {"uri": "gs://bucket/x"}}, "spec.model.uri"),
    ({"method": {"type": "dora"}}, "spec.method.type"),
    ({"method": {"type": "partial"}}, "method.partial"),
    ({"method": {"lora": {"r": 0}}}, "spec.method.lora.r"),
    ({"method": {"lora": {"dropout": 1.5}}}, "spec.method.lora.dropout"),
    ({"data": {"train": "s3://B!/x"}}, "spec.data.train"),
    ({"data": {"format": "xml"}}, "spec.data.format"),
    ({"data": {"split": {"train": 0.5, "validation": 0.1, "test": 0.1}}}, "data.split"),
    ({"data": {"maxSeqLength": 2}}, "spec.data.maxSeqLength"),
    ({"hyperparameters": {"learningRate": -1}}, "spec.hyperparameters.learningRate"),
    ({"hyperparameters": {"batchSize": 0}}, "spec.hyperparameters.batchSize"),
    ({"hyperparameters": {"epochs": "many"}}, "spec.hyperparameters.epochs"),
    ({"hyperparameters": {"precision": "int3"}}, "spec.hyperparameters.precision"),
    ({"hyperparameters": {"lr": 0.1}}, "spec.hyperparameters.lr"),
    ({"evaluation": {"metric": "eval_perplexity"}}, "evaluation.metric"),
    ({"checkpoint": {"everySteps": 0}}, "spec.checkpoint.everySteps"),
    ({"output": {"uri": "s3://out/../x"}}, "spec.output.uri"),
    ({"storage": {"endpoint": "minio:9000"}}, "spec.storage.endpoint"),
    ({"resources": {"nodes": 0}}, "spec.resources.nodes"),
    ({"resources": {"gpusPerNode": 100}}, "spec.resources.gpusPerNode"),
    ({"resources": {"memory": "32GB"}}, "spec.resources.memory"),
    ({"resources": {"cpu": "eight"}}, "spec.resources.cpu"),
    ({"resources": {"nodeSelector": {"pool": "gpu nodes"}}}, "spec.resources.nodeSelector"),
    ({"runPolicy": {"backoffLimit": -1}}, "spec.runPolicy.backoffLimit"),
    ({"colour": "blue"}, "spec.colour"),
]


def test_malformed_jobs_are_refused_naming_the_field_while_a_valid_one_runs(
        api: Api, operator: ChartOperator, trainer: ScriptedTrainer) -> None:
    """Each mistake is refused naming its field: by the API server at create (schema, CEL, strict field
    validation as kubectl sends it), or, for what only the spec model knows, by the operator (InvalidInput)."""
    refused, failed = [], []
    for index, (override, field) in enumerate(MALFORMED):
        doc = job_document(f"bad-{index}", BASE, override)
        doc["metadata"]["namespace"] = NS
        try:
            api.custom.create_namespaced_custom_object(contract.API_GROUP, contract.API_VERSION, NS, contract.PLURAL,
                                                       doc, field_validation="Strict")
        except ApiException as exc:
            # 422 from the schema and rules, 400 from strict decoding (an unknown field)
            assert exc.status in (400, 422) and field.removeprefix("spec.") in exc.body, (field, exc.body)
            refused.append(field)
            continue
        SUBMITTED.append(f"bad-{index}")
        failed.append((f"bad-{index}", field))
    submit(api, "good-beside-bad", **CPU)
    started(trainer, "good-beside-bad-0-0", operator)
    trainer.exit("good-beside-bad-0-0", 0, result())
    for name, field in failed:
        wait_for(f"{name} Failed", lambda n=name: phase(api, n) == "Failed", operator=operator)  # type: ignore[misc]
        failure = api.status(name)["failure"]
        assert failure["reason"] == "InvalidInput" and field in failure["message"], (field, failure)
        assert not api.jobs(name) and api.configmap(f"{name}-spec") is None
        assert api.condition(name, "Validated")["status"] == "False"
    wait_for("the valid one Succeeded", lambda: phase(api, "good-beside-bad") == "Succeeded", operator=operator)
    assert len(refused) >= 20, (refused, failed)  # the server's schema catches most before any pod


# ---- the operator itself -----------------------------------------------------------------------------------
def test_operator_metrics_and_health(operator: ChartOperator, api: Api) -> None:
    submit(api, "metrics-bad", method={"type": "lora", "lora": {"targetModules": []}}, **CPU)
    submit(api, "metrics-ok", resources={"gpusPerNode": 2})
    wait_for("two jobs counted", lambda: 'phase="Pending"' in operator.metrics(), operator=operator)
    text = operator.metrics()
    assert f'{contract.METRIC_OP_CHILDREN}{{kind="Job"}}' in text
    assert f"{contract.METRIC_OP_RECONCILE_SECONDS}_count" in text
    pod = operator.wait_ready()
    health = f"http://{pod['status']['podIP']}:8080/healthz"  # the chart's default healthPort
    assert urllib.request.urlopen(health, timeout=5).status == 200


def test_operator_killed_mid_job_resumes_without_duplicates(api: Api, operator: ChartOperator,
                                                            trainer: ScriptedTrainer) -> None:
    submit(api, "survivor", runPolicy={"backoffLimit": 2}, **CPU)
    started(trainer, "survivor-0-0", operator)
    trainer.exit("survivor-0-0", 1, {"outcome": "Failed", "exitCode": 1, "message": "boom"})
    wait_for("restart recorded", lambda: api.status("survivor").get("restarts") == 1, operator=operator)
    before = api.status("survivor")
    killed = {p["metadata"]["name"] for p in operator.pods()}
    operator.kill()
    wait_for("a new operator pod", lambda: any(p["metadata"]["name"] not in killed for p in operator.pods()
                                               if not p["metadata"].get("deletionTimestamp")), operator=operator)
    operator.wait_ready()
    started(trainer, "survivor-1-0", operator)
    wait_for("Running after restart", lambda: phase(api, "survivor") == "Running", timeout=60, operator=operator)
    trainer.exit("survivor-1-0", 0, result())
    wait_for("Succeeded", lambda: phase(api, "survivor") == "Succeeded", operator=operator)
    status = api.status("survivor")
    assert [j["metadata"]["name"] for j in api.jobs("survivor")] == ["survivor-0", "survivor-1"]
    assert status["restarts"] == before["restarts"] == 1 and status["budgetUsed"] == 1
    assert status["startTime"] == before["startTime"]
    created = [c for c in status["conditions"] if c["type"] == "Created"]
    assert len(created) == 1 and created[0]["lastTransitionTime"] == next(
        c for c in before["conditions"] if c["type"] == "Created")["lastTransitionTime"]


def test_a_job_that_ends_while_the_operator_is_down_gets_its_final_figures(
        api: Api, operator: ChartOperator, trainer: ScriptedTrainer, kube: KubeCluster) -> None:
    """Issue 26: final figures from the termination message, times from the Job's own record, not from when an
    operator came back; test results once (testAccuracy), never also as evalTestAccuracy."""
    submit(api, "offline", **CPU)
    started(trainer, "offline-0-0", operator)
    trainer.raw_metrics("offline-0-0", {contract.METRIC_STEP: 8, contract.METRIC_TOTAL_STEPS: 70,
                                        contract.METRIC_EPOCH: 0.61, contract.METRIC_TRAIN_LOSS: 0.98765,
                                        contract.METRIC_EVAL: {"test_accuracy": 0.5}})
    wait_for("step 8", lambda: api.status("offline").get("progress", {}).get("step") == 8, operator=operator)
    assert "evalTestAccuracy" not in api.status("offline").get("metrics", {})
    assert api.status("offline")["metrics"]["trainLoss"] == 0.9877  # rounded for the LOSS column
    kube.run("kubectl", "scale", "deployment/kubetune-operator", "-n", operator.namespace, "--replicas=0")
    wait_for("no operator", lambda: not operator.pods())
    trainer.exit("offline-0-0", 0, result(step=70, totalSteps=70, test={"accuracy": 0.9}, final={
        "trainLoss": 0.0561, "epoch": 5, "validation": {"eval_loss": 0.31, "eval_accuracy": 0.88}}))
    wait_for("the Job complete", lambda: (api.job("offline-0") or {}).get("status", {}).get("completionTime"))
    ended = api.job("offline-0")["status"]["completionTime"]  # type: ignore[index]
    time.sleep(3)
    kube.run("kubectl", "scale", "deployment/kubetune-operator", "-n", operator.namespace, "--replicas=1")
    operator.wait_ready()
    wait_for("Succeeded", lambda: phase(api, "offline") == "Succeeded", operator=operator)
    status = api.status("offline")
    assert datetime.fromisoformat(status["completionTime"].replace("Z", "+00:00")) == datetime.fromisoformat(ended)
    assert status["metrics"] == {"trainLoss": 0.0561, "evalLoss": 0.31, "evalAccuracy": 0.88, "testAccuracy": 0.9}
    assert status["progress"] == {"step": 70, "totalSteps": 70, "epoch": 5, "percent": 100.0, "etaSeconds": 0.0}


def test_handlers_module_runs_without_torch() -> None:
    import subprocess
    import sys

    code = "import kubetune_operator.handlers, kubetune_operator.reconcile, sys; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr

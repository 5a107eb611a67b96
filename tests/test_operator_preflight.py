"""The operator's first step on a cluster: a CPU-only pre-flight Job (`kubetune validate --deep`) before GPUs.

Same real operator process and emulated API as tests/test_operator.py, with KUBETUNE_PREFLIGHT on; the
test plays the Job controller and kubelet for the pre-flight pod.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from kubetune import contract
from kubetune.jobfile import job_document
from tests.operator_harness import NS, Api, Operator, now, wait_for
from tests.pss import restricted_violations
from tests.test_operator import BASE as OPERATOR_BASE

pytestmark = pytest.mark.plays_controller
BASE = {**OPERATOR_BASE, "resources": {"nodes": 2, "gpusPerNode": 8, "cpu": "8", "memory": "64Gi"}}


@pytest.fixture(scope="module")
def operator_env(operator_env: dict[str, str]) -> dict[str, str]:
    return {**operator_env, "KUBETUNE_PREFLIGHT": "true"}


def submit(api: Api, name: str, **spec: Any) -> None:
    doc = job_document(name, BASE, spec)
    doc["metadata"]["namespace"] = NS
    api.apply(doc)


def condition(api: Api, name: str, type_: str) -> dict[str, Any]:
    return next((c for c in api.status(name).get("conditions") or [] if c["type"] == type_), {})


def preflight_pod(api: Api, operator: Operator, name: str) -> str:
    job = wait_for(f"Job {name}-preflight", lambda: api.job(f"{name}-preflight"), operator=operator)
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["kubetune", "validate", "--deep", contract.SPEC_MOUNT_PATH]
    assert "nvidia.com/gpu" not in str(container["resources"])  # never holds a GPU
    assert pod["automountServiceAccountToken"] is False and restricted_violations(pod) == []
    assert {e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "valueFrom" in e} == {"s3-credentials"}
    assert api.job(f"{name}-0") is None, "the GPU Job must wait for the pre-flight"
    wait_for("phase Pending", lambda: api.status(name).get("phase") == "Pending", operator=operator)
    [started] = api.start_pods(f"{name}-preflight")
    return started


def test_a_failing_preflight_never_gets_a_gpu_job(api: Api, operator: Operator) -> None:
    submit(api, "pf-bad")
    pod = preflight_pod(api, operator, "pf-bad")
    problem = "error: spec.data.train: s3://data/reviews/train.jsonl: bucket 'data' does not exist"
    api.terminate(pod, contract.EXIT_BAD_INPUT, message=problem)  # FallbackToLogsOnError: the log lines
    api.finish_job("pf-bad-preflight", "Failed", "BackoffLimitExceeded")
    wait_for("phase Failed", lambda: api.status("pf-bad").get("phase") == "Failed", operator=operator)
    failure = api.status("pf-bad")["failure"]
    assert failure["reason"] == "InvalidInput" and "spec.data.train" in failure["message"]
    assert condition(api, "pf-bad", "Validated")["status"] == "False"
    time.sleep(3)  # a few refresh passes: still no GPU Job
    assert api.job("pf-bad-0") is None
    api.delete_ftj("pf-bad")


def test_a_passing_preflight_proceeds_to_the_gpu_job(api: Api, operator: Operator) -> None:
    submit(api, "pf-good", deploy={"kserve": {"gpus": 1}})
    pod = preflight_pod(api, operator, "pf-good")
    api.terminate(pod, 0)
    api.finish_job("pf-good-preflight", "Complete")
    job = wait_for("Job pf-good-0", lambda: api.job("pf-good-0"), operator=operator)
    assert job["spec"]["completions"] == 2
    validated = wait_for("Validated=True", lambda: condition(api, "pf-good", "Validated").get("status") == "True"
                         and condition(api, "pf-good", "Validated"), operator=operator)
    assert validated["reason"] == "PreflightPassed"
    # Trained: spec.deploy.kserve asks for an InferenceService; this API has no KServe, which a condition says.
    for pod in api.start_pods("pf-good-0"):
        api.terminate(pod, 0, '{"outcome": "Succeeded", "exitCode": 0}', reason="Completed")
    api.finish_job("pf-good-0", "Complete")
    deployed = wait_for("Deployed condition", lambda: condition(api, "pf-good", "Deployed"), operator=operator)
    assert api.status("pf-good")["phase"] == "Succeeded"
    assert deployed["status"] == "False" and deployed["reason"] == "KServeNotInstalled"
    api.delete_ftj("pf-good")


def test_a_succeeded_job_is_served_where_kserve_is_installed(api: Api, operator: Operator, backend: Any) -> None:
    import kmock

    from kubetune_operator import serving

    # KServe "installed": the emulator now serves its resource (a real cluster would after `kubectl apply` of KServe).
    resource = kmock.resource(serving.KSERVE_GROUP, serving.KSERVE_VERSION, serving.INFERENCE_SERVICES)
    backend.cluster.emulator.resources[resource] = kmock.ResourceInfo(
        kind=serving.INFERENCE_SERVICE, namespaced=True, verbs={"get", "list", "create", "delete", "patch"},
        subresources={"status"})
    submit(api, "served", deploy={"kserve": {}})
    api.terminate(preflight_pod(api, operator, "served"), 0)
    api.finish_job("served-preflight", "Complete")
    wait_for("Job served-0", lambda: api.job("served-0"), operator=operator)
    for pod in api.start_pods("served-0"):
        api.terminate(pod, 0, '{"outcome": "Succeeded", "exitCode": 0}', reason="Completed")
    api.finish_job("served-0", "Complete")
    deployed = wait_for("Deployed=True", lambda: condition(api, "served", "Deployed").get("status") == "True"
                        and condition(api, "served", "Deployed"), operator=operator)
    assert deployed["reason"] == "InferenceServiceCreated"
    assert api.status("served")["inferenceService"] == {"name": "served", "ready": False}
    isvc = api.custom.get_namespaced_custom_object(serving.KSERVE_GROUP, serving.KSERVE_VERSION, NS,
                                                   serving.INFERENCE_SERVICES, "served")
    assert isvc["spec"]["predictor"]["model"]["storageUri"] == "s3://models-out/reviews/merged"
    assert isvc["metadata"]["ownerReferences"][0]["uid"] == api.ftj("served")["metadata"]["uid"]
    # KServe's controller, played by the test: first an address but not Ready, then Ready.
    url = "http://served.ml.example.com"

    def kserve_reports(ready: str) -> None:
        api.custom.patch_namespaced_custom_object_status(
            serving.KSERVE_GROUP, serving.KSERVE_VERSION, NS, serving.INFERENCE_SERVICES, "served",
            {"status": {"url": url, "address": {"url": "http://served-predictor.ml.svc.cluster.local"},
                        "conditions": [{"type": "Ready", "status": ready, "lastTransitionTime": now()}]}})

    kserve_reports("False")
    time.sleep(3)  # a few refresh passes of a finished job: an address without Ready is not written
    assert api.status("served")["inferenceService"] == {"name": "served", "ready": False}
    kserve_reports("True")
    served = wait_for("the InferenceService URL", lambda: api.status("served")["inferenceService"].get("ready")
                      and api.status("served"), operator=operator)
    assert served["inferenceService"] == {"name": "served", "url": url, "ready": True}
    assert condition(api, "served", "Deployed")["reason"] == "InferenceServiceReady"
    assert any(e["reason"] == "InferenceServiceReady" and url in e["message"] for e in api.events("served"))
    api.delete_ftj("served")


def test_a_dry_runs_report_reaches_the_status(api: Api, operator: Operator) -> None:
    submit(api, "dry", dryRun={"fraction": 0.05, "maxSteps": 20})
    api.terminate(preflight_pod(api, operator, "dry"), 0)
    api.finish_job("dry-preflight", "Complete")
    wait_for("Job dry-0", lambda: api.job("dry-0"), operator=operator)
    report = {"dryRun": True, "steps": 20, "estimatedTotalSeconds": 5400.0, "peakMemoryBytes": 2**33,
              "lossDecreasing": True}
    for pod in api.start_pods("dry-0"):
        api.terminate(pod, 0, json.dumps({"outcome": "Succeeded", "exitCode": 0, "dryRun": report}),
                      reason="Completed")
    api.finish_job("dry-0", "Complete")
    status = wait_for("status.dryRun", lambda: api.status("dry").get("dryRun") and api.status("dry"),
                      operator=operator)
    assert status["phase"] == "Succeeded" and status["dryRun"] == report
    api.delete_ftj("dry")

"""The operator's first step on a cluster: a CPU-only pre-flight Job (`kubetune validate --deep`) before GPUs;
and what a succeeded job leads to (serving with KServe, a dry run's report).

The chart's operator with `operator.preflight: true` on the real control plane; pre-flight and trainer pods run
the scripted image (a pre-flight passes unless the test scripts its end before it starts).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from kubetune import contract
from kubetune.jobfile import job_document
from kubetune_operator import serving
from tests.cluster import KubeCluster
from tests.operator_harness import NS, Api, ChartOperator, wait_for
from tests.pss import restricted_violations
from tests.scripted_trainer import ScriptedTrainer
from tests.test_chart_rbac import KSERVE_CRD
from tests.test_operator import BASE as OPERATOR_BASE

BASE = {**OPERATOR_BASE, "resources": {"nodes": 1, "gpusPerNode": 0, "cpu": "1", "memory": "1Gi"}}


@pytest.fixture(scope="module")
def operator_values() -> dict[str, Any]:
    return {"operator": {"preflight": True}}


@pytest.fixture
def kserve(kube: KubeCluster) -> Iterator[None]:
    """KServe's API installed (its CRD; its controller's status is played by the test)."""
    kube.ensure_crd(KSERVE_CRD)
    wait_for("the InferenceService API", lambda: "inferenceservices" in kube.run("kubectl", "api-resources").stdout)
    yield
    kube.run("kubectl", "delete", "crd", KSERVE_CRD["metadata"]["name"])
    wait_for("KServe's API gone", lambda: "inferenceservices" not in kube.run("kubectl", "api-resources").stdout)


def submit(api: Api, name: str, **spec: Any) -> None:
    doc = job_document(name, BASE, spec)
    doc["metadata"]["namespace"] = NS
    api.apply(doc)


def preflight_pod(api: Api, operator: ChartOperator, trainer: ScriptedTrainer, name: str) -> None:
    job = wait_for(f"Job {name}-preflight", lambda: api.job(f"{name}-preflight"), operator=operator)
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["kubetune", "validate", "--deep", "--relative-to", ".",
                                    contract.SPEC_MOUNT_PATH]
    assert "nvidia.com/gpu" not in str(container["resources"])  # never holds a GPU
    assert pod["automountServiceAccountToken"] is False and restricted_violations(pod) == []
    assert {e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "valueFrom" in e} == {"s3-credentials"}
    wait_for("the pre-flight pod ran", lambda: trainer.ended(f"{name}-preflight"), operator=operator)


def test_a_failing_preflight_never_gets_a_gpu_job(api: Api, operator: ChartOperator, trainer: ScriptedTrainer) -> None:
    problem = "error: spec.data.train: s3://data/reviews/train.jsonl: bucket 'data' does not exist"
    trainer.exit("pf-bad-preflight", contract.EXIT_BAD_INPUT, log=problem)  # FallbackToLogsOnError: the log
    submit(api, "pf-bad")
    preflight_pod(api, operator, trainer, "pf-bad")
    wait_for("phase Failed", lambda: api.status("pf-bad").get("phase") == "Failed", operator=operator)
    failure = api.status("pf-bad")["failure"]
    assert failure["reason"] == "InvalidInput" and "spec.data.train" in failure["message"]
    assert api.condition("pf-bad", "Validated")["status"] == "False"
    time.sleep(3)  # a few refresh passes: still no GPU Job
    assert api.job("pf-bad-0") is None
    api.delete_ftj("pf-bad")


def test_a_passing_preflight_proceeds_and_says_when_kserve_is_missing(
        api: Api, operator: ChartOperator, trainer: ScriptedTrainer) -> None:
    submit(api, "pf-good", deploy={"kserve": {}})
    preflight_pod(api, operator, trainer, "pf-good")
    wait_for("Job pf-good-0", lambda: api.job("pf-good-0"), operator=operator)
    validated = wait_for("Validated=True", lambda: api.condition("pf-good", "Validated").get("status") == "True"
                         and api.condition("pf-good", "Validated"), operator=operator)
    assert validated["reason"] == "PreflightPassed"
    # Trained: spec.deploy.kserve asks for an InferenceService; this cluster has no KServe, which a condition says.
    wait_for("the trainer", lambda: trainer.started("pf-good-0-0"), operator=operator)
    trainer.exit("pf-good-0-0", 0, {"outcome": "Succeeded", "exitCode": 0})
    deployed = wait_for("Deployed condition", lambda: api.condition("pf-good", "Deployed"), operator=operator)
    assert api.status("pf-good")["phase"] == "Succeeded"
    assert deployed["status"] == "False" and deployed["reason"] == "KServeNotInstalled"
    api.delete_ftj("pf-good")


def test_a_succeeded_job_is_served_where_kserve_is_installed(api: Api, operator: ChartOperator,
                                                             trainer: ScriptedTrainer, kserve: None) -> None:
    submit(api, "served", deploy={"kserve": {}})
    preflight_pod(api, operator, trainer, "served")
    wait_for("the trainer", lambda: trainer.started("served-0-0"), operator=operator)
    trainer.exit("served-0-0", 0, {"outcome": "Succeeded", "exitCode": 0})
    deployed = wait_for("Deployed=True", lambda: api.condition("served", "Deployed").get("status") == "True"
                        and api.condition("served", "Deployed"), operator=operator)
    assert deployed["reason"] == "InferenceServiceCreated"
    name = api.status("served")["inferenceService"]["name"]
    assert api.status("served")["inferenceService"] == {"name": name, "ready": False}
    isvc = api.custom.get_namespaced_custom_object(serving.KSERVE_GROUP, serving.KSERVE_VERSION, NS,
                                                   serving.INFERENCE_SERVICES, name)
    assert isvc["spec"]["predictor"]["model"]["storageUri"] == "s3://models-out/reviews/merged"
    assert isvc["metadata"]["ownerReferences"][0]["uid"] == api.ftj("served")["metadata"]["uid"]  # type: ignore
    # KServe's controller, played by the test: first an address but not Ready, then Ready.
    url = "http://served.ml.example.com"

    def kserve_reports(ready: str) -> None:
        api.custom.patch_namespaced_custom_object_status(
            serving.KSERVE_GROUP, serving.KSERVE_VERSION, NS, serving.INFERENCE_SERVICES, name,
            {"status": {"url": url, "address": {"url": "http://served-predictor.ml.svc.cluster.local"},
                        "conditions": [{"type": "Ready", "status": ready}]}})

    kserve_reports("False")
    time.sleep(3)  # a few refresh passes of a finished job: an address without Ready is not written
    assert api.status("served")["inferenceService"] == {"name": name, "ready": False}
    kserve_reports("True")
    served = wait_for("the InferenceService URL", lambda: api.status("served")["inferenceService"].get("ready")
                      and api.status("served"), operator=operator)
    assert served["inferenceService"] == {"name": name, "url": url, "ready": True}
    assert api.condition("served", "Deployed")["reason"] == "InferenceServiceReady"
    assert any(e["reason"] == "InferenceServiceReady" and url in e["message"] for e in api.events("served"))
    api.delete_ftj("served")


def test_a_dry_runs_report_reaches_the_status(api: Api, operator: ChartOperator, trainer: ScriptedTrainer) -> None:
    submit(api, "dry", dryRun={"fraction": 0.05, "maxSteps": 20})
    preflight_pod(api, operator, trainer, "dry")
    wait_for("the trainer", lambda: trainer.started("dry-0-0"), operator=operator)
    report = {"dryRun": True, "steps": 20, "estimatedTotalSeconds": 5400.0, "peakMemoryBytes": 2**33,
              "lossDecreasing": True}
    trainer.exit("dry-0-0", 0, json.dumps({"outcome": "Succeeded", "exitCode": 0, "dryRun": report}))
    status = wait_for("status.dryRun", lambda: api.status("dry").get("dryRun") and api.status("dry"),
                      operator=operator)
    assert status["phase"] == "Succeeded" and status["dryRun"] == report
    api.delete_ftj("dry")

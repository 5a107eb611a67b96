"""Pure builders against golden files; every object they make passes kubernetes-validate (strict).

Regenerate the goldens after an intended change: KUBETUNE_UPDATE_GOLDEN=1 pytest tests/test_operator_builders.py
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from kubetune import contract
from kubetune.footprint import Footprint
from kubetune.jobfile import job_document
from kubetune_operator import builders
from kubetune_operator.settings import Settings

GOLDEN = Path(__file__).parent / "golden"
K8S_VERSION = "1.30.0"

BASE = {
    "model": {"uri": "s3://models/minilm/", "task": "sequence-classification", "labels": ["negative", "positive"]},
    "data": {"train": "s3://data/reviews/train.jsonl"},
    "output": {"uri": "s3://models-out/reviews/"},
}
CASES: dict[str, dict[str, Any]] = {
    "cpu": {"resources": {"nodes": 1, "gpusPerNode": 0, "cpu": "2", "memory": "4Gi"}},
    "gpu-4x8-full": {
        "method": {"type": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.1, "targetModules": ["query"]}},
        "storage": {"endpoint": "http://minio.storage:9000", "region": "eu-west-1", "secretRef": "s3-credentials"},
        "resources": {
            "nodes": 4, "gpusPerNode": 8, "cpu": "32", "memory": "256Gi",
            "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "priorityClassName": "training-high",
        },
        "runPolicy": {"backoffLimit": 5, "activeDeadlineSeconds": 86400, "ttlSecondsAfterFinished": 3600},
        "image": "registry.example.com/kubetune/trainer:cuda",
    },
    "kueue": {"runPolicy": {"queueName": "team-a"}, "resources": {"nodes": 2, "gpusPerNode": 1}},
    # A platform team's settings (issue 26, items 13-17), with the chart's defaults and the pre-flight's estimate.
    "pod-settings": {
        "imagePullSecrets": ["team-registry"],
        "resources": {"gpusPerNode": 2, "cpu": "16", "memory": "64Gi", "guaranteed": True, "shmSize": "8Gi",
                      "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
        "runPolicy": {"terminationGracePeriodSeconds": 900, "maxFreeRestarts": 5},
    },
}
# The chart's defaults for every job's pods (jobPods.*), as the operator reads them from its environment.
CHART_DEFAULTS = Settings(image_pull_secrets=("chart-registry",), preflight_image="ghcr.io/kubetune/trainer:0.1.0-cpu",
                          preflight_node_selector={"kubetune.io/pool": "cpu"}, preflight_tolerations=None)


def ftj(case: str) -> dict[str, Any]:
    doc = job_document(f"reviews-{case}", BASE, CASES[case])
    doc["metadata"].update(namespace="ml", uid="3f0e8c52-0000-4000-8000-00000000000" + str(len(case) % 10))
    return doc


def children(case: str) -> list[dict[str, Any]]:
    """ConfigMap, Service, the first attempt's Job and the pre-flight Job."""
    doc = ftj(case)
    deadline = doc["spec"].get("runPolicy", {}).get("activeDeadlineSeconds")
    chart = CHART_DEFAULTS if case == "pod-settings" else None
    footprint = Footprint(model_bytes=15 * 10**9, checkpoint_bytes=3 * 10**9) if case == "pod-settings" else None
    image, account = "ghcr.io/kubetune/trainer:0.1.0", "kubetune-trainer"
    return [
        builders.build_configmap(doc),
        builders.build_service(doc),
        builders.build_job(doc, image=image, service_account=account, attempt=0, active_deadline_seconds=deadline,
                           settings=chart, footprint=footprint),
        builders.build_preflight_job(doc, image=image, service_account=account, settings=chart),
    ]


@pytest.mark.parametrize("case", sorted(CASES))
def test_children_match_golden_files(case: str) -> None:
    rendered = yaml.safe_dump_all(children(case), sort_keys=True)
    path = GOLDEN / f"children-{case}.yaml"
    if os.environ.get("KUBETUNE_UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(rendered)
    assert rendered == path.read_text(), f"{path.name} differs: rerun with KUBETUNE_UPDATE_GOLDEN=1 if intended"


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_child_passes_kubernetes_validate_strict(case: str) -> None:
    for obj in children(case):
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def _pod(case: str) -> dict[str, Any]:
    spec: dict[str, Any] = children(case)[2]["spec"]["template"]["spec"]
    return spec


def _env(case: str) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in _pod(case)["containers"][0]["env"]}


def test_children_are_owned_and_labelled() -> None:
    for obj in children("cpu"):
        owner = obj["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"], owner["controller"]) == ("FineTuneJob", "reviews-cpu", True)
        assert obj["metadata"]["labels"][contract.LABEL_JOB_NAME] == "reviews-cpu"
        assert obj["metadata"]["labels"][contract.LABEL_APP_MANAGED_BY] == contract.MANAGED_BY


def test_rendezvous_env_gpus_and_topology() -> None:
    env = _env("gpu-4x8-full")
    assert env[contract.ENV_MASTER_ADDR] == "reviews-gpu-4x8-full-0-0.reviews-gpu-4x8-full.ml.svc"
    assert env[contract.ENV_NNODES] == "4" and env[contract.ENV_NPROC_PER_NODE] == "8"
    assert env[contract.ENV_NODE_RANK] == {"fieldRef": {"fieldPath": builders.COMPLETION_INDEX}}
    job = children("gpu-4x8-full")[2]["spec"]
    assert (job["completions"], job["parallelism"], job["completionMode"]) == (4, 4, "Indexed")
    limits = _pod("gpu-4x8-full")["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 8
    assert "nvidia.com/gpu" not in _pod("cpu")["containers"][0]["resources"]["limits"]
    assert _env("cpu")[contract.ENV_NPROC_PER_NODE] == "1"


def test_credentials_only_by_secret_reference() -> None:
    env = _env("gpu-4x8-full")
    assert env[contract.SECRET_ACCESS_KEY_ID] == {
        "secretKeyRef": {"name": "s3-credentials", "key": contract.SECRET_ACCESS_KEY_ID}}
    spec_text = children("gpu-4x8-full")[0]["data"][builders.SPEC_KEY]
    assert "AWS_" not in spec_text
    assert contract.SECRET_ACCESS_KEY_ID not in _env("cpu")


def test_pod_is_restricted_and_has_no_api_token() -> None:
    pod = _pod("cpu")
    container = pod["containers"][0]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                            "runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert container["terminationMessagePath"] == contract.TERMINATION_LOG
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1024Mi"}} in pod["volumes"]  # 4Gi / 4
    # The pod's grace period covers the trainer's SIGTERM checkpoint budget handed to it by env.
    assert pod["terminationGracePeriodSeconds"] > int(_env("cpu")[contract.ENV_GRACE_SECONDS])


def test_failure_policy_suspend_deadline_and_queue() -> None:
    job = children("gpu-4x8-full")[2]["spec"]
    rules = job["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "FailJob" and rules[0]["onExitCodes"]["values"] == [contract.EXIT_BAD_INPUT]
    assert rules[1]["onPodConditions"][0]["type"] == "DisruptionTarget"
    assert job["backoffLimit"] == 0 and job["activeDeadlineSeconds"] == 86400 and job["suspend"] is False
    queued = children("kueue")[2]
    assert queued["metadata"]["labels"][contract.LABEL_QUEUE] == "team-a"
    assert queued["spec"]["suspend"] is True  # Kueue admits by unsuspending
    pod = _pod("gpu-4x8-full")
    assert pod["priorityClassName"] == "training-high" and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["containers"][0]["image"] == "registry.example.com/kubetune/trainer:cuda"
    assert _pod("cpu")["containers"][0]["image"] == "ghcr.io/kubetune/trainer:0.1.0"


def test_configmap_holds_the_resolved_spec() -> None:
    document = yaml.safe_load(children("cpu")[0]["data"][builders.SPEC_KEY])
    assert document["metadata"] == {"name": "reviews-cpu", "namespace": "ml"}
    assert document["spec"]["hyperparameters"]["learningRate"] == 1e-3  # defaults filled in (lora, classification)
    from kubetune.jobfile import parse_job

    assert parse_job(document).spec.resources.gpus_per_node == 0

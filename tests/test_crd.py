"""The CRD on a real API server (tests/control_plane.py): accepted (structural schema, every CEL rule compiled
within the cost budget), and its schema and rules accept and refuse what the spec model does. Samples go in as
server-side dry runs (validated and admitted, never stored)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from kubetune import contract
from kubetune.crd import build_crd
from kubetune.jobfile import job_document
from kubetune.spec import FineTuneJob
from tests.cluster import KubeCluster
from tests.operator_harness import wait_for

ROOT = Path(__file__).resolve().parent.parent
CRD = build_crd()
VERSION = CRD["spec"]["versions"][0]
SCHEMA = VERSION["schema"]["openAPIV3Schema"]
NS = "crd-samples"

BASE = {
    "model": {"uri": "s3://models/x/", "task": "sequence-classification", "labels": ["a", "b"]},
    "data": {"train": "s3://data/train.jsonl"},
    "output": {"uri": "s3://out/x/"},
}
# name -> (spec overrides, valid?) : each invalid one breaks exactly one pydantic cross-field rule.
SAMPLES: dict[str, tuple[dict[str, Any], bool]] = {
    "valid": ({}, True),
    "causal-lm": ({"model": {"task": "causal-lm", "labels": None}, "evaluation": {"metric": "eval_perplexity"}},
                  True),
    "partial-last-layers": ({"method": {"type": "partial", "partial": {"trainLastLayers": 2}}}, True),
    "one-label": ({"model": {"labels": ["a"]}}, False),
    "no-labels": ({"model": {"labels": None}}, False),
    "labels-on-causal-lm": ({"model": {"task": "causal-lm"}}, False),
    "partial-missing": ({"method": {"type": "partial"}}, False),
    "partial-both": ({"method": {"type": "partial", "partial": {"trainLastLayers": 2, "trainModules": ["x"]}}},
                     False),
    "split-sum": ({"data": {"split": {"train": 0.5, "validation": 0.2, "test": 0.2}}}, False),
    "metric-wrong-task": ({"evaluation": {"metric": "eval_perplexity"}}, False),
    "metric-wrong-task-lm": ({"model": {"task": "causal-lm", "labels": None},
                              "evaluation": {"metric": "eval_accuracy"}}, False),
    "packing-classification": ({"data": {"packing": True}}, False),
    "packing-off-classification": ({"data": {"packing": False}}, True),
    "packing-causal-lm": ({"model": {"task": "causal-lm", "labels": None}, "data": {"packing": True},
                           "evaluation": {"metric": "eval_perplexity"}}, True),
    "serve-lora-merged": ({"deploy": {"kserve": {}}}, True),
    "serve-full-unmerged": ({"method": {"type": "full"}, "output": {"mergeAdapter": False},
                             "deploy": {"kserve": {}}}, True),
    "serve-lora-unmerged": ({"output": {"mergeAdapter": False}, "deploy": {"kserve": {}}}, False),
    "qlora-on-cpu": ({"method": {"type": "qlora"}, "resources": {"gpusPerNode": 0}}, False),
    "quantities": ({"resources": {"cpu": "500m", "memory": "1.5Gi", "nodeSelector": {"kubetune.io/pool": "a"}}},
                   True),
    "memory-in-gb": ({"resources": {"memory": "32GB"}}, False),
    "selector-value": ({"resources": {"nodeSelector": {"pool": "gpu nodes"}}}, False),
    "selector-key": ({"resources": {"nodeSelector": {"bad key": "x"}}}, False),
    "queue-name": ({"runPolicy": {"queueName": "team a"}}, False),
}


@pytest.fixture(scope="module")
def custom(kube: KubeCluster) -> Iterator[kubernetes.client.CustomObjectsApi]:
    """The CRD created from the generated document (create-if-missing: the chart installs the same bytes)."""
    kube.install_crd()
    kube.namespace(NS)
    yield kubernetes.client.CustomObjectsApi(kube.client())
    kube.delete_namespace(NS)  # no operator of a later module may find the samples


def admitted(custom: kubernetes.client.CustomObjectsApi, document: dict[str, Any]) -> tuple[bool, str]:
    """(accepted?, the server's message) for a create as `kubectl apply` sends it, without storing it."""
    try:
        custom.create_namespaced_custom_object(contract.API_GROUP, contract.API_VERSION, NS, contract.PLURAL,
                                               document, dry_run="All", field_validation="Strict")
    except ApiException as exc:
        assert exc.status in (400, 422), exc.body
        return False, str(exc.body)
    return True, ""


def test_the_api_server_accepts_the_crd(custom: kubernetes.client.CustomObjectsApi, kube: KubeCluster) -> None:
    stored = kube.get("crd", CRD["metadata"]["name"])
    assert {c["type"]: c["status"] for c in stored["status"]["conditions"]} == {
        "NamesAccepted": "True", "Established": "True"}
    # The OpenAPI document kubectl explain reads is published a moment after the CRD is Established.
    wait_for("kubectl explain", lambda: "gpusPerNode" in kube.run("kubectl", "explain", "finetunejob.spec.resources",
                                                                  check=False).stdout)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_the_servers_rules_agree_with_the_spec_model(custom: kubernetes.client.CustomObjectsApi, name: str) -> None:
    document = job_document(f"sample-{name}", BASE, SAMPLES[name][0])
    try:
        FineTuneJob.model_validate(document)
        model_ok = True
    except ValidationError:
        model_ok = False
    assert model_ok == SAMPLES[name][1], "the sample itself is wrong"
    ok, message = admitted(custom, document)
    assert ok == model_ok, f"{name}: the server said {ok} ({message}), the spec model {model_ok}"


@pytest.mark.parametrize(("name", "ok"), [("reviews-sentiment", True), ("a", True), ("9lives", False),
                                          ("x" * 53, False), ("trailing-", False), ("dots.in.it", False)])
def test_name_rule(custom: kubernetes.client.CustomObjectsApi, name: str, ok: bool) -> None:
    assert admitted(custom, job_document(name, BASE))[0] is ok


def test_spec_is_immutable_once_started_except_suspend(custom: kubernetes.client.CustomObjectsApi) -> None:
    """Before status.startTime anything may change; after it only runPolicy.suspend (added or flipped)."""
    created = custom.create_namespaced_custom_object(contract.API_GROUP, contract.API_VERSION, NS, contract.PLURAL,
                                                     job_document("immutable", BASE))

    def patch(change: dict[str, Any]) -> bool:
        try:
            custom.patch_namespaced_custom_object(contract.API_GROUP, contract.API_VERSION, NS, contract.PLURAL,
                                                  "immutable", change, dry_run="All")
        except ApiException as exc:
            assert exc.status == 422 and "immutable once the job has started" in exc.body, exc.body
            return False
        return True

    other_data = {"spec": {"data": {"train": "s3://data/other.jsonl"}}}
    assert patch(other_data)  # not started yet: anything goes
    custom.patch_namespaced_custom_object_status(contract.API_GROUP, contract.API_VERSION, NS, contract.PLURAL,
                                                 "immutable", {"status": {"startTime": "2026-01-01T00:00:00Z"}})
    assert patch({"spec": {"runPolicy": {"suspend": True}}})
    assert not patch(other_data)
    assert not patch({"spec": {"runPolicy": {"backoffLimit": 9}}})
    assert not patch({"spec": {"image": "other:1"}})  # an optional field appearing counts
    assert created["spec"]["runPolicy"]["backoffLimit"] == 3  # runPolicy is always there, with its defaults


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_pass_the_servers_validation(custom: kubernetes.client.CustomObjectsApi, path: Path) -> None:
    for document in yaml.safe_load_all(path.read_text()):
        document = copy.deepcopy(document)
        document["metadata"]["namespace"] = NS  # some examples name one of their own
        ok, message = admitted(custom, document)
        assert ok, message


@pytest.mark.parametrize(("override", "field"), [
    ({"method": {"type": "dora"}}, "spec.method.type"),
    ({"hyperparameters": {"batchSize": 0}}, "spec.hyperparameters.batchSize"),
    ({"resources": {"gpusPerNode": -1}}, "spec.resources.gpusPerNode"),
    ({"data": {"split": {"train": 0}}}, "spec.data.split.train"),
    ({"hyperparameters": {"lr": 1}}, "spec.hyperparameters.lr"),
])
def test_schema_refuses_bad_values_naming_the_field(custom: kubernetes.client.CustomObjectsApi,
                                                    override: dict[str, Any], field: str) -> None:
    ok, message = admitted(custom, job_document("bad", BASE, override))
    assert not ok and field in message, message


def _undescribed(node: dict[str, Any], path: str) -> list[str]:
    missing = []
    for name, child in node.get("properties", {}).items():
        here = f"{path}.{name}"
        if "description" not in child and here != ".metadata":  # the server allows nothing there but the type
            missing.append(here)
        missing += _undescribed(child, here)
        if "items" in child:
            missing += _undescribed(child["items"], here + "[]")
    return missing


def test_every_field_has_a_description_for_kubectl_explain() -> None:
    assert _undescribed(SCHEMA, "") == []


def test_names_columns_and_status() -> None:
    names = CRD["spec"]["names"]
    assert names["shortNames"] == ["ftj"] and "kubetune" in names["categories"]
    assert [c["name"] for c in VERSION["additionalPrinterColumns"]] == ["Phase", "Progress", "Loss", "Age",
                                                                        "Improved"]
    assert VERSION["additionalPrinterColumns"][-1]["priority"] == 1  # -o wide: the default listing keeps 5
    assert VERSION["subresources"] == {"status": {}}
    status = SCHEMA["properties"]["status"]["properties"]
    assert {"gpuSeconds", "restarts", "failure", "progress", "conditions"} <= set(status)

"""A FineTuneSweep asks only for what its author may do (issue 29 with issue 31's policy), on the real control plane.

The sweep's template is checked with its author's rights at `kubectl apply`, messages naming spec.template.<field>;
the FineTuneJobs the operator then creates for its trials are not checked with the operator's rights (it may not
read Secrets, so every trial naming one was refused); nobody else gets that exemption by claiming a sweep owner;
and no parameter can reach a field the policy guards.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune import contract
from kubetune.jobfile import job_document
from tests.cluster import KubeCluster
from tests.operator_harness import NS, Api, ChartOperator, merged, wait_for
from tests.scripted_trainer import ScriptedTrainer
from tests.test_admission_policy import (
    BASE,
    POLICY,
    REFUSED,
    Users,
    operator_values,
    users,
)

FIXTURES = (operator_values, users)  # issue 31's chart values and users (alice, bob), fixtures here too
RATES = [{"path": "hyperparameters.learningRate", "values": [1e-4, 1e-3]}]


def sweep(name: str, template: dict[str, Any], parameters: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"apiVersion": f"{contract.API_GROUP}/{contract.API_VERSION}", "kind": contract.SWEEP_KIND,
            "metadata": {"name": name, "namespace": NS},
            "spec": {"template": merged(BASE, template), "parameters": parameters or RATES, "algorithm": "grid"}}


def apply(kube: KubeCluster, as_user: Path, doc: dict[str, Any], dry_run: bool = True) -> str:
    """'' when the server accepts the object, else what kubectl printed."""
    dry = ["--dry-run=server"] if dry_run else []
    done: subprocess.CompletedProcess[str] = kube.run("kubectl", "apply", *dry, "-f", "-", input=yaml.safe_dump(doc),
                                                      kubeconfig=as_user, check=False)
    return "" if done.returncode == 0 else done.stderr.strip() or done.stdout


@pytest.mark.parametrize("case", [c for c in REFUSED if c.id in (
    "custom image", "a Secret alice may not read", "toleration of every taint", "a priority class")],
    ids=lambda c: c.id)
def test_a_sweeps_template_is_checked_with_its_authors_rights(kube: KubeCluster, users: Users, case: Any) -> None:
    refused = apply(kube, users.alice, sweep("alice-sweep", case.spec))
    field = case.field.replace("spec.", "spec.template.", 1)
    assert field in refused and case.rule in refused and POLICY in refused, refused
    assert apply(kube, users.bob, sweep("bob-sweep", case.spec)) == ""  # bob may do it with Pods and Secrets


def test_the_operator_creates_the_trials_of_an_allowed_sweep(kube: KubeCluster, users: Users,
                                                            operator: ChartOperator) -> None:
    """alice's sweep names the team's Secret, which she may read and the operator may not: its trials run."""
    assert apply(kube, users.alice, sweep("team-sweep", {}), dry_run=False) == ""
    api, trainer = Api(kube.kubeconfig), ScriptedTrainer(kube.scripts)
    wait_for("the first trial's pod", lambda: trainer.started("team-sweep-0-0-0"), operator=operator)
    found = api.custom.get_namespaced_custom_object(contract.API_GROUP, contract.API_VERSION, NS,
                                                    contract.SWEEP_PLURAL, "team-sweep")
    assert "TrialRefused" not in json.dumps(found.get("status") or {})
    kube.run("kubectl", "delete", "fts", "team-sweep", "-n", NS, "--wait=true")
    wait_for("the trial deleted with its sweep", lambda: api.ftj("team-sweep-0") is None, timeout=60)


def test_only_the_operator_skips_the_check_of_a_trial(kube: KubeCluster, users: Users) -> None:
    """A FineTuneJob that claims a sweep as its owner is still checked with its author's rights."""
    doc = job_document("claims-a-sweep", BASE, {"storage": {"secretRef": "s3-credentials"}})
    doc["metadata"].update(namespace=NS, ownerReferences=[{
        "apiVersion": f"{contract.API_GROUP}/{contract.API_VERSION}", "kind": contract.SWEEP_KIND,
        "name": "some-sweep", "uid": "6b3c1a8e-0000-4000-8000-000000000000"}])
    refused = apply(kube, users.alice, doc)
    assert "spec.storage.secretRef" in refused and POLICY in refused, refused


@pytest.mark.parametrize("path", ["image", "storage.secretRef", "resources.priorityClassName",
                                  "deploy.kserve.serviceAccountName"])
def test_no_parameter_reaches_a_guarded_field(kube: KubeCluster, users: Users, path: str) -> None:
    refused = apply(kube, users.bob, sweep("guarded", {}, [{"path": path, "values": ["x", "y"]}]))
    assert "spec.parameters[0].path" in refused and "Unsupported value" in refused, refused


def test_the_mlflow_secret_is_checked_like_the_storage_one(kube: KubeCluster, users: Users) -> None:
    """spec.tracking.mlflow.secretRef: the trainer pods would read its keys, so the author must be able to."""
    tracked = {"tracking": {"mlflow": {"uri": "http://mlflow.mlops:5000", "secretRef": "s3-credentials"}}}
    job = job_document("tracked", BASE, tracked)
    job["metadata"]["namespace"] = NS
    for doc, field in ((job, "spec.tracking.mlflow.secretRef"),
                       (sweep("tracked", tracked), "spec.template.tracking.mlflow.secretRef")):
        refused = apply(kube, users.alice, doc)
        assert field in refused and "admissionPolicy.secretRef" in refused, refused
        assert apply(kube, users.bob, doc) == ""

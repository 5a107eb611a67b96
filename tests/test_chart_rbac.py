"""RBAC is exactly sufficient: every API request the operator makes is allowed by the chart's rules, and every
rule is used. The requests are the real API server's audit log (tests/control_plane.py) of the operator's
ServiceAccount while it runs as the chart's Deployment through jobs' lives on the real control plane."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from kubernetes.client.rest import ApiException

from kubetune import contract
from kubetune.jobfile import job_document
from kubetune_operator import serving
from tests.cluster import RELEASE_NAMESPACE, KubeCluster
from tests.fixtures_cluster import S3_SECRET
from tests.operator_harness import NS, TEST_VALUES, Api, ChartOperator, merged, wait_for
from tests.scripted_trainer import ScriptedTrainer
from tests.test_chart import find, render

OPERATOR = f"system:serviceaccount:{RELEASE_NAMESPACE}:kubetune-operator"
# Checked by the OwnerReferencesPermissionEnforcement admission plugin on every child the operator creates
# (its owner reference blocks the owner's deletion), never requested: test_child_creates_need_the_finalizers_grant.
ADMISSION_ONLY = {("kubetune.io", "finetunejobs/finalizers", "update"),
                  ("kubetune.io", "finetunesweeps/finalizers", "update")}  # a sweep's trials block its deletion
KSERVE_CRD = {  # KServe's InferenceService kind, served with an open schema: its API, not its controller
    "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
    "metadata": {"name": f"{serving.INFERENCE_SERVICES}.{serving.KSERVE_GROUP}"},
    "spec": {"group": serving.KSERVE_GROUP, "scope": "Namespaced",
             "names": {"kind": serving.INFERENCE_SERVICE, "plural": serving.INFERENCE_SERVICES,
                       "singular": "inferenceservice"},
             "versions": [{"name": serving.KSERVE_VERSION, "served": True, "storage": True,
                           "subresources": {"status": {}},
                           "schema": {"openAPIV3Schema": {"type": "object",
                                                          "x-kubernetes-preserve-unknown-fields": True}}}]},
}


@dataclass(frozen=True)
class Access:
    verb: str
    group: str
    resource: str  # with "/subresource" when there is one
    namespace: str | None  # None: a cluster-scoped object or a request across all namespaces
    name: str | None


def allows(rules: list[dict[str, Any]], wanted: Access) -> bool:
    return any(wanted.group in r["apiGroups"] and wanted.resource in r["resources"] and wanted.verb in r["verbs"]
               and (not r.get("resourceNames") or wanted.name in r["resourceNames"]) for r in rules)


def granted(objects: list[dict[str, Any]], wanted: Access) -> bool:
    """Cluster roles apply everywhere; a Role only to requests inside its namespace."""
    if any(allows(o["rules"], wanted) for o in find(objects, "ClusterRole")):
        return True
    return wanted.namespace is not None and any(
        allows(o["rules"], wanted) for o in find(objects, "Role") if o["metadata"]["namespace"] == wanted.namespace)


def grants(objects: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {(g, res, v) for o in objects if o["kind"] in ("Role", "ClusterRole") for r in o["rules"]
            for g in r["apiGroups"] for res in r["resources"] for v in r["verbs"]}


def test_namespaced_mode_keeps_job_rules_inside_the_watched_namespaces(tmp_path: Path) -> None:
    objects = render(tmp_path, {"rbac.scope": "namespaced", "rbac.namespaces": ["ml"]})
    create_job = Access("create", "batch", "jobs", "ml", None)
    assert granted(objects, create_job)
    assert not granted(objects, Access("create", "batch", "jobs", "other", None))
    assert not granted(objects, Access("watch", "kubetune.io", "finetunejobs", None, None))  # cluster-wide
    assert granted(render(tmp_path, {}), Access("watch", "kubetune.io", "finetunejobs", None, None))
    assert not granted(objects, Access("get", "", "secrets", "ml", "s3-credentials"))


def _fresh_namespace(kube: KubeCluster) -> None:
    kube.delete_namespace(NS)
    kube.namespace(NS)
    kubernetes.client.CoreV1Api(kube.client()).create_namespaced_secret(NS, {
        "metadata": {"name": S3_SECRET},
        "stringData": {contract.SECRET_ACCESS_KEY_ID: "test", contract.SECRET_SECRET_ACCESS_KEY: "test-secret"}})


@pytest.mark.parametrize("scope", ["cluster", "namespaced"])
def test_installed_rbac_is_exactly_what_the_operator_uses(kube: KubeCluster, scope: str) -> None:
    """The chart installed by helm (cluster-wide, or namespaced: a Role in the watched namespace), the operator
    as its Deployment with the pre-flight on, through jobs' lives: pre-flight, run, succeed, serve (KServe's
    API installed; its controller's status played by the test), TTL-delete; a gang restart; a suspension."""
    kube.clean_scripts()
    _fresh_namespace(kube)
    kube.ensure_crd(KSERVE_CRD)
    scoped = ("--set", "rbac.scope=namespaced", "--set", f"rbac.namespaces={{{NS}}}")
    chart = ChartOperator(kube, merged(TEST_VALUES, {"operator": {"preflight": True}}),
                          extra_args=scoped if scope == "namespaced" else ())
    _, since = kube.control_plane.audit()
    chart.install()
    installed = [kube.get("clusterrole", "kubetune-operator")]
    if scope == "namespaced":
        installed.append(kube.get("role", "kubetune-operator", namespace=NS))
    api, trainer = Api(kube.kubeconfig), ScriptedTrainer(kube.scripts)

    def submit(name: str, **spec: Any) -> None:
        doc = job_document(name, {"model": {"uri": "s3://models/m/", "task": "causal-lm"},
                                  "data": {"train": "s3://data/d.jsonl"}, "output": {"uri": "s3://out/x/"},
                                  "storage": {"secretRef": S3_SECRET}, "resources": {"gpusPerNode": 0}}, spec)
        doc["metadata"]["namespace"] = NS
        api.apply(doc)

    def wait(what: str, check: Any) -> Any:
        return wait_for(what, check, timeout=90, operator=chart)

    submit("done", deploy={"kserve": {}})
    wait("the trainer pod", lambda: trainer.started("done-0-0"))
    assert trainer.ended("done-preflight")  # the pre-flight ran first, as its own pod
    trainer.exit("done-0-0", 0, {"outcome": "Succeeded", "exitCode": 0})
    service = wait("the InferenceService", lambda: _inference_service(api, "done"))
    api.custom.patch_namespaced_custom_object_status(  # KServe's controller, played: the model is served
        serving.KSERVE_GROUP, serving.KSERVE_VERSION, NS, serving.INFERENCE_SERVICES, service["metadata"]["name"],
        {"status": {"url": "http://done.ml.example.com", "conditions": [{"type": "Ready", "status": "True"}]}})
    wait("served", lambda: (api.status("done").get("inferenceService") or {}).get("ready"))
    submit("expiring", runPolicy={"ttlSecondsAfterFinished": 2})  # a served job is not the TTL's: this one is
    wait("the trainer pod", lambda: trainer.started("expiring-0-0"))
    trainer.exit("expiring-0-0", 0, {"outcome": "Succeeded", "exitCode": 0})
    wait("TTL deletion", lambda: api.ftj("expiring") is None)
    submit("again", runPolicy={"backoffLimit": 4})  # four attempts: the oldest is removed
    for attempt in range(3):
        wait("the trainer pod", lambda a=attempt: trainer.started(f"again-{a}-0"))  # type: ignore[misc]
        trainer.exit(f"again-{attempt}-0", 1, {"outcome": "Failed", "exitCode": 1, "message": "boom"})
    wait("attempt 3 running", lambda: trainer.started("again-3-0"))
    wait("attempt 0 removed", lambda: api.job("again-0") is None)
    submit("held")
    wait("the trainer pod", lambda: trainer.started("held-0-0"))
    api.patch_ftj("held", {"spec": {"runPolicy": {"suspend": True}}})
    wait("Job suspended", lambda: (api.job("held-0") or {}).get("spec", {}).get("suspend") is True)
    wait("Suspended", lambda: api.status("held").get("phase") == "Suspended")
    # A sweep of two trials (FineTuneJobs it owns): the first succeeds, the median rule stops the second.
    api.custom.create_namespaced_custom_object(contract.API_GROUP, contract.API_VERSION, NS, contract.SWEEP_PLURAL, {
        "apiVersion": f"{contract.API_GROUP}/{contract.API_VERSION}", "kind": contract.SWEEP_KIND,
        "metadata": {"name": "search", "namespace": NS},
        "spec": {"template": job_document("t", {"model": {"uri": "s3://models/m/", "task": "causal-lm"},
                                                "data": {"train": "s3://data/d.jsonl"}, "output": {"uri": "s3://out/s/"},
                                                "storage": {"secretRef": S3_SECRET}, "resources": {"gpusPerNode": 0},
                                                "evaluation": {"everySteps": 2}})["spec"],
                 "parameters": [{"path": "hyperparameters.learningRate", "values": [1e-4, 1e-2]}],
                 "algorithm": "grid", "earlyStopping": {"startupTrials": 1}}})
    wait("the first trial's pod", lambda: trainer.started("search-0-0-0"))
    trainer.report("search-0-0-0", step=2, total=2, eval_loss=0.5)
    wait("its validation seen", lambda: api.status("search-0").get("metrics", {}).get("evalLoss") == 0.5)
    trainer.exit("search-0-0-0", 0, {"outcome": "Succeeded", "exitCode": 0})
    wait("the second trial's pod", lambda: trainer.started("search-1-0-0"))
    trainer.report("search-1-0-0", step=2, total=4, eval_loss=3.0)
    wait("the second trial stopped", lambda: api.ftj("search-1") is None)
    # A quota that refuses the pods: the operator reads the Job controller's FailedCreate events.
    api.core.create_namespaced_resource_quota(NS, {"metadata": {"name": "no-gpus"},
                                                   "spec": {"hard": {"requests.nvidia.com/gpu": "0"}}})
    submit("refused", resources={"gpusPerNode": 1})
    wait("FailedCreate", lambda: api.condition("refused", "Running").get("reason") == "FailedCreate")
    chart.uninstall()
    kube.delete_namespace(NS)
    kubernetes.client.ApiextensionsV1Api(kube.client()).delete_custom_resource_definition(KSERVE_CRD["metadata"]["name"])

    events, _ = kube.control_plane.audit(since)
    mine = [e for e in events if e.user == OPERATOR]
    assert mine, "no requests from the operator's ServiceAccount in the audit log"
    refused = sorted({(e.verb, e.resource, e.namespace, e.code) for e in mine if e.code == 403})
    assert refused == [], "requests the chart's RBAC denied"
    wanted = {Access(e.verb, e.group, e.resource, e.namespace, e.name) for e in mine}
    assert [a for a in wanted if not granted(installed, a)] == [], "requests the chart's rules do not cover"
    used = {(a.group, a.resource, a.verb) for a in wanted}
    assert grants(installed) - used - ADMISSION_ONLY == set(), "grants no request used"


def _inference_service(api: Api, name: str) -> dict[str, Any] | None:
    found = api.custom.list_namespaced_custom_object(serving.KSERVE_GROUP, serving.KSERVE_VERSION, NS,
                                                     serving.INFERENCE_SERVICES)["items"]
    return next((s for s in found if s["metadata"]["ownerReferences"][0]["name"] == name), None)


def test_child_creates_need_the_finalizers_grant(kube: KubeCluster) -> None:
    """Why ADMISSION_ONLY is granted: with OwnerReferencesPermissionEnforcement a child whose owner reference
    blocks its owner's deletion may be created only by someone who may update the owner's finalizers."""
    _fresh_namespace(kube)
    owner = Api(kube.kubeconfig).apply({**job_document("owner", {
        "model": {"uri": "s3://models/m/", "task": "causal-lm"}, "data": {"train": "s3://data/d.jsonl"},
        "output": {"uri": "s3://out/x/"}}), "metadata": {"name": "owner", "namespace": NS}})
    rbac = kubernetes.client.RbacAuthorizationV1Api(kube.client())
    rules = [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]}]
    rbac.create_namespaced_role(NS, {"metadata": {"name": "child-maker"}, "rules": rules})
    rbac.create_namespaced_role_binding(NS, {"metadata": {"name": "child-maker"}, "subjects": [
        {"kind": "User", "name": "child-maker", "apiGroup": "rbac.authorization.k8s.io"}], "roleRef": {
        "kind": "Role", "name": "child-maker", "apiGroup": "rbac.authorization.k8s.io"}})
    as_user = kubernetes.client.CoreV1Api(kube.client(kube.control_plane.write_kubeconfig(
        kube.workdir / "child-maker.kubeconfig", "child-maker", namespace=NS)))

    def create(name: str) -> None:
        as_user.create_namespaced_config_map(NS, {"metadata": {"name": name, "ownerReferences": [{
            "apiVersion": f"{contract.API_GROUP}/{contract.API_VERSION}", "kind": contract.KIND, "name": "owner",
            "uid": owner["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}]}})

    with pytest.raises(ApiException) as refused:
        create("without-the-grant")
    assert refused.value.status == 403 and "blockOwnerDeletion" in refused.value.body, refused.value.body
    rules.append({"apiGroups": [contract.API_GROUP], "resources": [f"{contract.PLURAL}/finalizers"],
                  "verbs": ["update"]})
    rbac.patch_namespaced_role("child-maker", NS, {"rules": rules}, _content_type="application/merge-patch+json")
    wait_for("the grant applied", lambda: _created(create, "with-the-grant"))
    kube.delete_namespace(NS)


def _created(create: Any, name: str) -> bool:
    try:
        create(name)
        return True
    except ApiException as exc:
        if exc.status == 403:
            return False  # RBAC's cache catches up within a second
        raise

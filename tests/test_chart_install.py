"""`helm install`, `upgrade` and `uninstall` of the chart on the real control plane (tests/cluster.py), read back
with kubectl; and the README's cluster commands run there as written.

The operator runs as the chart's Deployment pod (the node agent runs it; its readiness probe gates Ready), with
the chart's ServiceAccount, under Pod Security `restricted` enforced by the API server in its namespace.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml

from tests.cluster import CHART, RELEASE_NAMESPACE, ROOT, KubeCluster, open_schema_crd
from tests.operator_harness import NS, ChartOperator, wait_for
from tests.test_chart import find, render

OPERATOR_ACCOUNT = f"system:serviceaccount:{RELEASE_NAMESPACE}:kubetune-operator"
# The Prometheus Operator's PodMonitor kind: the chart's monitoring switches need the API to exist (as on a
# cluster with kube-prometheus-stack), not its controller.
POD_MONITOR_CRD = open_schema_crd("monitoring.coreos.com", "PodMonitor", "v1")


@pytest.fixture
def release(kube: KubeCluster) -> Iterator[ChartOperator]:
    """A release the test installs itself; uninstalled afterwards, whatever state it is in."""
    chart = ChartOperator(kube)
    yield chart
    kube.run("helm", "uninstall", "kubetune", "-n", RELEASE_NAMESPACE, "--wait", check=False)


def can_i(kube: KubeCluster, verb: str, resource: str, namespace: str, user: str = OPERATOR_ACCOUNT) -> bool:
    resource, _, sub = resource.partition("/")
    extra = ["--subresource", sub] if sub else []
    done = kube.run("kubectl", "auth", "can-i", verb, resource, *extra, "-n", namespace, "--as", user, check=False)
    return done.stdout.strip() == "yes"


def test_helm_installs_upgrades_and_uninstalls_the_chart(kube: KubeCluster, release: ChartOperator,
                                                         tmp_path: Path) -> None:
    release.install()
    rendered = render(tmp_path, {}, release="kubetune")  # the same chart through `helm template`
    deployment = kube.get("deployment", "kubetune-operator", namespace=RELEASE_NAMESPACE)

    def env(deployed: dict[str, Any]) -> list[dict[str, Any]]:  # the server leaves out empty values
        container = deployed["spec"]["template"]["spec"]["containers"][0]
        return [{k: v for k, v in e.items() if v != ""} | ({"valueFrom": {"fieldRef": {"fieldPath": e["valueFrom"][
            "fieldRef"]["fieldPath"]}}} if "fieldRef" in e.get("valueFrom", {}) else {}) for e in container["env"]]

    assert env(deployment) == env(find(rendered, "Deployment")[0])
    assert deployment["status"].get("readyReplicas") == 1 or release.wait_ready()
    role = kube.get("clusterrole", "kubetune-operator")
    assert role["rules"] == find(rendered, "ClusterRole")[0]["rules"]
    binding = kube.get("clusterrolebinding", "kubetune-operator")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kubetune-operator",
                                    "namespace": RELEASE_NAMESPACE}]
    assert kube.get("serviceaccount", "kubetune-trainer", namespace=RELEASE_NAMESPACE)[
        "automountServiceAccountToken"] is False
    assert kube.get("service", "kubetune-operator-metrics", namespace=RELEASE_NAMESPACE)["spec"]["ports"][0][
        "port"] == 9401
    crd = kube.get("crd", "finetunejobs.kubetune.io")
    assert {c["type"]: c["status"] for c in crd["status"]["conditions"]}["Established"] == "True"
    assert crd["spec"]["versions"] == yaml.safe_load((CHART / "crds" / "finetunejob.yaml").read_text())["spec"][
        "versions"]
    explained = kube.run("kubectl", "explain", "finetunejob.spec.resources").stdout
    assert "gpusPerNode" in explained and "GPUs per pod" in explained
    # RBAC as the API server decides it for the operator's own account.
    assert can_i(kube, "create", "jobs.batch", NS) and can_i(kube, "patch", "finetunejobs.kubetune.io/status", NS)
    # It deletes Jobs (attempts beyond the newest three) but never touches Secrets or pods itself.
    assert can_i(kube, "delete", "jobs.batch", NS)
    for verb, resource in (("get", "secrets"), ("list", "secrets"), ("create", "pods"), ("create", "pods/exec"),
                           ("delete", "pods")):
        assert not can_i(kube, verb, resource, NS), f"the operator may {verb} {resource}"

    kube.run("helm", "upgrade", "kubetune", str(CHART), "-n", RELEASE_NAMESPACE, "--set",
             "operator.refreshSeconds=7")
    wait_for("the upgraded Deployment rolled out", lambda: any(
        e == {"name": "KUBETUNE_REFRESH_SECONDS", "value": "7"}
        for p in release.pods() if not p["metadata"].get("deletionTimestamp")
        for e in p["spec"]["containers"][0]["env"]), timeout=90)
    release.wait_ready()
    assert "deployed" in kube.run("helm", "status", "kubetune", "-n", RELEASE_NAMESPACE).stdout

    kube.run("helm", "uninstall", "kubetune", "-n", RELEASE_NAMESPACE, "--wait")
    gone = kube.run("kubectl", "get", "deployment,serviceaccount,clusterrole,clusterrolebinding", "-A",
                    "-l", "app.kubernetes.io/instance=kubetune", "-o", "name").stdout
    assert gone.strip() == "", gone
    assert kube.get("crd", "finetunejobs.kubetune.io")  # helm keeps CRDs: deleting one deletes every job


def test_namespaced_release_grants_roles_only_in_its_namespaces(kube: KubeCluster, release: ChartOperator) -> None:
    kube.namespace(NS)
    release.extra_args = ("--set", "rbac.scope=namespaced", "--set", f"rbac.namespaces={{{NS}}}")
    release.install()
    role = kube.get("role", "kubetune-operator", namespace=NS)
    assert {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["list", "watch", "create", "patch", "delete"]} \
        in role["rules"]
    assert kube.get("serviceaccount", "kubetune-trainer", namespace=NS)["automountServiceAccountToken"] is False
    env = kube.get("deployment", "kubetune-operator", namespace=RELEASE_NAMESPACE)["spec"]["template"]["spec"][
        "containers"][0]["env"]
    assert {"name": "KUBETUNE_NAMESPACES", "value": NS} in env
    assert can_i(kube, "create", "jobs.batch", NS)
    assert not can_i(kube, "create", "jobs.batch", "default")
    assert not can_i(kube, "watch", "finetunejobs.kubetune.io", "default")
    roles = json.loads(kube.run("kubectl", "get", "roles", "-A", "-l", "app.kubernetes.io/instance=kubetune",
                                "-o", "json").stdout)["items"]
    assert [r["metadata"]["namespace"] for r in roles] == [NS]
    kube.run("helm", "uninstall", "kubetune", "-n", RELEASE_NAMESPACE, "--wait")
    kube.delete_namespace(NS)


def readme_cluster_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## On a cluster.*?```sh\n(.*?)```", readme, re.S)
    assert block, "README: no `On a cluster` command block"
    return [line.split(" # ")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_cluster_commands_run_as_written(kube: KubeCluster, release: ChartOperator) -> None:
    """The README's cluster commands in order, on the real API server: helm's and kubectl's own validation on."""
    install, secret, apply, watch, dashboard = (shlex.split(c) for c in readme_cluster_commands())
    assert install[:3] == ["helm", "install", "kubetune"] and "--create-namespace" in install
    kubernetes.client.ApiextensionsV1Api(kube.client()).create_custom_resource_definition(POD_MONITOR_CRD)
    try:
        wait_for("the PodMonitor API", lambda: "podmonitors" in kube.run("kubectl", "api-resources").stdout)
        kube.run(*install)
        release.wait_ready()
        monitor = kube.get("podmonitor", "kubetune-trainers", namespace=RELEASE_NAMESPACE)
        assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
        assert "kubetune.json" in kube.get("configmap", "kubetune-dashboard", namespace=RELEASE_NAMESPACE)["data"]

        kube.namespace(NS)
        kube.run(*secret, "-n", NS)
        stored = kube.get("secret", "s3-credentials", namespace=NS)
        assert set(stored["data"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
        applied = kube.run(*apply, "-n", NS)  # no --validate=false: the server's schema checks it
        assert "finetunejob.kubetune.io/reviews-sentiment created" in applied.stdout
        assert watch == ["kubectl", "get", "ftj", "-w"]
        # -w would wait for changes forever: one listing shows the server's Table of the CRD's printer columns.
        listed = wait_for("a phase in the listing", lambda: (
            out if re.search(r"^reviews-sentiment\s+(Pending|Running|Failed)", out := kube.run(
                "kubectl", "get", "ftj", "-n", NS).stdout, re.M) else None), operator=release)
        assert listed.split()[:5] == ["NAME", "PHASE", "PROGRESS", "LOSS", "AGE"], listed
        assert dashboard[:2] == ["kubectl", "-n"] and "port-forward" in dashboard  # Grafana is not installed here
    finally:
        kube.delete_namespace(NS)
        kube.run("kubectl", "delete", "crd", POD_MONITOR_CRD["metadata"]["name"], check=False)

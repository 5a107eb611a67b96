"""`helm install` of the chart into the emulated API server (tests/fixtures_k8s.py), then the Deployment,
RBAC, ServiceAccounts and CRD read back with kubectl; and the README's cluster commands run against it.

The emulator needs a few more mends for Helm 4 and kubectl than for the operator; each says what a real
API server does. Helm runs with --disable-openapi-validation (the emulator serves no OpenAPI document).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp.web
import kmock
import pytest
import yaml

from tests import kube_protobuf
from tests.k8s_tools import binary
from tests.pss import restricted_violations
from tests.test_chart import find, render

# The operator's emulator fixture; until its branch is merged there is nothing to run.
pytest.importorskip("tests.fixtures_k8s", reason="tests/fixtures_k8s.py (operator branch) is not merged yet")
from tests.fixtures_k8s import RESOURCES, VERBS, Cluster, MendedEmulator, _now

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "kubetune"
RELEASE_NAMESPACE = "kubetune-system"

# What the chart installs beyond what the operator's tests use, as a real API server publishes it.
HELM_RESOURCES: dict[tuple[str, str, str], dict[str, Any]] = {
    ("apps", "v1", "deployments"): {"kind": "Deployment", "namespaced": True, "shortnames": {"deploy"}},
    ("rbac.authorization.k8s.io", "v1", "clusterroles"): {"kind": "ClusterRole", "namespaced": False},
    ("rbac.authorization.k8s.io", "v1", "clusterrolebindings"): {"kind": "ClusterRoleBinding", "namespaced": False},
    ("rbac.authorization.k8s.io", "v1", "roles"): {"kind": "Role", "namespaced": True},
    ("rbac.authorization.k8s.io", "v1", "rolebindings"): {"kind": "RoleBinding", "namespaced": True},
    ("monitoring.coreos.com", "v1", "podmonitors"): {"kind": "PodMonitor", "namespaced": True},
}
ALL_RESOURCES = {**RESOURCES, **HELM_RESOURCES}


class HelmReadyEmulator(MendedEmulator):
    calls: list[tuple[str, str, str]]  # (method, path?query, bearer token): who asked for what

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.calls = []
        for (group, version, plural), info in ALL_RESOURCES.items():
            # Discovery names each resource's singular (kubectl resolves `get deployment/x` through it).
            info = {**info, "singular": info.get("singular", info["kind"].lower())}
            self.resources[kmock.resource(group, version, plural)] = kmock.ResourceInfo(verbs=VERBS, **info)

    def _kind(self, resource: Any) -> str | None:
        info = ALL_RESOURCES.get((resource.group, resource.version, resource.plural))
        return info["kind"] if info else None

    async def _serve_server_version(self, request: Any) -> dict[str, str]:
        # The kubectl/helm under test are 1.33; the chart's kubeVersion constraint reads this.
        return {"major": "1", "minor": "33", "gitVersion": "v1.33.0", "platform": "linux/amd64"}

    async def _serve_version(self, request: Any) -> Any:
        payload: Any = await super()._serve_version(request)
        payload["groupVersion"] = payload["groupVersion"].lstrip("/")  # the core group is "v1", not "/v1"
        return payload

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # client-go's typed clients (Helm's release Secret, kubectl create secret) send protobuf.
        body = await raw_request.read()
        if "protobuf" in raw_request.headers.get("Content-Type", "") and body:
            raw_request._read_bytes = json.dumps(kube_protobuf.decode(body)).encode()
        response: aiohttp.web.StreamResponse = await super().__call__(raw_request)
        return response

    async def _handle(self, request: Any) -> Any:
        method = str(request.method).split(".")[-1].upper()
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        self.calls.append((method, str(request.url.path_qs), token))
        if request.resource is not None and request.name and request.subresource is None:
            key = (request.resource, request.namespace, request.name)
            present = key in self.objects and not self.objects[key].deleted
            if method == "PATCH" and "apply-patch" in request.headers.get("Content-Type", "") and not present:
                self.objects[key] = self._stamped(request)  # server-side apply creates what is absent
            elif method == "PUT" and present:  # update replaces the object
                self.requests_seen.append((method, request.url.path))
                data = {**request.data, "metadata": {**self.objects[key].raw.get("metadata", {}),
                                                     **request.data.get("metadata", {}),
                                                     "resourceVersion": str(time.monotonic_ns())}}
                self.objects[key] = data
                return aiohttp.web.json_response(data)
        return await super()._handle(request)

    def _stamped(self, request: Any) -> dict[str, Any]:
        data = request.data if isinstance(request.data, dict) else yaml.safe_load(request.text)
        meta = data.setdefault("metadata", {})
        if request.namespace:
            meta.setdefault("namespace", request.namespace)
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1,
                    resourceVersion=str(time.monotonic_ns()))
        return dict(data)


class HelmCluster(Cluster):
    emulator_type = HelmReadyEmulator

    async def _register(self) -> None:
        """Namespaces only: Helm installs the CRD itself. (The emulator cannot create cluster-scoped objects
        by POST, so `--create-namespace` and `kubectl create namespace` are replaced by this.)"""
        assert self.emulator is not None
        for namespace in ("default", "ml", RELEASE_NAMESPACE):
            self.emulator.objects["v1/namespaces", None, namespace] = {
                "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace, "uid": str(uuid.uuid4())}}


    def kubeconfig_for(self, token: str) -> Path:
        """A kubeconfig whose requests carry `token`, as a ServiceAccount's would: the calls tell them apart."""
        config = yaml.safe_load(self.kubeconfig.read_text())
        config["users"][0]["user"]["token"] = token
        path = self.workdir / f"kubeconfig-{token}"
        path.write_text(yaml.safe_dump(config))
        return path


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[HelmCluster]:
    started = HelmCluster(tmp_path)
    started.start()
    yield started
    started.stop()


def run(cluster: Cluster, command: list[str]) -> subprocess.CompletedProcess[str]:
    tool = {"helm": binary("helm"), "kubectl": binary("kubectl")}[command[0]]
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    done = subprocess.run([str(tool), *command[1:]], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{shlex.join(command)}\n{done.stdout}\n{done.stderr}"
    return done


def read(cluster: Cluster, *what: str, namespace: str = RELEASE_NAMESPACE) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(run(cluster, ["kubectl", "-n", namespace, "get", *what, "-o", "json"]).stdout)
    return found


def test_helm_installs_the_chart_and_kubectl_reads_it_back(cluster: HelmCluster, tmp_path: Path) -> None:
    done = run(cluster, ["helm", "install", "kubetune", str(CHART), "-n", RELEASE_NAMESPACE,
                         "--disable-openapi-validation"])
    assert "STATUS: deployed" in done.stdout and "kubectl get finetunejobs -w" in done.stdout
    rendered = render(tmp_path, {}, release="kubetune")  # the same chart through `helm template`

    deployment = read(cluster, "deployment", "kubetune-operator")
    want = find(rendered, "Deployment")[0]
    assert deployment["spec"]["template"]["spec"] == want["spec"]["template"]["spec"]
    assert restricted_violations(deployment["spec"]["template"]["spec"]) == []
    assert deployment["metadata"]["annotations"]["meta.helm.sh/release-name"] == "kubetune"

    role = read(cluster, "clusterrole", "kubetune-operator")
    assert role["rules"] == find(rendered, "ClusterRole")[0]["rules"]
    binding = read(cluster, "clusterrolebinding", "kubetune-operator")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kubetune-operator",
                                    "namespace": RELEASE_NAMESPACE}]
    assert read(cluster, "serviceaccount", "kubetune-trainer")["automountServiceAccountToken"] is False
    assert read(cluster, "service", "kubetune-operator-metrics")["spec"]["ports"][0]["port"] == 9401

    crd = read(cluster, "crd", "finetunejobs.kubetune.io")
    assert crd["spec"] == yaml.safe_load((CHART / "crds" / "finetunejob.yaml").read_text())["spec"]
    assert "deployed" in run(cluster, ["helm", "status", "kubetune", "-n", RELEASE_NAMESPACE]).stdout


def test_namespaced_release_grants_roles_only_in_its_namespaces(cluster: HelmCluster) -> None:
    run(cluster, ["helm", "install", "team", str(CHART), "-n", RELEASE_NAMESPACE, "--disable-openapi-validation",
                  "--set", "rbac.scope=namespaced", "--set", "rbac.namespaces={ml}"])
    role = read(cluster, "role", "team-kubetune-operator", namespace="ml")
    assert {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["list", "create", "patch"]} \
        in role["rules"]
    assert read(cluster, "rolebinding", "team-kubetune-operator", namespace="ml")["roleRef"]["kind"] == "Role"
    assert read(cluster, "serviceaccount", "kubetune-trainer", namespace="ml")["automountServiceAccountToken"] is False
    env = read(cluster, "deployment", "team-kubetune-operator")["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "KUBETUNE_NAMESPACES", "value": "ml"} in env
    roles = json.loads(run(cluster, ["kubectl", "get", "roles", "-A", "-o", "json"]).stdout)["items"]
    assert [r["metadata"]["namespace"] for r in roles] == ["ml"]


def readme_cluster_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## On a cluster.*?```sh\n(.*?)```", readme, re.S)
    assert block, "README: no `On a cluster` command block"
    return [line.split(" # ")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_cluster_commands_run_against_the_emulated_api(cluster: HelmCluster) -> None:
    """The README's five commands in order, adapted only where the emulator needs it (said inline)."""
    install, secret, apply, watch, dashboard = (shlex.split(c) for c in readme_cluster_commands())
    assert install[:3] == ["helm", "install", "kubetune"] and "--create-namespace" in install
    install = [w for w in install if w != "--create-namespace"]  # the namespace exists (see _register)
    run(cluster, [*install, "--disable-openapi-validation"])  # the chart's PodMonitor + dashboard switches on
    assert read(cluster, "podmonitor", "kubetune-trainers")["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert "kubetune.json" in read(cluster, "configmap", "kubetune-dashboard")["data"]

    run(cluster, [*secret, "-n", "ml"])
    stored = read(cluster, "secret", "s3-credentials", namespace="ml")
    assert set(stored["data"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}

    run(cluster, [*apply, "-n", "ml", "--validate=false"])  # validation would need the OpenAPI document
    assert watch == ["kubectl", "get", "ftj", "-w"]
    # -w would wait for changes forever. The Phase/Progress/Loss columns are rendered by a real API server
    # (Table responses, from the CRD's printer columns); the emulator serves plain lists, so kubectl shows NAME, AGE.
    listed = run(cluster, ["kubectl", "get", "ftj", "-n", "ml"]).stdout
    assert re.search(r"^reviews-sentiment\s", listed, re.M), listed
    assert dashboard[:2] == ["kubectl", "-n"] and "port-forward" in dashboard  # Grafana: a real cluster only

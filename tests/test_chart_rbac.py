"""RBAC is exactly sufficient: every API request the operator makes is allowed by the chart's rules, and
every rule is used by some request. Requests are what the emulated API server recorded (method, path)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.test_chart import find, render

NON_RESOURCE_PREFIXES = ("/version", "/healthz", "/openapi")  # discovery and health: granted to every user


@dataclass(frozen=True)
class Access:
    verb: str
    group: str
    resource: str  # with "/subresource" when there is one
    namespace: str | None  # None: a cluster-scoped object or a request across all namespaces
    name: str | None


def access(method: str, url: str) -> Access | None:
    """The RBAC attributes of one request, as the API server's RequestInfo derives them; None: non-resource."""
    parts_url = urlsplit(url)
    parts = [p for p in parts_url.path.split("/") if p]
    if not parts or parts_url.path.startswith(NON_RESOURCE_PREFIXES):
        return None
    if parts[0] == "api" and len(parts) >= 2:
        group, rest = "", parts[2:]
    elif parts[0] == "apis" and len(parts) >= 3:
        group, rest = parts[1], parts[3:]
    else:
        return None
    if not rest:
        return None  # /api/v1, /apis/<group>/<version>: discovery
    namespace = None
    if rest[0] == "namespaces" and len(rest) >= 3:
        namespace, rest = rest[1], rest[2:]
    resource, name, sub = rest[0], (rest[1] if len(rest) > 1 else None), (rest[2] if len(rest) > 2 else None)
    watching = parse_qs(parts_url.query).get("watch", ["false"])[0] in ("true", "1")
    verb = {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method.upper())
    if method.upper() == "GET":
        verb = "watch" if watching else ("get" if name else "list")
    elif method.upper() == "DELETE":
        verb = "delete" if name else "deletecollection"
    assert verb, f"unexpected method {method}"
    return Access(verb, group, resource + (f"/{sub}" if sub else ""), namespace, name)


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


@pytest.mark.parametrize(("method", "url", "expected"), [
    ("GET", "/apis/kubetune.io/v1alpha1/finetunejobs?watch=true", Access("watch", "kubetune.io", "finetunejobs",
                                                                      None, None)),
    ("GET", "/apis/kubetune.io/v1alpha1/namespaces/ml/finetunejobs", Access("list", "kubetune.io", "finetunejobs",
                                                                         "ml", None)),
    ("PATCH", "/apis/kubetune.io/v1alpha1/namespaces/ml/finetunejobs/a/status",
     Access("patch", "kubetune.io", "finetunejobs/status", "ml", "a")),
    ("POST", "/apis/batch/v1/namespaces/ml/jobs", Access("create", "batch", "jobs", "ml", None)),
    ("DELETE", "/apis/batch/v1/namespaces/ml/jobs/a-0", Access("delete", "batch", "jobs", "ml", "a-0")),
    ("GET", "/api/v1/namespaces/ml/pods/a-0-0", Access("get", "", "pods", "ml", "a-0-0")),
    ("GET", "/api/v1/namespaces/ml", Access("get", "", "namespaces", None, "ml")),
    ("POST", "/api/v1/namespaces/ml/events", Access("create", "", "events", "ml", None)),
    ("GET", "/apis", None), ("GET", "/api/v1", None), ("GET", "/apis/kubetune.io/v1alpha1", None),
    ("GET", "/version", None),
])
def test_request_attributes(method: str, url: str, expected: Access | None) -> None:
    assert access(method, url) == expected


def test_namespaced_mode_keeps_job_rules_inside_the_watched_namespaces(tmp_path: Path) -> None:
    objects = render(tmp_path, {"rbac.scope": "namespaced", "rbac.namespaces": ["ml"]})
    create_job = Access("create", "batch", "jobs", "ml", None)
    assert granted(objects, create_job)
    assert not granted(objects, Access("create", "batch", "jobs", "other", None))
    assert not granted(objects, Access("watch", "kubetune.io", "finetunejobs", None, None))  # cluster-wide
    assert granted(render(tmp_path, {}), Access("watch", "kubetune.io", "finetunejobs", None, None))
    assert not granted(objects, Access("get", "", "secrets", "ml", "s3-credentials"))


@pytest.mark.parametrize("scope", ["cluster", "namespaced"])
def test_installed_rbac_is_exactly_what_the_operator_uses(tmp_path: Path, scope: str) -> None:
    """The chart installed by helm (cluster-wide, or namespaced: a Role in the watched namespace), the real
    operator started with the Deployment's env and a token of its own; the test plays the Job controller
    through a job's life (pre-flight, run, succeed, serve, TTL-delete) and a suspension."""
    harness = pytest.importorskip("tests.operator_harness", reason="the operator harness is not merged yet")
    import kmock

    from kubetune.jobfile import job_document
    from kubetune.netutil import free_port
    from kubetune_operator import serving
    from tests.test_chart_install import CHART, RELEASE_NAMESPACE, HelmCluster, read, run

    cluster = HelmCluster(tmp_path)
    cluster.start()
    try:
        scoped = ["--set", "rbac.scope=namespaced", "--set", f"rbac.namespaces={{{harness.NS}}}"]
        run(cluster, ["helm", "install", "kubetune", str(CHART), "-n", RELEASE_NAMESPACE,
                      "--disable-openapi-validation", *(scoped if scope == "namespaced" else [])])
        installed = [read(cluster, "clusterrole", "kubetune-operator")]
        if scope == "namespaced":
            installed.append(read(cluster, "role", "kubetune-operator", namespace=harness.NS))
        assert cluster.emulator is not None  # KServe installed: the operator creates and follows the service
        cluster.emulator.resources[kmock.resource(serving.KSERVE_GROUP, serving.KSERVE_VERSION,
                                                  serving.INFERENCE_SERVICES)] = kmock.ResourceInfo(
            kind=serving.INFERENCE_SERVICE, namespaced=True, verbs={"get", "list", "create", "delete"})
        container = read(cluster, "deployment", "kubetune-operator")["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value", "") for e in container["env"]}
        env.update(KUBETUNE_REFRESH_SECONDS="1", KUBETUNE_HEALTH_PORT=str(free_port()),
                   KUBETUNE_OPERATOR_METRICS_PORT=str(free_port()))
        operator = harness.Operator(cluster.kubeconfig_for("operator"), env, tmp_path / "operator.log").start()
        api = harness.Api(cluster.kubeconfig)

        def submit(name: str, **spec: Any) -> None:
            doc = job_document(name, {"model": {"uri": "s3://models/m/", "task": "causal-lm"},
                                      "data": {"train": "s3://data/d.jsonl"}, "output": {"uri": "s3://out/x/"}}, spec)
            doc["metadata"]["namespace"] = harness.NS
            api.apply(doc)

        def wait(what: str, check: Any) -> Any:
            return harness.wait_for(what, check, timeout=60, operator=operator)

        def pass_preflight(name: str) -> None:
            """The chart turns the pre-flight Job on: play it through to success first."""
            wait("the pre-flight Job", lambda: api.job(f"{name}-preflight"))
            [checker] = api.start_pods(f"{name}-preflight")
            api.terminate(checker, 0, reason="Completed")
            api.finish_job(f"{name}-preflight", "Complete")

        submit("done", runPolicy={"ttlSecondsAfterFinished": 3}, deploy={"kserve": {}})
        pass_preflight("done")
        wait("the Job", lambda: api.job("done-0"))
        [pod] = api.start_pods("done-0")
        api.terminate(pod, 0, '{"outcome": "Succeeded", "exitCode": 0}', reason="Completed")
        api.finish_job("done-0", "Complete")
        wait("TTL deletion", lambda: api.ftj("done") is None)
        submit("held")
        pass_preflight("held")
        wait("the Job", lambda: api.job("held-0"))
        api.patch_ftj("held", {"spec": {"runPolicy": {"suspend": True}}})
        wait("Job suspended", lambda: api.job("held-0")["spec"]["suspend"] is True)
        assert operator.stop() == 0, operator.tail()
    finally:
        cluster.stop()

    assert cluster.emulator is not None
    wanted = {a for m, url, token in cluster.emulator.calls if token == "operator" and (a := access(m, url))}
    assert wanted, "no requests from the operator were recorded"
    assert [a for a in wanted if not granted(installed, a)] == [], "requests the chart's RBAC would deny"
    used = {(a.group, a.resource, a.verb) for a in wanted}
    assert grants(installed) - used == set(), "grants no request used"

"""The Helm chart, rendered by the real helm 4: lint, every switch combination through the official
schemas, the values schema, the operator Deployment's security, RBAC shape and the CRD copy."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.k8s_tools import binary
from tests.pss import restricted_violations

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "kubetune"
KUBE_VERSION = "1.33.0"
MONITORING_APIS = [f"monitoring.coreos.com/v1/{kind}" for kind in ("ServiceMonitor", "PodMonitor", "PrometheusRule")]
# The operator settings agreed in the design (operator/kubetune_operator/settings.py reads them).
OPERATOR_ENV = {"KUBETUNE_TRAINER_IMAGE", "KUBETUNE_NAMESPACES", "KUBETUNE_OPERATOR_METRICS_PORT",
                "KUBETUNE_HEALTH_PORT", "KUBETUNE_REFRESH_SECONDS", "KUBETUNE_STALL_SECONDS",
                "KUBETUNE_LEADER_ELECTION",
                "KUBETUNE_TRAINER_SERVICE_ACCOUNT", "KUBETUNE_PREFLIGHT", "KUBETUNE_RESYNC_SECONDS",
                "KUBETUNE_IMAGE_PULL_SECONDS", "KUBETUNE_LEASE_NAME", "KUBETUNE_LEASE_NAMESPACE", "KUBETUNE_POD_NAME",
                # the chart's defaults for every job's pods (jobPods.*)
                "KUBETUNE_IMAGE_PULL_SECRETS", "KUBETUNE_PREFLIGHT_IMAGE", "KUBETUNE_PREFLIGHT_NODE_SELECTOR",
                "KUBETUNE_PREFLIGHT_TOLERATIONS"}


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(binary("helm")), *args], capture_output=True, text=True, timeout=120)


def nested(flat: dict[str, Any]) -> dict[str, Any]:
    """{"a.b": 1} -> {"a": {"b": 1}}: values written the way `--set` names them."""
    out: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split(".")
        node = out
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return out


def helm_with_values(tmp: Path, command: str, values: dict[str, Any], *args: str,
                     release: str = "t") -> subprocess.CompletedProcess[str]:
    values_file = tmp / f"values-{abs(hash(json.dumps(values, sort_keys=True)))}.json"
    values_file.write_text(json.dumps(nested(values)))  # JSON is YAML
    extra = [release, str(CHART)] if command in ("template", "install") else [str(CHART)]
    return helm(command, *extra, "--namespace", "kubetune-system", "-f", str(values_file), *args)


def render(tmp: Path, values: dict[str, Any], api_versions: list[str] | None = None,
           release: str = "t") -> list[dict[str, Any]]:
    api_args = [arg for api in api_versions or [] for arg in ("--api-versions", api)]
    done = helm_with_values(tmp, "template", values, "--kube-version", KUBE_VERSION, *api_args, release=release)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def find(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def monitoring_problems(obj: dict[str, Any]) -> list[str]:
    """The Prometheus Operator kinds have no official schema here: check the fields this chart sets."""
    spec, kind = obj.get("spec") or {}, obj["kind"]
    problems = [] if obj["apiVersion"] == "monitoring.coreos.com/v1" else [f"{kind}: apiVersion"]
    if kind in ("ServiceMonitor", "PodMonitor"):
        endpoints = spec.get("endpoints" if kind == "ServiceMonitor" else "podMetricsEndpoints") or []
        if not (spec.get("selector", {}).get("matchLabels") and endpoints
                and all(isinstance(e.get("port"), str) and re.fullmatch(r"\d+[smh]", e["interval"])
                        for e in endpoints)):
            problems.append(f"{kind}: selector.matchLabels and endpoints with a named port and an interval")
    if kind == "PrometheusRule":
        rules = [r for g in spec.get("groups") or [] for r in g.get("rules") or []]
        if not rules or not all(("alert" in r or "record" in r) and isinstance(r.get("expr"), str) for r in rules):
            problems.append("PrometheusRule: every rule needs alert|record and an expr")
    return problems


def validation_problems(objects: list[dict[str, Any]]) -> list[str]:
    problems = []
    for obj in objects:
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            problems += monitoring_problems(obj)
            continue
        try:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message} at {list(exc.path)}")
    return problems


SWITCHES = ["metrics.serviceMonitor.enabled", "metrics.podMonitor.enabled", "metrics.prometheusRule.enabled",
            "grafana.dashboard.enabled", "operator.leaderElection.enabled"]


def combination(scope: str, flags: tuple[bool, ...]) -> dict[str, Any]:
    values: dict[str, Any] = {"rbac.scope": scope, **dict(zip(SWITCHES, flags, strict=True))}
    if scope == "namespaced":
        values["rbac.namespaces"] = ["team-a", "team-b"]
    if values["operator.leaderElection.enabled"]:
        values["operator.replicas"] = 2
    return values


def test_tools_are_helm_4_and_kubectl_1_33() -> None:
    assert helm("version", "--short").stdout.startswith("v4.")
    kubectl = subprocess.run([str(binary("kubectl")), "version", "--client"], capture_output=True, text=True)
    assert "Client Version: v1.33." in kubectl.stdout


def test_chart_crd_is_the_generated_crd() -> None:
    assert (CHART / "crds" / "finetunejob.yaml").read_bytes() == (ROOT / "crds" / "finetunejob.yaml").read_bytes(), (
        "charts/kubetune/crds/ drifted from crds/: cp crds/finetunejob.yaml charts/kubetune/crds/")


def test_app_version_is_the_package_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["appVersion"] == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


@pytest.mark.parametrize("values", [{}, {"rbac.scope": "namespaced"},
                                    {"rbac.scope": "namespaced", "rbac.namespaces": ["a", "b"]},
                                    {"metrics.service.enabled": False, "serviceAccount.trainer.create": False,
                                     "serviceAccount.operator.create": False, "serviceAccount.operator.name": "mine"},
                                    {"grafana.dashboard.enabled": True},
                                    {"operator.leaderElection.enabled": True, "operator.replicas": 3},
                                    dict.fromkeys(SWITCHES[:4], True),
                                    {"networkPolicy.enabled": True, "networkPolicy.egress.enabled": True}], ids=repr)
def test_lint_strict(tmp_path: Path, values: dict[str, Any]) -> None:
    # helm 4's lint reports a template's `fail` (missing Prometheus Operator/kopf APIs) as INFO, not an error;
    # those messages are tested with `helm template` below.
    done = helm_with_values(tmp_path, "lint", values, "--strict")
    assert done.returncode == 0 and "1 chart(s) linted, 0 chart(s) failed" in done.stdout, done.stdout + done.stderr


def test_every_switch_combination_renders_objects_the_official_schemas_accept(tmp_path: Path) -> None:
    combos = [combination(scope, flags) for scope in ("cluster", "namespaced")
              for flags in itertools.product([False, True], repeat=len(SWITCHES))]
    with ThreadPoolExecutor(4) as pool:  # helm is a separate process: threads overlap them
        rendered = list(pool.map(lambda v: render(tmp_path, v, MONITORING_APIS), combos))
    # Each distinct object once: loading the official schema takes ~50 ms per object.
    distinct = {json.dumps(o, sort_keys=True): o for objects in rendered for o in objects}
    assert validation_problems(list(distinct.values())) == []
    for values, objects in zip(combos, rendered, strict=True):
        kinds = [o["kind"] for o in objects]
        assert ("ServiceMonitor" in kinds) == values["metrics.serviceMonitor.enabled"]
        assert ("PodMonitor" in kinds) == values["metrics.podMonitor.enabled"]
        assert ("PrometheusRule" in kinds) == values["metrics.prometheusRule.enabled"]
        assert ("ConfigMap" in kinds) == values["grafana.dashboard.enabled"]
        deployment = find(objects, "Deployment")[0]
        electing = values["operator.leaderElection.enabled"]
        assert deployment["spec"]["replicas"] == (2 if electing else 1)
        assert len(find(objects, "Role")) == (2 if values["rbac.scope"] == "namespaced" else 0) + electing
        assert deployment["spec"]["strategy"]["type"] == ("RollingUpdate" if electing else "Recreate")


def test_monitoring_switches_render_offline() -> None:
    """`helm template` with the README's monitoring flags and no cluster renders the monitors (kube-prometheus-
    stack's exporters' convention: rendered when asked; installing them needs the CRDs). Issue 28, item 5: it
    failed, "needs the monitoring.coreos.com/v1/PodMonitor API, which this cluster does not serve"."""
    flags = [arg for switch in ("metrics.podMonitor.enabled", "metrics.serviceMonitor.enabled",
                                "metrics.prometheusRule.enabled", "grafana.dashboard.enabled")
             for arg in ("--set", f"{switch}=true")]
    done = helm("template", "kubetune", str(CHART), "-n", "kubetune-system", *flags)
    assert done.returncode == 0, done.stderr
    kinds = {doc["kind"] for doc in yaml.safe_load_all(done.stdout) if doc}
    assert {"PodMonitor", "ServiceMonitor", "PrometheusRule", "ConfigMap"} <= kinds


def test_more_than_one_replica_needs_leader_election(tmp_path: Path) -> None:
    done = helm_with_values(tmp_path, "template", {"operator.replicas": 2})
    assert done.returncode != 0 and "at '/operator/replicas': maximum: got 2, want 1" in done.stderr  # the schema


@pytest.mark.parametrize(("values", "message"), [
    ({"rbac.scope": "everywhere"}, "at '/rbac/scope': value must be one of 'cluster', 'namespaced'"),
    ({"operator.refreshSeconds": "ten"}, "at '/operator/refreshSeconds': got string, want integer"),
    ({"operator.replicas": 2}, "at '/operator/replicas': maximum: got 2, want 1"),
    ({"operator.metricsPort": 70000}, "at '/operator/metricsPort': maximum"),
    ({"image.operator.tags": "v1"}, "at '/image/operator': additional properties 'tags' not allowed"),
    ({"rbac.namespaces": ["Team_A"]}, "at '/rbac/namespaces/0'"),
    ({"metrics.podMonitor.interval": "often"}, "at '/metrics/podMonitor/interval'"),
    ({"extra": True}, "additional properties 'extra' not allowed"),
    ({"jobPods.imagePullSecrets": ["Team_Registry"]}, "at '/jobPods/imagePullSecrets/0'"),
    ({"networkPolicy.egress.rule": []}, "at '/networkPolicy/egress': additional properties 'rule' not allowed"),
], ids=lambda v: json.dumps(v) if isinstance(v, dict) else "")
def test_values_schema_rejects_wrong_values(tmp_path: Path, values: dict[str, Any], message: str) -> None:
    done = helm_with_values(tmp_path, "template", values)
    assert done.returncode != 0
    assert message in done.stderr, done.stderr


def test_every_value_has_a_doc_comment() -> None:
    """Each key carries a `# --` comment, or sits under one that does (e.g. resources.requests.cpu)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    documented_indents: list[int] = []  # indents of documented ancestors still open
    undocumented = []
    for number, line in enumerate(lines):
        match = re.match(r"^( *)([\w.-]+):", line)
        if not match:
            continue
        indent = len(match.group(1))
        documented_indents = [i for i in documented_indents if i < indent]
        above = number - 1
        while above >= 0 and lines[above].strip().startswith("#") and not lines[above].strip().startswith("# --"):
            above -= 1  # a `# --` comment may continue over several lines
        is_parent = line.rstrip().endswith(":") and number + 1 < len(lines) and \
            len(lines[number + 1]) - len(lines[number + 1].lstrip()) > indent  # a grouping key: its keys count
        if above >= 0 and lines[above].strip().startswith("# --"):
            documented_indents.append(indent)
        elif not documented_indents and not is_parent:
            undocumented.append(match.group(2))
    assert undocumented == []


def test_operator_deployment_is_restricted_and_probed(tmp_path: Path) -> None:
    objects = render(tmp_path, {})
    deployment = find(objects, "Deployment")[0]
    pod = deployment["spec"]["template"]["spec"]
    assert restricted_violations(pod, deployment["spec"]["template"]["metadata"].get("annotations")) == []
    (container,) = pod["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert deployment["spec"]["strategy"]["type"] == "Recreate"  # never two operators at once
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"health": 8080, "metrics": 9401}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert set(env) == OPERATOR_ENV
    assert env["KUBETUNE_TRAINER_IMAGE"] == "ghcr.io/kubetune/trainer:0.1.0"
    assert container["image"] == "ghcr.io/kubetune/operator:0.1.0"
    assert env["KUBETUNE_NAMESPACES"] == "" and env["KUBETUNE_LEADER_ELECTION"] == "false"
    assert env["KUBETUNE_TRAINER_SERVICE_ACCOUNT"] == "kubetune-trainer"


def test_image_tags_and_namespaces_reach_the_operator(tmp_path: Path) -> None:
    objects = render(tmp_path, {"image.trainer.tag": "0.1.0-cpu", "image.operator.repository": "reg.local/op",
                                "rbac.scope": "namespaced", "rbac.namespaces": ["ml", "research"]})
    container = find(objects, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["KUBETUNE_TRAINER_IMAGE"] == "ghcr.io/kubetune/trainer:0.1.0-cpu"
    assert container["image"] == "reg.local/op:0.1.0"
    assert env["KUBETUNE_NAMESPACES"] == "ml,research"
    assert sorted(r["metadata"]["namespace"] for r in find(objects, "Role")) == ["ml", "research"]
    assert sorted(b["metadata"]["namespace"] for b in find(objects, "RoleBinding")) == ["ml", "research"]


def test_every_operator_setting_reaches_its_own_variable(tmp_path: Path) -> None:
    """Distinct values for every setting: each must arrive in its own variable (a template that fills one from
    another's value passes with the defaults, where several are alike)."""
    values = {"operator.refreshSeconds": 3, "operator.resyncSeconds": 77, "operator.stallSeconds": 1234,
              "operator.imagePullSeconds": 41,
              "operator.preflight": False,
              "operator.healthPort": 8181, "operator.metricsPort": 9555, "operator.leaderElection.enabled": True,
              "operator.replicas": 2, "serviceAccount.trainer.name": "trainers",
              "jobPods.imagePullSecrets": ["reg-a", "reg-b"], "jobPods.preflight.image": "reg.local/trainer:cpu",
              "jobPods.preflight.nodeSelector": {"pool": "cpu"}, "jobPods.preflight.tolerations": [{"key": "t"}]}
    objects = render(tmp_path, values)
    env = {e["name"]: e.get("value") for e in
           find(objects, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["env"]}
    downward = {"KUBETUNE_LEASE_NAMESPACE", "KUBETUNE_POD_NAME"}  # from the pod itself (fieldRef)
    assert {k: env[k] for k in OPERATOR_ENV - {"KUBETUNE_TRAINER_IMAGE", "KUBETUNE_NAMESPACES"} - downward} == {
        "KUBETUNE_REFRESH_SECONDS": "3", "KUBETUNE_RESYNC_SECONDS": "77", "KUBETUNE_STALL_SECONDS": "1234",
        "KUBETUNE_IMAGE_PULL_SECONDS": "41",
        "KUBETUNE_PREFLIGHT": "false",
        "KUBETUNE_HEALTH_PORT": "8181", "KUBETUNE_OPERATOR_METRICS_PORT": "9555", "KUBETUNE_LEADER_ELECTION": "true",
        "KUBETUNE_TRAINER_SERVICE_ACCOUNT": "trainers", "KUBETUNE_LEASE_NAME": "t-kubetune-operator",
        "KUBETUNE_IMAGE_PULL_SECRETS": "reg-a,reg-b", "KUBETUNE_PREFLIGHT_IMAGE": "reg.local/trainer:cpu",
        "KUBETUNE_PREFLIGHT_NODE_SELECTOR": '{"pool":"cpu"}', "KUBETUNE_PREFLIGHT_TOLERATIONS": '[{"key":"t"}]'}


def test_trainer_service_account_mounts_no_token_in_every_job_namespace(tmp_path: Path) -> None:
    cases: list[tuple[dict[str, Any], set[str]]] = [
        ({}, {"kubetune-system"}),
        ({"serviceAccount.trainer.namespaces": ["ml"]}, {"kubetune-system", "ml"}),
        ({"rbac.scope": "namespaced", "rbac.namespaces": ["ml"]}, {"ml"}),
    ]
    for values, namespaces in cases:
        accounts = [a for a in find(render(tmp_path, values), "ServiceAccount") if a["metadata"]["name"] ==
                    "kubetune-trainer"]
        assert {a["metadata"]["namespace"] for a in accounts} == namespaces
        assert all(a["automountServiceAccountToken"] is False for a in accounts)


def test_rbac_grants_no_wildcards_and_no_secrets(tmp_path: Path) -> None:
    for scope in ("cluster", "namespaced"):
        objects = render(tmp_path, {"rbac.scope": scope, "operator.leaderElection.enabled": True,
                                    "operator.replicas": 2})
        rules = [r for o in objects if o["kind"] in ("Role", "ClusterRole") for r in o["rules"]]
        for rule in rules:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], rule
            assert "secrets" not in rule["resources"]
        binding = find(objects, "ClusterRoleBinding")[0]
        assert binding["subjects"][0]["name"] == find(objects, "ServiceAccount")[0]["metadata"]["name"]


def test_notes_tell_how_to_submit_and_watch_a_job(tmp_path: Path) -> None:
    done = helm_with_values(tmp_path, "install", {}, "--dry-run=client")
    assert done.returncode == 0, done.stderr
    notes = done.stdout.split("NOTES:", 1)[1]
    for command in ("kubectl -n kubetune-system rollout status deployment/t-kubetune-operator",
                    "kubectl create secret generic s3-credentials", "kubectl apply -f",
                    "kubectl get finetunejobs -w"):
        assert command in notes
    example = re.search(r"examples/([\w-]+\.yaml)", notes)
    assert example and (ROOT / "examples" / example.group(1)).is_file()


def test_monitoring_files_are_wrapped_unchanged(tmp_path: Path) -> None:
    objects = render(tmp_path, {"metrics.prometheusRule.enabled": True, "grafana.dashboard.enabled": True},
                     MONITORING_APIS)
    rules = yaml.safe_load((CHART / "files" / "prometheus-rules.yaml").read_text())
    assert find(objects, "PrometheusRule")[0]["spec"]["groups"] == rules["groups"]
    (dashboard,) = find(objects, "ConfigMap")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads((CHART / "files" / "grafana-dashboard.json").read_text())
    assert json.loads(dashboard["data"]["kubetune.json"]) == shipped

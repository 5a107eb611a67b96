"""Multi-tenant safety on the real control plane: a FineTuneJob never lets its author do what they could not do
with Pods and Secrets directly (issue 31).

The operator creates a job's pods with its own rights; the chart's ValidatingAdmissionPolicy makes the API
server check the author's instead, at `kubectl apply`. Two users with client certificates, both in group
`team-a`, which gets the user guide's roles ("Running kubetune for several teams", applied here as written):
alice has only those (FineTuneJobs, and `get` on the team's own Secret by name); bob is also bound to the
built-in `edit` role (Pods, Secrets). A namespace ResourceQuota bounds the GPUs a team holds.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml

from kubetune import contract
from kubetune.jobfile import job_document
from tests.cluster import CHART, RELEASE_NAMESPACE, ROOT, SCRIPTED_IMAGE, KubeCluster
from tests.operator_harness import NS, TEST_VALUES, Api, ChartOperator, merged, wait_for
from tests.scripted_trainer import ScriptedTrainer
from tests.test_chart import find, helm_with_values, render
from tests.test_chart_install import OPERATOR_ACCOUNT, can_i

POLICY = "kubetune-author-rights"
RULES = ["image", "secretRef", "imagePullSecrets", "tolerations", "nodeSelector", "priorityClassName",
         "servingServiceAccount"]
TEAM_SECRET = "team-a-s3"  # the guide's team Secret; the namespace also holds s3-credentials, not granted
CUSTOM_IMAGE = f"{SCRIPTED_IMAGE}:2"  # not the chart's trainer image (tag 1), yet one the node agent runs
VALUES = {
    "operator": {"preflight": True},  # the pre-flight pod, too, must fit the team's quota
    "admissionPolicy": {
        "image": {"allowed": [f"^{SCRIPTED_IMAGE}:team-a-[0-9]+$"]},
        "tolerations": {"allowed": [{"key": "kubetune.io/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
        "nodeSelector": {"allowed": {"kubetune.io/pool": ["gpu"]}},
        "priorityClassName": {"allowed": ["team-batch"]},
    },
}
BASE = {"model": {"uri": "s3://models/m/", "task": "causal-lm"}, "data": {"train": "s3://data/d.jsonl"},
        "output": {"uri": "s3://out/x/"}, "storage": {"secretRef": TEAM_SECRET},
        "resources": {"gpusPerNode": 0, "cpu": "1", "memory": "1Gi"}}


@dataclass(frozen=True)
class Case:
    id: str
    spec: dict[str, Any]
    field: str = ""  # what a refusal must name
    rule: str = ""


# What alice is refused and bob is not: each is something only Pod or Secret rights give.
REFUSED = [
    Case("custom image", {"image": CUSTOM_IMAGE}, "spec.image", "admissionPolicy.image"),
    Case("trainer image under another registry", {"image": f"registry.evil.example/{SCRIPTED_IMAGE}:1"},
         "spec.image", "admissionPolicy.image"),
    Case("a Secret alice may not read", {"storage": {"secretRef": "s3-credentials"}},
         "spec.storage.secretRef", "admissionPolicy.secretRef"),
    Case("registry credentials alice may not read", {"imagePullSecrets": [TEAM_SECRET, "s3-credentials"]},
         "spec.imagePullSecrets", "admissionPolicy.imagePullSecrets"),
    Case("toleration of every effect", {"resources": {"tolerations": [{"key": "kubetune.io/gpu",
                                                                       "operator": "Exists"}]}},
         "spec.resources.tolerations", "admissionPolicy.tolerations"),
    Case("toleration of every taint", {"resources": {"tolerations": [{"operator": "Exists"}]}},
         "spec.resources.tolerations", "admissionPolicy.tolerations"),
    Case("a chosen node", {"resources": {"nodeSelector": {"kubernetes.io/hostname": "gpu-node"}}},
         "spec.resources.nodeSelector", "admissionPolicy.nodeSelector"),
    Case("another pool", {"resources": {"nodeSelector": {"kubetune.io/pool": "cpu"}}},
         "spec.resources.nodeSelector", "admissionPolicy.nodeSelector"),
    Case("a priority class", {"resources": {"priorityClassName": "system-cluster-critical"}},
         "spec.resources.priorityClassName", "admissionPolicy.priorityClassName"),
    Case("the model server's ServiceAccount", {"deploy": {"kserve": {"serviceAccountName": "deployer"}}},
         "spec.deploy.kserve.serviceAccountName", "admissionPolicy.servingServiceAccount"),
]
# What the chart's values let anyone use.
ALLOWED = [
    Case("nothing special", {}),
    Case("the chart's trainer image, named", {"image": f"{SCRIPTED_IMAGE}:1"}),
    Case("an image matching admissionPolicy.image.allowed", {"image": f"{SCRIPTED_IMAGE}:team-a-7"}),
    Case("the team's Secret, granted by name", {"storage": {"secretRef": TEAM_SECRET}}),
    Case("registry credentials alice may read", {"imagePullSecrets": [TEAM_SECRET]}),
    Case("the allowed toleration", {"resources": {"tolerations": [
        {"key": "kubetune.io/gpu", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 60}]}}),
    Case("the allowed pool", {"resources": {"nodeSelector": {"kubetune.io/pool": "gpu"}}}),
    Case("the allowed priority class", {"resources": {"priorityClassName": "team-batch"}}),
]


def guide_team_objects() -> list[dict[str, Any]]:
    """The user guide's per-team roles and quota (team-a's namespace), as a platform team would apply them."""
    guide = (ROOT / "docs" / "user-guide.md").read_text()
    block = re.search(r"```yaml\n(# team-a\.yaml.*?)```", guide, re.S)
    assert block, "docs/user-guide.md: no `# team-a.yaml` block"
    return [doc for doc in yaml.safe_load_all(block.group(1)) if doc]


def in_namespace(doc: dict[str, Any]) -> dict[str, Any]:
    if doc["metadata"].get("namespace"):
        doc["metadata"]["namespace"] = NS
    return doc


@pytest.fixture(scope="module")
def operator_values() -> dict[str, Any]:
    return VALUES


@dataclass(frozen=True)
class Users:
    alice: Path  # kubeconfigs
    bob: Path


@pytest.fixture(scope="module")
def users(kube: KubeCluster, operator: ChartOperator) -> Iterator[Users]:
    team = [in_namespace(d) for d in guide_team_objects() if d["kind"] != "ResourceQuota"]
    bob_edits = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                 "metadata": {"name": "bob-edits", "namespace": NS},
                 "subjects": [{"kind": "User", "name": "bob", "apiGroup": "rbac.authorization.k8s.io"}],
                 "roleRef": {"kind": "ClusterRole", "name": "edit", "apiGroup": "rbac.authorization.k8s.io"}}
    kube.run("kubectl", "apply", "-f", "-", input=yaml.safe_dump_all([*team, bob_edits]))
    kubernetes.client.CoreV1Api(kube.client()).create_namespaced_secret(NS, {
        "metadata": {"name": TEAM_SECRET},
        "stringData": {contract.SECRET_ACCESS_KEY_ID: "team-a", contract.SECRET_SECRET_ACCESS_KEY: "team-a"}})
    users = Users(*(kube.control_plane.write_kubeconfig(kube.workdir / f"{name}.kubeconfig", name, ("team-a",),
                                                       namespace=NS) for name in ("alice", "bob")))
    wait_for("RBAC applied", lambda: can_i(kube, "create", "pods", NS, "bob"))
    wait_for("the policy in force", lambda: POLICY in apply(kube, users.alice, "alice-job", REFUSED[0].spec))
    yield users
    kube.run("kubectl", "delete", "clusterrole", *(d["metadata"]["name"] for d in team if d["kind"] == "ClusterRole"))


def kubectl_apply(kube: KubeCluster, as_user: Path, name: str, spec: dict[str, Any], dry_run: bool = True
                  ) -> subprocess.CompletedProcess[str]:
    """`kubectl apply` of a FineTuneJob as a user (a server-side dry run: admission runs, nothing is stored)."""
    doc = job_document(name, BASE, spec)
    doc["metadata"]["namespace"] = NS
    dry = ["--dry-run=server"] if dry_run else []
    return kube.run("kubectl", "apply", *dry, "-f", "-", input=yaml.safe_dump(doc), kubeconfig=as_user, check=False)


def apply(kube: KubeCluster, as_user: Path, name: str, spec: dict[str, Any], dry_run: bool = True) -> str:
    """'' when the server accepts the job, else what kubectl printed."""
    done = kubectl_apply(kube, as_user, name, spec, dry_run)
    return "" if done.returncode == 0 else done.stderr.strip() or done.stdout


def test_the_two_users_rights_as_the_api_server_sees_them(kube: KubeCluster, users: Users) -> None:
    def may(user: str, verb: str, what: str) -> bool:  # each user asks for themselves
        done = kube.run("kubectl", "auth", "can-i", verb, what, kubeconfig=getattr(users, user), check=False)
        return done.stdout.strip() == "yes"

    assert may("alice", "create", "finetunejobs.kubetune.io") and may("bob", "create", "finetunejobs.kubetune.io")
    assert not may("alice", "create", "pods") and may("bob", "create", "pods")
    assert not may("alice", "get", "secrets/s3-credentials") and may("bob", "get", "secrets/s3-credentials")
    assert may("alice", "get", f"secrets/{TEAM_SECRET}")


def test_the_policy_is_installed_and_its_expressions_type_check(kube: KubeCluster, users: Users) -> None:
    """The API server type-checks the validations against the CRD's schema (a misspelt field is a warning)."""
    def checked() -> dict[str, Any] | None:
        policy = kube.get("validatingadmissionpolicy", POLICY)
        return policy if policy.get("status", {}).get("observedGeneration") == policy["metadata"]["generation"] \
            else None

    assert wait_for("the policy type-checked", checked)["status"]["typeChecking"].get("expressionWarnings") is None
    binding = kube.get("validatingadmissionpolicybinding", POLICY)
    assert binding["spec"]["validationActions"] == ["Deny"]


@pytest.mark.parametrize("case", REFUSED, ids=lambda c: c.id)
def test_an_author_without_pod_rights_is_refused_naming_the_field_and_rule(kube: KubeCluster, users: Users,
                                                                           case: Case) -> None:
    refused = apply(kube, users.alice, "alice-job", case.spec)
    assert f"ValidatingAdmissionPolicy '{POLICY}'" in refused, refused
    assert f"{case.field}: " in refused and f"the admission rule {case.rule}" in refused, refused


@pytest.mark.parametrize("case", REFUSED, ids=lambda c: c.id)
def test_an_author_with_pod_and_secret_rights_may(kube: KubeCluster, users: Users, case: Case) -> None:
    assert apply(kube, users.bob, "bob-job", case.spec) == ""


@pytest.mark.parametrize("case", ALLOWED, ids=lambda c: c.id)
def test_what_the_charts_values_allow_anyone(kube: KubeCluster, users: Users, case: Case) -> None:
    assert apply(kube, users.alice, "alice-job", case.spec) == ""


def test_a_spec_edit_is_checked_with_the_editors_rights(kube: KubeCluster, users: Users) -> None:
    """bob's job runs an image alice may not: she may label it, not suspend it (the one spec field that stays
    editable once a job has started) or anything else that changes its spec."""
    assert apply(kube, users.bob, "bobs", {"image": CUSTOM_IMAGE}, dry_run=False) == ""
    suspend = ("patch", "ftj", "bobs", "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":true}}}')
    try:
        def run(as_user: Path, *args: str) -> str:
            done = kube.run("kubectl", *args, kubeconfig=as_user, check=False)
            return "" if done.returncode == 0 else done.stderr

        assert run(users.alice, "label", "ftj", "bobs", "reviewed=yes") == ""
        refused = run(users.alice, *suspend)
        assert "spec.image: " in refused and "admissionPolicy.image" in refused, refused
        assert run(users.bob, *suspend) == ""
    finally:
        kube.run("kubectl", "delete", "ftj", "bobs", "-n", NS, "--wait=false")


def test_the_custom_image_runs_for_an_author_with_pod_rights(kube: KubeCluster, users: Users,
                                                             operator: ChartOperator) -> None:
    api, trainer = Api(kube.kubeconfig), ScriptedTrainer(kube.scripts)
    assert apply(kube, users.bob, "custom", {"image": CUSTOM_IMAGE}, dry_run=False) == ""
    wait_for("the trainer pod", lambda: trainer.started("custom-0-0"), timeout=90, operator=operator)
    (pod,) = api.pods("custom-0")
    assert pod["spec"]["containers"][0]["image"] == CUSTOM_IMAGE
    trainer.exit("custom-0-0", 0, {"outcome": "Succeeded", "exitCode": 0})
    wait_for("Succeeded", lambda: api.status("custom").get("phase") == "Succeeded", operator=operator)
    api.delete_ftj("custom")


def test_a_quota_bounds_the_gpus_a_team_holds(kube: KubeCluster, users: Users, operator: ChartOperator) -> None:
    """The guide's quota (GPUs cut to the one this cluster has): a second GPU job waits, Pending with the quota's
    words, and starts once the first is done. Trainer and pre-flight pods request what the spec says."""
    (quota,) = [in_namespace(d) for d in guide_team_objects() if d["kind"] == "ResourceQuota"]
    quota["spec"]["hard"]["requests.nvidia.com/gpu"] = "1"
    kube.run("kubectl", "apply", "-f", "-", input=yaml.safe_dump(quota))
    # Until the quota controller has counted what the namespace holds, the server refuses every create it covers.
    wait_for("the quota counted", lambda: kube.get("resourcequota", "team-a", namespace=NS)["status"]["used"].keys()
             == quota["spec"]["hard"].keys())
    api, trainer = Api(kube.kubeconfig), ScriptedTrainer(kube.scripts)
    gpu = {"resources": {"gpusPerNode": 1}}
    try:
        assert apply(kube, users.alice, "first", gpu, dry_run=False) == ""
        wait_for("first's trainer", lambda: trainer.started("first-0-0"), timeout=90, operator=operator)
        assert trainer.ended("first-preflight")  # the pre-flight fit the quota's cpu and memory, and ran first
        (pod,) = api.pods("first-0")
        assert pod["spec"]["containers"][0]["resources"]["requests"] == {"cpu": "1", "memory": "1Gi",
                                                                         "nvidia.com/gpu": "1"}
        # Trainers never call the API: no token, so a job author gets no API identity through them.
        assert pod["spec"]["automountServiceAccountToken"] is False
        assert not [v for v in pod["spec"]["volumes"] if "projected" in v]

        assert apply(kube, users.alice, "second", gpu, dry_run=False) == ""
        running = wait_for("second over quota", lambda: api.condition("second", "Running").get(
            "reason") == "FailedCreate" and api.condition("second", "Running"), timeout=90, operator=operator)
        assert "exceeded quota: team-a" in running["message"], running
        assert "limited: requests.nvidia.com/gpu=1" in running["message"], running
        assert api.status("second")["phase"] == "Pending" and api.pods("second-0") == []
        assert any(e["type"] == "Warning" and "exceeded quota: team-a" in e["message"] for e in api.events("second"))

        trainer.exit("first-0-0", 0, {"outcome": "Succeeded", "exitCode": 0})
        wait_for("second's trainer once first is done", lambda: trainer.started("second-0-0"), timeout=120,
                 operator=operator)
        trainer.exit("second-0-0", 0, {"outcome": "Succeeded", "exitCode": 0})
        wait_for("second Succeeded", lambda: api.status("second").get("phase") == "Succeeded", operator=operator)
    finally:
        for name in ("first", "second"):
            kube.run("kubectl", "delete", "ftj", name, "-n", NS, "--ignore-not-found", "--wait=false")
        kube.run("kubectl", "delete", "resourcequota", quota["metadata"]["name"], "-n", NS)


def test_the_operator_cannot_read_secrets(kube: KubeCluster, users: Users) -> None:
    """It needs none: trainer pods get S3 credentials by secretKeyRef, which the kubelet resolves."""
    done = kube.run("kubectl", "get", "secret", TEAM_SECRET, "-n", NS, "--as", OPERATOR_ACCOUNT, check=False)
    assert done.returncode != 0 and "Forbidden" in done.stderr, done.stderr
    for verb in ("get", "list", "watch"):
        assert not can_i(kube, verb, "secrets", NS) and not can_i(kube, verb, "secrets", "kube-system")
    granted = kube.run("kubectl", "auth", "can-i", "--list", "-n", NS, "--as", OPERATOR_ACCOUNT).stdout
    assert "secrets" not in granted and "pods/exec" not in granted and "[*]" not in granted, granted
    # The policy adds no grant: the API server evaluates it with the requesting user's rights.
    assert kube.get("clusterrole", "kubetune-operator")["rules"] == find(
        render(kube.workdir, merged(TEST_VALUES, VALUES), release="kubetune"), "ClusterRole")[0]["rules"]


def test_switching_the_rules_off_lets_alice_through(kube: KubeCluster, users: Users) -> None:
    """Each refusal above is the policy's: one rule off lifts only its refusals, the policy off lifts all."""
    def upgrade(extra: dict[str, Any]) -> None:
        values = kube.workdir / "values-policy.yaml"
        values.write_text(yaml.safe_dump(merged(merged(TEST_VALUES, VALUES), extra)))
        kube.run("helm", "upgrade", "kubetune", str(CHART), "-n", RELEASE_NAMESPACE, "-f", str(values))

    image, others = REFUSED[0], [c for c in REFUSED if c.rule != "admissionPolicy.image"]
    try:
        upgrade({"admissionPolicy": {"image": {"enabled": False}}})
        wait_for("the image rule off", lambda: apply(kube, users.alice, "alice-job", image.spec) == "")
        assert all(apply(kube, users.alice, "alice-job", c.spec) for c in others)
        upgrade({"admissionPolicy": {"validationActions": ["Warn"]}})  # to try the rules before enforcing them
        warned = wait_for("a warning instead of a refusal", lambda: (
            done := kubectl_apply(kube, users.alice, "alice-job", image.spec)).returncode == 0 and done.stderr)
        assert "Warning: " in warned and "spec.image: " in warned and "admissionPolicy.image" in warned, warned
        upgrade({"admissionPolicy": {"enabled": False}})
        wait_for("the policy off", lambda: all(apply(kube, users.alice, "alice-job", c.spec) == "" for c in REFUSED))
        gone = kube.run("kubectl", "get", "validatingadmissionpolicy", POLICY, check=False)
        assert "NotFound" in gone.stderr
    finally:
        upgrade({})
        wait_for("the policy back", lambda: apply(kube, users.alice, "alice-job", image.spec))


# ---- the chart, rendered (no cluster) ---------------------------------------------------------------------
def policy_rules(objects: list[dict[str, Any]]) -> list[str]:
    """The admissionPolicy.* rules a rendered policy enforces, read from its messages."""
    return [re.search(r"admission rule admissionPolicy\.(\w+)", v["message"]).group(1)  # type: ignore[union-attr]
            for p in find(objects, "ValidatingAdmissionPolicy") for v in p["spec"]["validations"]]


def test_each_switch_turns_off_its_rule_alone(tmp_path: Path) -> None:
    assert policy_rules(render(tmp_path, {})) == RULES
    for rule in RULES:
        assert policy_rules(render(tmp_path, {f"admissionPolicy.{rule}.enabled": False})) == \
            [r for r in RULES if r != rule]
    everything_off = render(tmp_path, {f"admissionPolicy.{rule}.enabled": False for rule in RULES})
    for objects in (everything_off, render(tmp_path, {"admissionPolicy.enabled": False})):
        assert not [o for o in objects if o["kind"].startswith("ValidatingAdmissionPolicy")]


def test_namespaced_mode_binds_the_policy_to_the_watched_namespaces(tmp_path: Path) -> None:
    """Another release may run jobs elsewhere with other allowed images: each policy covers its own namespaces."""
    assert "matchResources" not in find(render(tmp_path, {}), "ValidatingAdmissionPolicyBinding")[0]["spec"]
    binding = find(render(tmp_path, {"rbac.scope": "namespaced", "rbac.namespaces": ["ml", "research"]}),
                   "ValidatingAdmissionPolicyBinding")[0]
    assert binding["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"] == [
        {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["ml", "research"]}]


@pytest.mark.parametrize(("values", "message"), [
    ({"admissionPolicy.validationActions": ["Deny", "Warn"]}, "at '/admissionPolicy/validationActions'"),
    ({"admissionPolicy.tolerations.allowed": [{"operator": "Exists"}]},  # no key: it would tolerate every taint
     "at '/admissionPolicy/tolerations/allowed/0': missing property 'key'"),
    ({"admissionPolicy.secretRef.allowed": ["s3"]}, "at '/admissionPolicy/secretRef': additional properties"),
], ids=["Deny with Warn", "toleration without key", "secretRef has no allow-list"])
def test_values_schema_rejects_unsafe_policy_values(tmp_path: Path, values: dict[str, Any], message: str) -> None:
    done = helm_with_values(tmp_path, "template", values)
    assert done.returncode != 0 and message in done.stderr, done.stderr

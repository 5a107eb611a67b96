"""tests/pss.py itself: a compliant pod passes, and each rule of the restricted standard catches its field."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.pss import restricted_violations

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def compliant() -> dict[str, Any]:
    return {
        "securityContext": {"runAsNonRoot": True, "runAsUser": 65532, "seccompProfile": {"type": "RuntimeDefault"}},
        "initContainers": [{"name": "init", "securityContext": {"allowPrivilegeEscalation": False,
                                                                 "capabilities": {"drop": ["ALL"]}}}],
        "containers": [{"name": "main", "ports": [{"name": "metrics", "containerPort": 9400}],
                        "securityContext": {"allowPrivilegeEscalation": False,
                                            "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}}}],
        "volumes": [{"name": "spec", "configMap": {"name": "x"}}, {"name": "work", "emptyDir": {}}],
    }


def main_sc(pod: dict[str, Any]) -> dict[str, Any]:
    return pod["containers"][0]["securityContext"]


MUTATIONS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "hostNetwork": (lambda p: p.update(hostNetwork=True), "spec.hostNetwork"),
    "hostPID": (lambda p: p.update(hostPID=True), "spec.hostPID"),
    "hostIPC": (lambda p: p.update(hostIPC=True), "spec.hostIPC"),
    "hostProcess": (lambda p: main_sc(p).update(windowsOptions={"hostProcess": True}), "windowsOptions.hostProcess"),
    "privileged": (lambda p: main_sc(p).update(privileged=True), "privileged"),
    "capabilities.add": (lambda p: main_sc(p)["capabilities"].update(add=["SYS_ADMIN"]), "capabilities.add"),
    "capabilities.drop": (lambda p: main_sc(p)["capabilities"].update(drop=["NET_RAW"]), "capabilities.drop"),
    "hostPath": (lambda p: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}}), "hostPath"),
    "volume type": (lambda p: p["volumes"].append({"name": "n", "nfs": {"server": "x", "path": "/"}}), "volume type"),
    "hostPort": (lambda p: p["containers"][0]["ports"][0].update(hostPort=9400), "hostPort"),
    "appArmor": (lambda p: main_sc(p).update(appArmorProfile={"type": "Unconfined"}), "appArmorProfile"),
    "seLinux type": (lambda p: main_sc(p).update(seLinuxOptions={"type": "spc_t"}), "seLinuxOptions.type"),
    "seLinux user": (lambda p: p["securityContext"].update(seLinuxOptions={"user": "root"}), "seLinuxOptions.user"),
    "procMount": (lambda p: main_sc(p).update(procMount="Unmasked"), "procMount"),
    "seccomp unconfined": (lambda p: main_sc(p).update(seccompProfile={"type": "Unconfined"}), "seccompProfile"),
    "seccomp missing": (lambda p: p["securityContext"].pop("seccompProfile"), "seccompProfile.type must be"),
    "sysctl": (lambda p: p["securityContext"].update(sysctls=[{"name": "kernel.msgmax", "value": "1"}]), "sysctls"),
    "allowPrivilegeEscalation": (lambda p: main_sc(p).pop("allowPrivilegeEscalation"), "allowPrivilegeEscalation"),
    "init container too": (lambda p: p["initContainers"][0]["securityContext"].update(privileged=True),
                           "initContainers[init]"),
    "runAsNonRoot missing": (lambda p: p["securityContext"].pop("runAsNonRoot"), "runAsNonRoot must be true"),
    "runAsNonRoot false": (lambda p: main_sc(p).update(runAsNonRoot=False), "runAsNonRoot must not be false"),
    "runAsUser 0": (lambda p: main_sc(p).update(runAsUser=0), "runAsUser must not be 0"),
}


def test_a_compliant_pod_passes() -> None:
    assert restricted_violations(compliant()) == []


def test_container_level_settings_can_stand_in_for_the_pod_level_ones() -> None:
    pod = compliant()
    pod["securityContext"] = {}
    for container in pod["initContainers"] + pod["containers"]:
        container["securityContext"].update(runAsNonRoot=True, seccompProfile={"type": "Localhost",
                                                                               "localhostProfile": "p.json"})
    assert restricted_violations(pod) == []


@pytest.mark.parametrize("rule", list(MUTATIONS))
def test_each_rule_names_its_field(rule: str) -> None:
    pod = copy.deepcopy(compliant())
    mutate, field = MUTATIONS[rule]
    mutate(pod)
    problems = restricted_violations(pod)
    assert problems and all(field in p for p in problems), problems


def test_apparmor_annotation() -> None:
    bad = {"container.apparmor.security.beta.kubernetes.io/main": "unconfined"}
    assert restricted_violations(compliant(), bad)
    assert restricted_violations(compliant(), {"container.apparmor.security.beta.kubernetes.io/main":
                                               "runtime/default"}) == []


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.yaml")
                                           if "kind: FineTuneJob" in p.read_text()))
def test_trainer_pods_the_operator_builds_for_each_example_are_restricted(example: str) -> None:
    from kubetune_operator import builders  # the operator's pure builders: the pods a cluster would run

    ftj = yaml.safe_load((EXAMPLES / example).read_text())
    ftj["metadata"].update(namespace="ml", uid="00000000-0000-4000-8000-000000000000")
    job = builders.build_job(ftj, image="ghcr.io/kubetune/trainer:0.1.0", service_account="kubetune-trainer")
    template = job["spec"]["template"]
    assert restricted_violations(template["spec"], template["metadata"].get("annotations")) == []
    assert template["spec"]["automountServiceAccountToken"] is False

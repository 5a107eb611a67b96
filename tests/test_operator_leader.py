"""Two operator replicas (issue 26, item 12): one leads through a Lease and runs passes, the other stands by with
warm caches; when the leader's pod is gone, the standby takes over and jobs go on. On the real control plane,
the chart's Deployment with `operator.replicas: 2` and `operator.leaderElection.enabled`."""

from __future__ import annotations

from typing import Any

import kubernetes
import pytest

from tests.cluster import RELEASE_NAMESPACE, KubeCluster
from tests.operator_harness import Api, ChartOperator, wait_for
from tests.scripted_trainer import ScriptedTrainer
from tests.test_operator import CPU, submit

LEASE = "kubetune-operator"


@pytest.fixture(scope="module")
def operator_values() -> dict[str, Any]:
    return {"operator": {"replicas": 2, "leaderElection": {"enabled": True}}}


def holder(kube: KubeCluster) -> str | None:
    leases = kubernetes.client.CoordinationV1Api(kube.client())
    try:
        return str(leases.read_namespaced_lease(LEASE, RELEASE_NAMESPACE).spec.holder_identity or "") or None
    except kubernetes.client.ApiException:
        return None


def ready_pods(operator: ChartOperator) -> list[str]:
    return [p["metadata"]["name"] for p in operator.pods() if not p["metadata"].get("deletionTimestamp") and any(
        c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions") or [])]


def test_one_replica_leads_and_a_standby_takes_over(api: Api, operator: ChartOperator, trainer: ScriptedTrainer,
                                                     kube: KubeCluster) -> None:
    wait_for("two replicas Ready", lambda: len(ready_pods(operator)) == 2, timeout=90, operator=operator)
    leader = wait_for("a leader", lambda: holder(kube), operator=operator)
    assert leader in ready_pods(operator)
    submit(api, "led", **CPU)
    wait_for("the trainer", lambda: trainer.started("led-0-0"), operator=operator)
    assert len(api.jobs("led")) == 1  # one replica made children, once
    standby = next(p for p in ready_pods(operator) if p != leader)
    kubernetes.client.CoreV1Api(kube.client()).delete_namespaced_pod(leader, RELEASE_NAMESPACE,
                                                                     grace_period_seconds=0)
    wait_for("the standby leads", lambda: holder(kube) == standby, timeout=60, operator=operator)
    trainer.exit("led-0-0", 0, {"outcome": "Succeeded", "exitCode": 0})
    wait_for("Succeeded under the new leader", lambda: api.status("led").get("phase") == "Succeeded",
             timeout=60, operator=operator)
    submit(api, "after", **CPU)
    wait_for("a new job's trainer", lambda: trainer.started("after-0-0"), timeout=60, operator=operator)
    wait_for("the replacement replica Ready", lambda: len(ready_pods(operator)) == 2, timeout=90, operator=operator)
    assert holder(kube) == standby  # the replacement stands by
